#!/usr/bin/env bash
# rxe-test.sh - run the verbs tests (pytest -m rxe tests/rxe) in a soft-RoCE guest.
#
# The machine's kernel has no RDMA, so the tests run inside a throw-away qemu
# guest with an rxe device (see ../shared/rxe-vm/README.md; its first run
# downloads ~75 MB). The extension is built here first: compiling inside the
# emulated guest is 20-40x slower. Extra arguments go to pytest (e.g. -k read -x).
# Environment: RXE_VM_SCRIPT overrides the path of run-in-rxe-vm.sh; PYTHON the
# interpreter (default: the project's .venv when there is one, else python3).
set -euo pipefail

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
# The recipe lives beside the checkout (../shared); /work/shared on this project's machines.
vm=${RXE_VM_SCRIPT:-}
for candidate in "$root/../shared/rxe-vm/run-in-rxe-vm.sh" /work/shared/rxe-vm/run-in-rxe-vm.sh; do
  [ -n "$vm" ] || { [ -f "$candidate" ] && vm=$candidate; }
done
[ -n "$vm" ] && [ -f "$vm" ] || { echo "rxe-test: run-in-rxe-vm.sh not found (set RXE_VM_SCRIPT)" >&2; exit 2; }
[ -f /usr/include/infiniband/verbs.h ] ||
  { echo "rxe-test: install libibverbs-dev: the verbs transport is only built with it" >&2; exit 2; }

"$PYTHON" lamina_comm/_build.py >/dev/null
"$PYTHON" -c 'from lamina_comm._bindings import lib; assert lib.LM_BUILT_WITH_VERBS, "built without verbs"'
# The mock libcuda of the GPU tier's fallback test, also built here (tests/mock_cuda.py).
mkdir -p native/build/mock-cuda
gcc -shared -fPIC -O1 -Wall -Werror -o native/build/mock-cuda/libcuda.so.1 tests/mock_libcuda.c -lpthread
export LAMINA_TEST_MOCK_LIBCUDA=$root/native/build/mock-cuda/libcuda.so.1

# One guest for the whole run: about a minute (boot ~10 s, tests ~25 s).
# Exit 125 means the guest itself failed (seen once while booting under
# emulation), not the tests: try once more before giving up.
for attempt in 1 2; do
  rc=0
  bash "$vm" --timeout 900 -- "$PYTHON" -m pytest -m rxe tests/rxe -q -p no:cacheprovider "$@" || rc=$?
  [ "$rc" = 125 ] && [ "$attempt" = 1 ] && { echo "rxe-test: guest failed to start; retrying" >&2; continue; }
  exit "$rc"
done
