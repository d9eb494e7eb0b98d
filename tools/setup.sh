#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine: system packages (when root),
# then a virtual environment in .venv with lamina-comm installed editable.
# torch is pinned to 2.13.0, whose CPU build pip finds on this project's
# machines; a bare `torch` would pull several GB of CUDA build. The ray extra
# (about 240 MB) lets `make test` run the Ray deployment test.
set -euo pipefail
cd "$(dirname "$0")/.."

# clang-14 + libclang-rt-14-dev: the libFuzzer harnesses (make fuzz).
APT_PACKAGES=(gcc make clang-14 libclang-rt-14-dev libibverbs-dev librdmacm-dev iproute2 iperf3 sockperf ucx-utils)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root; skipping system packages (${APT_PACKAGES[*]})" >&2
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test,plot,ray]' safetensors
transports=$(.venv/bin/python -c 'import lamina_comm as lc; c = lc.Context(); print(", ".join(c.transports)); c.close()')
echo "setup: done (transports here: $transports)"
