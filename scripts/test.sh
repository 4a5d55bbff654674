#!/usr/bin/env bash
# The test suite: set up, check generated gRPC code is current, run unit + integration tests
# (integration tests start a real tritonserver and the real gateway on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m clipserve.server.codegen --check
.venv/bin/python -m pytest -q "$@"
