"""lamina-bench channel: message round trip through channels beside the raw transport.

Two processes on loopback (or two network namespaces' worth of nothing: this
is a per-message cost measurement, not a bandwidth one). The responder
process serves, in one run and for the same sizes:

  transport  lm_bench_pingpong: a write-with-immediate of S bytes each way,
             the loop in C (the floor: what the transport itself costs);
  native     lm_bench_chan_pingpong: the channel exchange below, the loop in
             C (what the native channel adds to the transport);
  channel    Channel.send of one S-byte tensor from a send slot (zero copy),
             the peer's Channel.recv, its reply of S bytes the same way, and
             the release of both slots (credits piggybacked by default);
             channel - native is what the Python layer costs.

Columns are round trips (not halves), perftest-style; --out_json writes
{"results": [{"bytes", "channel_rtt_p50_us", "transport_rtt_p50_us",
"native_channel_rtt_p50_us", "channel_rtt_p99_us", "transport_rtt_p99_us",
"ratio_p50", "native_ratio_p50", ...}]}. Target (issue 10): channel p50 <=
1.2 x transport p50 at 64 B and at 64 KiB.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

import numpy as np

from .. import transport as tr
from .._bindings import check, ffi, lib
from ..channel import Channel, ChannelListener, ChannelSpec
from .perf import add_progress_argument, parse_size

DEFAULT_SIZES = "64,64K"
WARMUP = 200
_TIMEOUT_MS = 30_000


def _spec(max_bytes: int) -> ChannelSpec:
    # One uint8 tensor per message: the shape fields are minimal, the room is extra_bytes.
    return ChannelSpec(max_tokens=1, hidden=1, heads=1, kv_heads=1, head_dim=1, dtype="uint8",
                       microbatches=1, slots_per_microbatch=2, extra_bytes=max_bytes)


def _responder(conn: Any, sizes: list[int], iters: int, transport: str, progress: str | None,
               piggyback: bool) -> None:
    """Child process: answer the transport ping-pong, then echo channel messages."""
    with tr.Context(transport, progress=progress) as ctx:
        buf = np.zeros(max(sizes), np.uint8)
        mr = ctx.register(buf)
        raw = ctx.listen(("127.0.0.1", 0))
        chans = ChannelListener(ctx, ("127.0.0.1", 0), _spec(max(sizes)), piggyback_credits=piggyback)
        conn.send((raw.address[1], chans.address[1]))
        ep = raw.accept(timeout=30, private_data=mr.descriptor().to_bytes())
        remote = tr.RemoteRegion.from_bytes(ep.peer_data)
        for size in sizes:
            check(lib.lm_bench_pingpong(ctx._handle(), ep._handle(), mr._handle(), remote._native, size,
                                        iters + WARMUP, 0, _TIMEOUT_MS, ffi.NULL), "transport responder")
        with chans.accept(timeout=30) as ch:
            region = ffi.cast("void *", ch._buf.ctypes.data)
            for size in sizes:
                check(lib.lm_bench_chan_pingpong(ch._handle(), region, size, iters + WARMUP, 0, _TIMEOUT_MS,
                                                 ffi.NULL), "native channel responder")
            for size in sizes:
                for _ in range(iters + WARMUP):
                    with ch.recv(microbatch=0) as request:
                        layer = request.layer
                    (out,) = ch.send_buffers(0, [(size,)], "uint8")
                    ch.send([out], layer=layer, microbatch=0)
            ch.flush()
            conn.send("done")
            # The channel stays open until the initiator's own flush is done: its last credit writes
            # complete only once this side acknowledged them (closing first failed them: peer lost).
            conn.poll(30)
        ep.close()
        chans.close()
        raw.close()


def _transport_rtts(ctx: tr.Context, ep: tr.Endpoint, mr: tr.MemoryRegion, remote: tr.RemoteRegion,
                    size: int, iters: int) -> np.ndarray:
    rtt = ffi.new("uint64_t[]", iters + WARMUP)
    check(lib.lm_bench_pingpong(ctx._handle(), ep._handle(), mr._handle(), remote._native, size,
                                iters + WARMUP, 1, _TIMEOUT_MS, rtt), "transport ping-pong")
    return np.frombuffer(ffi.buffer(rtt), dtype=np.uint64)[WARMUP:].astype(np.int64)


def _native_channel_rtts(ch: Channel, size: int, iters: int) -> np.ndarray:
    rtt = ffi.new("uint64_t[]", iters + WARMUP)
    check(lib.lm_bench_chan_pingpong(ch._handle(), ffi.cast("void *", ch._buf.ctypes.data), size, iters + WARMUP,
                                     1, _TIMEOUT_MS, rtt), "native channel ping-pong")
    return np.frombuffer(ffi.buffer(rtt), dtype=np.uint64)[WARMUP:].astype(np.int64)


def _channel_rtts(ch: Channel, size: int, iters: int) -> np.ndarray:
    rtts = np.empty(iters, dtype=np.int64)
    for i in range(iters + WARMUP):
        t0 = time.perf_counter_ns()
        (payload,) = ch.send_buffers(0, [(size,)], "uint8")
        ch.send([payload], layer=i & 0xFFFF, microbatch=0)
        with ch.recv(microbatch=0):
            pass
        if i >= WARMUP:
            rtts[i - WARMUP] = time.perf_counter_ns() - t0
    return rtts


def _row(size: int, iters: int, channel_ns: np.ndarray, transport_ns: np.ndarray,
         native_ns: np.ndarray) -> dict[str, Any]:
    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) / 1e3

    row = {"bytes": size, "iterations": iters,
           "channel_rtt_p50_us": pct(channel_ns, 50), "channel_rtt_p99_us": pct(channel_ns, 99),
           "channel_rtt_min_us": float(channel_ns.min()) / 1e3,
           "transport_rtt_p50_us": pct(transport_ns, 50), "transport_rtt_p99_us": pct(transport_ns, 99),
           "transport_rtt_min_us": float(transport_ns.min()) / 1e3,
           "native_channel_rtt_p50_us": pct(native_ns, 50), "native_channel_rtt_p99_us": pct(native_ns, 99)}
    row["ratio_p50"] = row["channel_rtt_p50_us"] / row["transport_rtt_p50_us"]
    row["native_ratio_p50"] = row["native_channel_rtt_p50_us"] / row["transport_rtt_p50_us"]
    return row


def run_channel_bench(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    if not sizes or min(sizes) < 1:
        raise SystemExit("lamina-bench channel: --sizes needs sizes >= 1 B")
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    responder = mp.Process(target=_responder, args=(child, sizes, args.iters, args.transport, args.progress,
                                                    not args.no_piggyback), daemon=True)
    responder.start()
    rows = []
    try:
        if not parent.poll(60):
            raise SystemExit("lamina-bench channel: the responder did not start")
        raw_port, chan_port = parent.recv()
        with tr.Context(args.transport, progress=args.progress) as ctx:
            buf = np.zeros(max(sizes), np.uint8)
            mr = ctx.register(buf)
            ep = ctx.connect(("127.0.0.1", raw_port), private_data=mr.descriptor().to_bytes(), timeout=30)
            remote = tr.RemoteRegion.from_bytes(ep.peer_data)
            transport_ns = {size: _transport_rtts(ctx, ep, mr, remote, size, args.iters) for size in sizes}
            with Channel.connect(ctx, ("127.0.0.1", chan_port), _spec(max(sizes)),
                                 piggyback_credits=not args.no_piggyback) as ch:
                native_ns = {size: _native_channel_rtts(ch, size, args.iters) for size in sizes}
                for size in sizes:
                    rows.append(_row(size, args.iters, _channel_rtts(ch, size, args.iters), transport_ns[size],
                                     native_ns[size]))
                ch.flush()
                if not parent.poll(30):
                    raise SystemExit("lamina-bench channel: the responder did not finish")
                parent.recv()
                parent.send("close")  # our writes are all acknowledged: the responder may close
            transport_name, progress = ep.transport, ctx.progress
            ep.close()
    finally:
        responder.join(10)
        if responder.is_alive():
            responder.kill()
    return {"test": "channel", "transport": transport_name, "progress": progress,
            "piggyback_credits": not args.no_piggyback, "results": rows,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def format_report(report: dict[str, Any]) -> str:
    line = "-" * 140
    out = [f" lamina-bench channel: transport={report['transport']} progress={report['progress']} "
           f"piggyback_credits={report['piggyback_credits']} (round trips, usec)", line,
           f" {'#bytes':<10} {'#iterations':<12} {'channel p50':<13} {'channel p99':<13} {'channel min':<13} "
           f"{'native p50':<12} {'transport p50':<15} {'transport p99':<15} {'channel/transport p50':<23}"
           f"{'native/transport p50'}"]
    for r in report["results"]:
        out.append(f" {r['bytes']:<10} {r['iterations']:<12} {r['channel_rtt_p50_us']:<13.2f} "
                   f"{r['channel_rtt_p99_us']:<13.2f} {r['channel_rtt_min_us']:<13.2f} "
                   f"{r['native_channel_rtt_p50_us']:<12.2f} "
                   f"{r['transport_rtt_p50_us']:<15.2f} {r['transport_rtt_p99_us']:<15.2f} {r['ratio_p50']:<23.2f}"
                   f"{r['native_ratio_p50']:.2f}")
    out.append(line)
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="message sizes, comma-separated (K/M suffixes)")
    p.add_argument("-n", "--iters", type=int, default=5000, help="round trips per size (after 200 warm-up)")
    p.add_argument("--transport", choices=tr.TRANSPORT_CHOICES, default="auto")
    add_progress_argument(p)
    p.add_argument("--no-piggyback", action="store_true",
                   help="write every credit on its own instead of in the next message's header")
    p.add_argument("--out_json", "--out-json", dest="out_json", default=None)


def run(args: argparse.Namespace) -> int:
    report = run_channel_bench(args)
    print(format_report(report))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="lamina-bench channel")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
