"""One-way latency of a StagedLink over tcp loopback with HostCopyEngine (host memory as the device):
the staging protocol's own cost, with no GPU. The p50 of `--iters` ping-pongs per size and engine mode
("inline": copies done by the caller, as an instant copy engine; "threads": copies and the posts behind
them on two worker threads, as streams). JSON on stdout.

    PYTHONPATH=. python bench/staged_latency.py [--iters 1000]

To compare two trees, run it from each (each with its own build), alternating (bench/RESULTS.md).
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
    args = parser.parse_args()
    out = {}
    for n in (64, 65536):
        for mode in ("inline", "threads"):
            lat = device_check.latency_staged(lambda: HostCopyEngine(asynchronous=mode == "threads"),
                                              lambda m: np.zeros(m, np.uint8), n, args.iters)
            out[f"{n}B-{mode}"] = lat["p50_us"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
