#!/usr/bin/env bash
# One run on a lent GPU machine (H100/H200, no internet): build lamina-comm, run the GPU tests,
# benchmark, print a short table last and write full results under $OUT (default ./build/device-out).
#
#   tools/device-check.sh                 # what the device tool runs; about 3-6 minutes on one H100
#   PYTHON=/path/to/python3 tools/device-check.sh
#   LAMINA_SKIP_BUILD=1 OUT=/tmp/out tools/device-check.sh --quick   # dry run where the module is built
#   LAMINA_LIBCUDA=<tests/mock_libcuda.c built> ... --quick --skip-tests --skip-decode   # the GPU phases'
#                                        # plumbing against the mock driver (tests/test_gpu_unavailable.py)
#
# Needs: gcc and Python headers (the cffi build), cffi + pycparser. The device image has no cffi:
# carry wheels for its Python (cp312) in dist/device-wheels/ (ignored by git; fetch them here with
# `tools/device-check.sh --fetch-wheels`, where pip can reach an index) and name that folder in the
# device tool's `carry`. torch and cupy are optional: tests needing them skip, and the table says so.
# Nothing here changes the GPU's settings. Exit status: 0 when every check passed.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${LAMINA_WHEELS:-dist/device-wheels}

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" cffi==2.0.0 pycparser
fi

OUT=${OUT:-$ROOT/build/device-out}
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "[device-check +$(( $(date +%s) - START ))s] $*"; }

# 1. The Python that has torch (the device image's plain python3 does), else any python3.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3 /opt/torch/.venv/bin/python3 /usr/bin/python3; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch' >/dev/null 2>&1; then PY=$cand; break; fi
    done
fi
PY=${PY:-python3}
say "python: $PY ($("$PY" -V 2>&1)); torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "no cuda")' 2>&1 | tail -1)"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# 2. cffi: installed, or from carried wheels (installed under /tmp, nothing system-wide).
if ! "$PY" -c 'import cffi, pycparser' >/dev/null 2>&1; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/lamina-site \
            "$WHEELS"/*.whl && export PYTHONPATH=/tmp/lamina-site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# 3. The native module, in place, tcp only (the lent machines have no RDMA NIC; verbs is checked in
#    the soft-RoCE guest instead). Its cffi module is what every transport test needs.
if [ -n "${LAMINA_SKIP_BUILD:-}" ]; then
    BUILD="skipped (LAMINA_SKIP_BUILD): using the module already built"
elif "$PY" -c 'import cffi, pycparser' >/dev/null 2>&1; then
    if LAMINA_WITH_VERBS=0 timeout 150 "$PY" lamina_comm/_build.py >"$OUT/build.log" 2>&1; then
        BUILD="ok (tcp only)"
    else
        BUILD="FAILED (see build.log: $(grep -m1 -iE 'error|fatal' "$OUT/build.log" | cut -c1-120))"
    fi
else
    BUILD="skipped: no cffi for $("$PY" -V 2>&1) (carry wheels in $WHEELS: tools/device-check.sh --fetch-wheels)"
fi
say "native build: $BUILD"

# 4. Tests, benchmarks, table: the budget keeps the whole run under ${DEVICE_CHECK_TOTAL:-450} s (7.5 min).
LEFT=$(( ${DEVICE_CHECK_TOTAL:-450} - ($(date +%s) - START) ))
timeout "$(( LEFT > 60 ? LEFT : 60 ))" "$PY" -u tools/device_check.py --out "$OUT" --build "$BUILD" \
    --budget "$(( LEFT > 90 ? LEFT - 30 : 60 ))" "$@"
rc=$?
[ $rc -eq 124 ] && echo "device_check.py ran past its timeout; partial results: $OUT"
say "done (exit $rc)"
exit $rc
