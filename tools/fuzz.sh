#!/usr/bin/env bash
# Coverage-guided fuzzing, bounded in time: every tests/fuzz/fuzz_*.c (libFuzzer,
# built with clang-14 under ASan/UBSan) and every tests/fuzz/fuzz_*.py (atheris,
# same flags). Each runs FUZZ_SECONDS over a scratch corpus (new units go there,
# not into the repo) seeded from tests/fuzz/corpus/<name>/. Fails on any crash,
# sanitizer report, hang, or memory limit hit; prints executions, cov/ft and
# crashes per target.
set -uo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}       # whole-process RSS bound (libFuzzer -rss_limit_mb)
FUZZ_MALLOC_MB=${FUZZ_MALLOC_MB:-512}  # largest single allocation (-malloc_limit_mb)
FUZZ_TIMEOUT_S=${FUZZ_TIMEOUT_S:-25}   # one input taking longer is a hang (-timeout)
CLANG=${CLANG:-clang-14}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${FUZZ_OUT:-native/build/fuzz}
mkdir -p "$OUT"

flags=(-max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$FUZZ_RSS_MB" -malloc_limit_mb="$FUZZ_MALLOC_MB"
       -timeout="$FUZZ_TIMEOUT_S" -print_final_stats=1)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=0

# run NAME CMD...: run one fuzzer, summarise its log, remember a failure.
run() {
    local name=$1; shift
    local scratch="$OUT/$name.corpus" seeds="tests/fuzz/corpus/$name" log="$OUT/$name.log"
    mkdir -p "$scratch" "$seeds"
    "$@" "${flags[@]}" -artifact_prefix="$OUT/$name-" "$scratch" "$seeds" >"$log" 2>&1
    local rc=$?
    local execs cov crashes
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    crashes=$(ls "$OUT/$name"-crash-* "$OUT/$name"-leak-* "$OUT/$name"-timeout-* "$OUT/$name"-oom-* 2>/dev/null | wc -l)
    if grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:' "$log"; then
        [ "$rc" = 0 ] && rc=1
    fi
    printf 'fuzz %-24s executions=%s %s crashes=%s rc=%s\n' "$name" "${execs:-?}" "${cov:-cov: ?}" "$crashes" "$rc"
    if [ "$rc" != 0 ]; then
        failed=1
        echo "fuzz $name FAILED; log: $log; inputs: $OUT/$name-*" >&2
        tail -40 "$log" >&2
    fi
}

for src in tests/fuzz/fuzz_*.c; do
    [ -e "$src" ] || continue
    name=$(basename "$src" .c); name=${name#fuzz_}
    bin="$OUT/fuzz_$name"
    if ! "$CLANG" -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -O1 \
            -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
            -Inative/include -o "$bin" "$src" native/src/core/*.c native/src/tcp/*.c native/src/shm/*.c -lpthread; then
        echo "fuzz: cannot build $src (needs clang-14 and libclang-rt-14-dev)" >&2
        failed=1
        continue
    fi
    run "$name" "$bin"
done

for src in tests/fuzz/fuzz_*.py; do
    [ -e "$src" ] || continue
    if ! [ -x "$PYTHON" ]; then
        echo "fuzz: skipping $src ($PYTHON missing: run make install)" >&2
        continue
    fi
    name=$(basename "$src" .py); name=${name#fuzz_}
    run "$name" "$PYTHON" "$src"
done

exit $failed
