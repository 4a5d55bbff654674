#!/usr/bin/env bash
# Create .venv (if missing) and install clipserve with everything the demo and tests need:
# export (torch 2.14.1, open_clip), the CPU tritonserver (nvidia-pytriton) and test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[export,triton,openvino,loadtest,dev]'
