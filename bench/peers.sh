#!/usr/bin/env bash
# lamina-bench against iperf3, sockperf and ucx_perftest on loopback, in one run.
# Usage: bench/peers.sh [peers.py options]   (see bench/peers.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/peers.py "$@"
