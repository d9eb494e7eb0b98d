"""One-way latency of a channel carrying CUDA memory stream-ordered, beside host memory (the device
check's `latency_channel` rows), JSON on stdout. Without a GPU, run it against the mock driver: what it
measures then is our own per-message work (Python, ctypes, the native post), the copies being host
memcpy.

    gcc -shared -fPIC -O1 -o /tmp/mock/libcuda.so.1 tests/mock_libcuda.c -lpthread
    LAMINA_LIBCUDA=/tmp/mock/libcuda.so.1 unshare -n sh -c "ip link set lo up; python bench/channel_device_latency.py"

To compare two trees, run it from each (each with its own build), alternating (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import device_check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1000)
    args = parser.parse_args()
    out = {}
    for n in (64, 65536):
        out[f"{n}B-gpu"] = device_check.latency_channel(n, args.iters, on_gpu=True)["p50_us"]
        out[f"{n}B-host"] = device_check.latency_channel(n, args.iters, on_gpu=False)["p50_us"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
