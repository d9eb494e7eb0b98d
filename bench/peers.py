#!/usr/bin/env python3
"""lamina-bench side by side with real peers, in one run, on loopback.

  iperf3        TCP bandwidth, one stream and -P STREAMS
  sockperf      TCP ping-pong latency
  ucx_perftest  ucp_put_bw and ucp_am_lat over UCX's tcp transport (UCX_TLS=tcp)
  lamina-bench  bandwidth / latency with the same sizes, streams and durations

Prints each lamina figure as a ratio to each peer's and writes the raw
numbers as JSON (--out). Targets (issue 2): bandwidth >= 0.95 x iperf3 at
>= 1 MiB with the same streams; 64 B latency p50 <= 1.1 x sockperf p50; both
ahead of ucx_perftest over tcp. Nothing here is a pass/fail test: the
numbers depend on the machine; record them in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A peer's server process, stopped on exit."""

    def __init__(self, cmd: list[str], env: dict | None = None, settle: float = 0.5):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})})
        time.sleep(settle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run(cmd: list[str], env: dict | None = None, timeout: float = 300) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-500:]}")
    return out.stdout


def iperf3_gbps(size: int, streams: int, seconds: float) -> float:
    port = free_port()
    with Server(["iperf3", "-s", "-1", "-p", str(port)]):
        # iperf3 caps its buffer at 1 MiB; beyond that it streams 1 MiB writes.
        out = run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                   "-l", str(min(size, 1 << 20)), "-P", str(streams), "-J"])
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def sockperf_p50_us(size: int, seconds: float) -> float:
    port = free_port()
    with Server(["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(port)], settle=1.0):
        out = run(["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port), "-m", str(size),
                   "-t", str(seconds)])
    m = re.search(r"percentile 50\.000 =\s+([\d.]+)", out)
    return float(m.group(1))


UCX_ENV = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}


def ucx_final(test: str, size: int, iters: int) -> list[float]:
    port = free_port()
    with Server(["ucx_perftest", "-p", str(port)], env=UCX_ENV, settle=1.0):
        out = run(["ucx_perftest", "127.0.0.1", "-p", str(port), "-t", test, "-s", str(size), "-n", str(iters)],
                  env=UCX_ENV)
    final = [line for line in out.splitlines() if line.strip().startswith("Final:")]
    if not final:
        raise RuntimeError(f"ucx_perftest printed no Final line:\n{out[-800:]}")
    # Final: iters, latency typical/avg/overall (usec), bandwidth avg/overall (MB/s), msgrate avg/overall
    return [float(x) for x in final[-1].split()[1:]]


def median_of(reps: int, *measures) -> list[float]:
    """Run each measure in turn, reps times (interleaved, so load drifts hit all
    alike), and return the median of each."""
    runs: list[list[float]] = [[] for _ in measures]
    for _ in range(reps):
        for i, m in enumerate(measures):
            runs[i].append(m())
    return [statistics.median(r) for r in runs]


def lamina(mode: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        # tcp against TCP peers: "auto" would take shm, both ends being on this host.
        run([sys.executable, "-m", "lamina_comm.bench.cli", mode, "--loopback", "--quiet", "--transport", "tcp",
             "--out_json", f.name, *extra])
        return json.load(open(f.name))["results"][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1048576,4194304", help="bandwidth message sizes (bytes)")
    ap.add_argument("--streams", type=int, default=4, help="parallel streams for the -P comparison")
    ap.add_argument("-D", "--duration", type=float, default=5.0)
    ap.add_argument("--lat-size", type=int, default=64)
    ap.add_argument("--lat-iters", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "peers.json"))
    args = ap.parse_args()
    missing = [t for t in ("iperf3", "sockperf", "ucx_perftest") if not shutil.which(t)]
    if missing:
        print(f"peers.py: missing {', '.join(missing)} (apt install iperf3 sockperf ucx-utils)", file=sys.stderr)
        return 2
    results: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "bandwidth": [], "latency": {}}
    print(f"{'test':<36} {'lamina':>10} {'peer':>10} {'ratio':>7}   (median of {args.reps})")

    def show(name: str, ours: float, peer: float) -> None:
        print(f"{name:<36} {ours:>10.2f} {peer:>10.2f} {ours / peer:>7.2f}", flush=True)

    for size in [int(s) for s in args.sizes.split(",")]:
        for streams in (1, args.streams):
            ours, ip = median_of(
                args.reps,
                lambda: lamina("bandwidth", ["-s", str(size), "-D", str(args.duration),
                                             "-q", str(streams)])["bw_avg_gbps"],
                lambda: iperf3_gbps(size, streams, args.duration))
            row = {"bytes": size, "streams": streams, "lamina_gbps": ours, "iperf3_gbps": ip}
            show(f"bw {size} B x{streams} vs iperf3 [Gb/s]", ours, ip)
            if streams == 1:
                (ucx,) = median_of(args.reps, lambda: ucx_final("ucp_put_bw", size, 2000)[4] * 2**20 * 8 / 1e9)
                row["ucx_put_bw_gbps"] = ucx
                show(f"bw {size} B vs ucx put_bw [Gb/s]", ours, ucx)
            results["bandwidth"].append(row)
    n = str(args.lat_iters)
    native, python, sp, ucx_lat = median_of(
        args.reps,
        lambda: lamina("latency", ["-s", str(args.lat_size), "-n", n])["p50_us"],
        lambda: lamina("latency", ["-s", str(args.lat_size), "-n", n, "--loop", "python"])["p50_us"],
        lambda: sockperf_p50_us(args.lat_size, args.duration),
        lambda: ucx_final("ucp_am_lat", args.lat_size, args.lat_iters)[1])  # 50th percentile column
    results["latency"] = {"bytes": args.lat_size, "lamina_native_p50_us": native,
                          "lamina_python_p50_us": python, "sockperf_p50_us": sp, "ucx_am_lat_p50_us": ucx_lat}
    show(f"lat {args.lat_size} B p50 vs sockperf [us]", native, sp)
    show(f"lat {args.lat_size} B p50 (python loop) vs sockperf", python, sp)
    show(f"lat {args.lat_size} B p50 vs ucx am_lat [us]", native, ucx_lat)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"raw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
