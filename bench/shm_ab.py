#!/usr/bin/env python3
"""The shm transport against a memcpy ceiling and tcp loopback (issue 13), interleaved.

Each repetition runs, in turn:

  memcpy S          one thread copying S bytes between two buffers (numpy copyto), Gb/s: the ceiling
  memcpy-window S   the same over an 8 MiB window of buffers (source and target out of cache)
  shm S / tcp S     lamina-bench bandwidth --loopback -s S --transport shm|tcp (one stream; the write
                    loop in C, as perftest's; writes over 2 KiB all to one target buffer, as perftest's
                    ib_write_bw places them): against memcpy S
  shm-window S      the same shm run with --cycle-buffer 8M (the writes cycle over 8 MiB of targets):
                    against memcpy-window S
  shm python-loop S the same shm run with --loop python (every write posted from Python)
  latency           lamina-bench latency --loopback -s 64 --transport shm|tcp, event and poll progress: p50

so a load drift hits all alike. Prints medians, ranges and the issue's ratios (shm / memcpy bandwidth,
shm / tcp 64 B round trip) and writes the raw runs as JSON (--out). Nothing here passes or fails;
record what it prints in bench/RESULTS.md with the date and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memcpy_gbps(size: int, seconds: float) -> float:
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    copies, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(max(1, (16 << 20) // size)):
            np.copyto(dst, src)
            copies += 1
    return copies * size * 8 / (time.perf_counter() - start) / 1e9


def memcpy_window_gbps(size: int, seconds: float, window: int = 8 << 20) -> float:
    """The same copies over an 8 MiB window of buffers, source and target (what ``shm-window``'s writes
    cycle over): what one copying core does once the data no longer stays in cache."""
    slots = max(1, window // size)
    src = np.random.default_rng(0).integers(0, 256, (slots, size), dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copies, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.copyto(dst[copies % slots], src[copies % slots])
        copies += 1
    return copies * size * 8 / (time.perf_counter() - start) / 1e9


def _bench(mode: str, args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        out = subprocess.run([sys.executable, "-m", "lamina_comm.bench.cli", mode, "--loopback", "--quiet", *args,
                              "--out_json", f.name], capture_output=True, text=True, timeout=600, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"lamina-bench {mode} {args} failed:\n{out.stderr[-2000:]}")
        return json.load(open(f.name))["results"][0]


def bandwidth_gbps(transport: str, size: int, seconds: float, loop: str = "native",
                   cycle_buffer: int = 4096) -> float:
    return _bench("bandwidth", ["--transport", transport, "-s", str(size), "-D", str(seconds),
                                "--loop", loop, "--cycle-buffer", str(cycle_buffer)])["bw_avg_gbps"]


def latency_p50_us(transport: str, progress: str) -> float:
    return _bench("latency", ["--transport", transport, "-s", "64", "-n", "20000", "--progress", progress])["p50_us"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sizes", default="65536,1048576,4194304")
    p.add_argument("--seconds", type=float, default=2.0, help="per bandwidth run")
    p.add_argument("--out", help="raw runs as JSON")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs: dict[str, list[float]] = {}
    for rep in range(args.reps):
        for size in sizes:
            for name, measure in ((f"memcpy {size}", lambda: memcpy_gbps(size, args.seconds)),
                                  (f"memcpy-window {size}", lambda: memcpy_window_gbps(size, args.seconds)),
                                  (f"shm {size}", lambda: bandwidth_gbps("shm", size, args.seconds)),
                                  (f"shm-window {size}",
                                   lambda: bandwidth_gbps("shm", size, args.seconds, cycle_buffer=8 << 20)),
                                  (f"shm python-loop {size}",
                                   lambda: bandwidth_gbps("shm", size, args.seconds, "python")),
                                  (f"tcp {size}", lambda: bandwidth_gbps("tcp", size, args.seconds))):
                runs.setdefault(name, []).append(measure())
        for transport in ("shm", "tcp"):
            for progress in ("event", "poll"):
                runs.setdefault(f"latency {transport} {progress}", []).append(latency_p50_us(transport, progress))
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    med = {name: statistics.median(values) for name, values in runs.items()}
    print(f"{'figure':28s} {'median':>10s} {'min':>10s} {'max':>10s}")
    for name, values in runs.items():
        unit = "us" if name.startswith("latency") else "Gb/s"
        print(f"{name:28s} {med[name]:10.2f} {min(values):10.2f} {max(values):10.2f}  {unit}")
    print()
    for size in sizes:
        print(f"bandwidth {size:>8d} B: shm / memcpy {med[f'shm {size}'] / med[f'memcpy {size}']:.2f}, "
              f"shm-window / memcpy-window {med[f'shm-window {size}'] / med[f'memcpy-window {size}']:.2f}, "
              f"shm / tcp {med[f'shm {size}'] / med[f'tcp {size}']:.2f}")
    for progress in ("event", "poll"):
        print(f"64 B round trip ({progress}): shm / tcp "
              f"{med[f'latency shm {progress}'] / med[f'latency tcp {progress}']:.2f}, "
              f"shm p50 {med[f'latency shm {progress}']:.2f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "medians": med, "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
