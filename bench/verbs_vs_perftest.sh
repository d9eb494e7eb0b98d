#!/usr/bin/env bash
# verbs_vs_perftest.sh - lamina-comm's verbs transport next to perftest, on the
# same rxe device, with the same message sizes and iteration counts.
#
#   ib_write_bw  vs  lamina-bench bandwidth --transport verbs   (write-with-imm,
#                    measured where the data lands, 128 writes in flight)
#   ib_write_lat vs  lamina-bench latency   --transport verbs   (ping-pong, half RTT)
#
# Server and client both run on rxe0 in the soft-RoCE guest; started outside
# it, the script builds the extension and re-runs itself inside one. Absolute
# numbers in the emulated guest mean little: read the ratios.
# --progress poll|event: lamina-bench's progress mode on both ends (default:
# event). perftest busy-polls its CQ; --progress poll is the like-for-like run.
# The last line is one JSON object: {"progress", "bw_64k_ratio", "bw_1m_ratio",
# "lat_ratio"} (lamina / perftest; null where either side gave no number).
# Environment: BW_SIZES ("65536 1048576"), BW_ITERS ("500 200", one per size),
# LAT_SIZE (64), LAT_ITERS (1000), RXE_VM_SCRIPT (path of run-in-rxe-vm.sh),
# PYTHON (default: the project's .venv when there is one, else python3).
set -euo pipefail

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$root"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

if [ -z "${RXE_DEV:-}" ]; then
  vm=${RXE_VM_SCRIPT:-$root/../shared/rxe-vm/run-in-rxe-vm.sh}
  "$PYTHON" lamina_comm/_build.py >/dev/null
  exec bash "$vm" --timeout 900 -- bash bench/verbs_vs_perftest.sh "$@"
fi

PROGRESS=event
while [ $# -gt 0 ]; do
  case $1 in
    --progress) PROGRESS=$2; shift 2;;
    --progress=*) PROGRESS=${1#--progress=}; shift;;
    *) echo "verbs_vs_perftest: unknown argument $1" >&2; exit 2;;
  esac
done
case $PROGRESS in event|poll) ;; *) echo "verbs_vs_perftest: --progress event|poll" >&2; exit 2;; esac

DEV=$RXE_DEV
GID=${RXE_GID_INDEX:-1}
IP=${RXE_IP:-10.200.0.1}
read -r -a SIZES <<< "${BW_SIZES:-65536 1048576}"
read -r -a ITERS <<< "${BW_ITERS:-500 200}"
LAT_SIZE=${LAT_SIZE:-64}
LAT_ITERS=${LAT_ITERS:-1000}
PORT=18600
LOGS=$(mktemp -d)
BENCH=("$PYTHON" -m lamina_comm.bench.cli)

# perftest SERVER_ARGS...: run a server and its client; print the client's row for the size.
perftest() {
  local tool=$1 size=$2 iters=$3; shift 3
  PORT=$((PORT + 1))
  "$tool" -d "$DEV" -x "$GID" -p "$PORT" -s "$size" -n "$iters" "$@" > "$LOGS/server.log" 2>&1 &
  local server=$!
  local tries=0
  until "$tool" -d "$DEV" -x "$GID" -p "$PORT" -s "$size" -n "$iters" "$@" "$IP" > "$LOGS/client.log" 2>&1; do
    tries=$((tries + 1))
    if [ $tries -ge 10 ] || ! kill -0 $server 2>/dev/null; then
      cat "$LOGS/client.log" "$LOGS/server.log" >&2
      echo "verbs_vs_perftest: $tool failed" >&2
      exit 1
    fi
    sleep 1
  done
  wait $server || true
  awk -v s="$size" '$1 == s { print; exit }' "$LOGS/client.log"
}

