#!/usr/bin/env python3
"""The issue-10 hot-path table, this tree against a baseline tree and the peers, interleaved.

Each repetition runs, in turn, every figure for the baseline tree (--base, a
checkout built in place: `git worktree add /tmp/old REV`, then in /tmp/old
`PATH_TO_THIS_TREE/.venv/bin/python lamina_comm/_build.py`), for this tree, and for
the peer tool where there is one, so a load drift hits all alike:

  bandwidth S xQ    lamina-bench bandwidth --loopback -s S -q Q   vs iperf3 -l S -P Q
  latency           lamina-bench latency --loopback -s 64 (C loop; event and poll)   vs sockperf ping-pong
  channel           lamina-bench channel --sizes 64,64K (event and poll): p50 round trips
  demo              python -m lamina_comm.node.demo: disaggregated / monolithic decode ratio

Prints the median and range of each figure and writes the raw runs as JSON
(--out). Nothing here passes or fails; record what it prints in
bench/RESULTS.md with the date and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from peers import iperf3_gbps, sockperf_p50_us  # noqa: E402


def _run(tree: str, args: list[str], timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=tree)
    if out.returncode != 0:
        raise RuntimeError(f"{args} in {tree} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def _bench_json(tree: str, mode: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        _run(tree, ["-m", "lamina_comm.bench.cli", mode, *extra, "--out_json", f.name])
        return json.load(open(f.name))


def bandwidth(tree: str, size: int, streams: int, seconds: float) -> float:
    # tcp, as the peers it is compared with ("auto" would take shm on one host).
    report = _bench_json(tree, "bandwidth", ["--loopback", "--quiet", "--transport", "tcp", "-s", str(size),
                                            "-q", str(streams), "-D", str(seconds)])
    return report["results"][0]["bw_avg_gbps"]


def latency(tree: str, progress: str) -> float:
    report = _bench_json(tree, "latency", ["--loopback", "--quiet", "--transport", "tcp", "-s", "64", "-n", "20000",
                                          "--progress", progress])
    return report["results"][0]["p50_us"]


def channel(tree: str, progress: str) -> dict[str, float]:
    report = _bench_json(tree, "channel", ["--sizes", "64,64K", "-n", "3000", "--transport", "tcp",
                                          "--progress", progress])
    out = {}
    for row in report["results"]:
        kib = "64B" if row["bytes"] == 64 else "64K"
        out[f"channel_{kib}"] = row["channel_rtt_p50_us"]
        out[f"transport_{kib}"] = row["transport_rtt_p50_us"]
        if "native_channel_rtt_p50_us" in row:
            out[f"native_{kib}"] = row["native_channel_rtt_p50_us"]
    return out


def demo(tree: str) -> dict[str, float]:
    text = _run(tree, ["-m", "lamina_comm.node.demo"], timeout=900)
    ratio = re.search(r"disaggregated / monolithic decode steps: ([0-9.]+)", text)
    disagg = re.search(r"disaggregated, .*decode steps\s+([0-9.]+) tokens/s", text)
    staged = re.search(r"bytes staged .*: ([0-9]+)", text)
    return {"ratio": float(ratio.group(1)), "disaggregated_tok_s": float(disagg.group(1)),
            "staged_bytes": float(staged.group(1)) if staged else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="baseline tree (built in place)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-D", "--duration", type=float, default=3.0)
    ap.add_argument("--only", default="bandwidth,latency,channel,demo", help="comma-separated parts")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "hotpath_ab.json"))
    args = ap.parse_args()
    parts = set(args.only.split(","))
    trees = {"base": os.path.abspath(args.base), "new": ROOT}
    runs: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)
        print(f"  {name:<40} {value:10.2f}", flush=True)

    for rep in range(args.reps):
        print(f"repetition {rep + 1}/{args.reps}", flush=True)
        if "bandwidth" in parts:
            for size, streams in ((65536, 1), (1 << 20, 1), (4 << 20, 1), (1 << 20, 4)):
                for who, tree in trees.items():
                    note(f"bw {size >> 10}K x{streams} {who}", bandwidth(tree, size, streams, args.duration))
                note(f"bw {size >> 10}K x{streams} iperf3", iperf3_gbps(size, streams, args.duration))
        if "latency" in parts:
            for progress in ("event", "poll"):
                for who, tree in trees.items():
                    note(f"lat 64B {progress} {who}", latency(tree, progress))
            note("lat 64B sockperf", sockperf_p50_us(64, args.duration))
        if "channel" in parts:
            for progress in ("event", "poll"):
                for who, tree in trees.items():
                    for key, value in channel(tree, progress).items():
                        note(f"{key} {progress} {who}", value)
        if "demo" in parts:
            for who, tree in trees.items():
                for key, value in demo(tree).items():
                    note(f"demo {key} {who}", value)

    print(f"\n{'figure':<40} {'median':>10}  range   ({args.reps} interleaved repetitions)")
    for name, values in runs.items():
        print(f"{name:<40} {statistics.median(values):10.2f}  {min(values):.2f}-{max(values):.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": os.uname().nodename,
                   "cpus": os.cpu_count(), "base": trees["base"], "runs": runs}, f, indent=1)
    print(f"raw runs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
