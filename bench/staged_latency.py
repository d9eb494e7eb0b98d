"""One-way latency of the GPU tier's message paths with no GPU, JSON on stdout:

* default: a StagedLink over tcp loopback with HostCopyEngine (host memory as the device): the staging
  protocol's own cost. The p50 of `--iters` ping-pongs per size and engine mode ("inline": copies done
  by the caller, as an instant copy engine; "threads": copies and the posts behind them on two worker
  threads, as streams).
* `--channel`: a channel carrying CUDA memory stream-ordered, beside host memory (the device check's
  `latency_channel` rows), against the mock driver: what it measures is our own per-message work
  (Python, ctypes, the native post), the copies being host memcpy.

    PYTHONPATH=. python bench/staged_latency.py [--iters 1000]
    gcc -shared -fPIC -O1 -o /tmp/mock/libcuda.so.1 tests/mock_libcuda.c -lpthread
    LAMINA_LIBCUDA=/tmp/mock/libcuda.so.1 PYTHONPATH=. python bench/staged_latency.py --channel

Run each in `unshare -n` (a private loopback). To compare two trees, run it from each (each with its
own build), alternating (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lamina_comm.gpu import HostCopyEngine  # noqa: E402
from tools import device_check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--channel", action="store_true", help="channel rows (CUDA memory: the mock driver)")
    args = parser.parse_args()
    out = {}
    for n in (64, 65536):
        if args.channel:
            out[f"{n}B-gpu"] = device_check.latency_channel(n, args.iters, on_gpu=True)["p50_us"]
            out[f"{n}B-host"] = device_check.latency_channel(n, args.iters, on_gpu=False)["p50_us"]
            continue
        for mode in ("inline", "threads"):
            lat = device_check.latency_staged(lambda: HostCopyEngine(asynchronous=mode == "threads"),
                                              lambda m: np.zeros(m, np.uint8), n, args.iters)
            out[f"{n}B-{mode}"] = lat["p50_us"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