# lamina MODE SIZE ITERS [ARGS...]: one lamina-bench server + client; prints the JSON result path.
lamina() {
  local mode=$1 size=$2 iters=$3; shift 3
  PORT=$((PORT + 1))
  "${BENCH[@]}" "$mode" --transport verbs --progress "$PROGRESS" -d "$DEV" -x "$GID" -p "$PORT" --once --quiet \
    > "$LOGS/lserver.log" 2>&1 &
  local server=$!
  "${BENCH[@]}" "$mode" "$IP" --transport verbs --progress "$PROGRESS" -d "$DEV" -x "$GID" -p "$PORT" \
    -s "$size" -n "$iters" \
    --quiet --report_gbits --out_json "$LOGS/$mode-$size.json" "$@" > "$LOGS/lclient.log" 2>&1 ||
    { cat "$LOGS/lclient.log" "$LOGS/lserver.log" >&2; echo "verbs_vs_perftest: lamina-bench failed" >&2; exit 1; }
  wait $server || true
  echo "$LOGS/$mode-$size.json"
}

json() { "$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0][sys.argv[2]])" "$@"; }
# lamina / perftest, or n/a when either side reported no usable number (perftest prints
# "inf" when its cycle clock misbehaves under emulation).
ratio() {
  "$PYTHON" -c "
import math, sys
a, b = (float(x) if x.replace('.', '', 1).isdigit() else math.nan for x in sys.argv[1:3])
print(f'{a / b:.2f}' if math.isfinite(a) and math.isfinite(b) and b > 0 else 'n/a')" "$@"
}

echo "verbs_vs_perftest on $DEV, lamina progress=$PROGRESS (GID index $GID, $(ibv_devinfo -d "$DEV" | awk '/active_mtu/ {print "active MTU " $2; exit}'))"
printf "\n%-10s %-8s %-18s %-18s %s\n" "bytes" "iters" "ib_write_bw Gb/s" "lamina Gb/s" "lamina/perftest"
for i in "${!SIZES[@]}"; do
  size=${SIZES[$i]} iters=${ITERS[$i]:-${ITERS[-1]}}
  pt=$(perftest ib_write_bw "$size" "$iters" --report_gbits | awk '{print $4}')
  lm=$(json "$(lamina bandwidth "$size" "$iters")" bw_avg_gbps)
  r=$(ratio "$lm" "$pt")
  printf "%-10s %-8s %-18.3f %-18.3f %s\n" "$size" "$iters" "$pt" "$lm" "$r"
  case $size in 65536) BW64=$r;; 1048576) BW1M=$r;; esac
done

printf "\n%-10s %-8s %-22s %-22s %s\n" "bytes" "iters" "ib_write_lat t_typ/avg" "lamina t_typ/avg [us]" \
  "lamina/perftest (typ, avg)"
row=$(perftest ib_write_lat "$LAT_SIZE" "$LAT_ITERS")
pt_typ=$(echo "$row" | awk '{print $5}') pt_avg=$(echo "$row" | awk '{print $6}')
out=$(lamina latency "$LAT_SIZE" "$LAT_ITERS")
lm_typ=$(json "$out" t_typical_us) lm_avg=$(json "$out" t_avg_us)
printf "%-10s %-8s %-22s %-22s %s, %s\n" "$LAT_SIZE" "$LAT_ITERS" "$pt_typ / $pt_avg" \
  "$(printf '%.2f / %.2f' "$lm_typ" "$lm_avg")" "$(ratio "$lm_typ" "$pt_typ")" "$(ratio "$lm_avg" "$pt_avg")"
LAT=$(ratio "$lm_typ" "$pt_typ")
num() { [ "${1:-n/a}" = n/a ] && echo null || echo "$1"; }
echo "{\"progress\": \"$PROGRESS\", \"bw_64k_ratio\": $(num "${BW64:-}"), \"bw_1m_ratio\": $(num "${BW1M:-}"), \"lat_ratio\": $(num "$LAT")}"
rm -rf "$LOGS"
