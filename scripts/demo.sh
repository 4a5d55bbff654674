#!/usr/bin/env bash
# The main job: set up, export the default models, serve them, send requests, show metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHONUNBUFFERED=1 .venv/bin/python scripts/demo.py
