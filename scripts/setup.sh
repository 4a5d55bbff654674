#!/usr/bin/env bash
# Create .venv (if missing) and install clipserve with everything the demo and tests need:
# export (torch 2.14.1, open_clip), the CPU tritonserver (nvidia-pytriton) and test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[export,triton,openvino,loadtest,dev]'

# Prometheus and promtool (Debian's `prometheus` package) for the rule tests
# (tests/unit/test_prometheus_rules.py) and the Prometheus integration test; those tests skip
# without them. Installed with apt-get when it exists and we are root (CI on a fresh
# Debian-like machine); otherwise say why and go on. On a host running systemd the package also
# enables a prometheus service on :9090 (`systemctl disable --now prometheus` to stop it).
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    :
elif ! command -v apt-get >/dev/null; then
    echo "setup: apt-get not found: not installing Prometheus; the promtool rule tests and the" \
         "Prometheus integration test will skip (install prometheus and promtool yourself)" >&2
elif [ "$(id -u)" != 0 ]; then
    echo "setup: not root: not installing Prometheus; the promtool rule tests and the" \
         "Prometheus integration test will skip (run: sudo apt-get install prometheus)" >&2
else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
