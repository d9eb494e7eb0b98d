"""lamina-bench engine: one layer's round trip through the engine API beside the bare channel, same run.

Two processes on loopback. Per layer the model side sends q/k/v of one
attention rank's head share and takes the attention output back into its
own tensor; the attention side answers at once (no compute: this measures
what the API costs per layer, not attention).

  engine   RemoteAttention.buffers + send (q/k/v computed into the slots: no
           copy), AttentionService.recv, LayerRequest.output + respond, and
           RemoteAttention.recv_into the caller's tensor (one copy out);
  channel  the same bytes and the same copy out with Channel.send_buffers /
           send / recv / release on both sides, no engine layer.

Blocks of the two alternate (--rounds), so drift on the machine hits both.
Target (issue 12): engine p50 <= 1.1 x channel p50. --out_json writes
{"results": [{"tokens", "request_bytes", "response_bytes", "engine_rtt_p50_us",
"channel_rtt_p50_us", "ratio_p50", ...}]}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from typing import Any

import numpy as np

from .. import transport as tr
from ..channel import Channel, ChannelListener

WARMUP = 100


def _shape(args: argparse.Namespace) -> Any:
    from ..engine import AttentionShape
    return AttentionShape(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                          max_tokens=max(args.tokens), dtype=args.dtype, microbatches=1)


def _responder(conn: Any, args: argparse.Namespace) -> None:
    import torch

    from ..engine import AttentionService
    torch.set_num_threads(1)
    shape = _shape(args)
    per_block = args.iters + WARMUP
    with tr.Context(args.transport, progress=args.progress) as ctx, \
            AttentionService(ctx, shape, rank=0, ranks=1) as service:
        chans = ChannelListener(ctx, ("127.0.0.1", 0), shape.channel_spec(0, 1), piggyback_credits=True)
        conn.send((service.address, chans.address[1]))
        service.accept(1, timeout=30)
        with chans.accept(timeout=30) as ch:
            for _ in args.tokens:
                for _ in range(args.rounds):
                    for _ in range(per_block):  # engine block
                        request = service.recv(timeout=30)
                        request.output()
                        request.respond()
                    for _ in range(per_block):  # channel block
                        with ch.recv(microbatch=0, timeout=30) as message:
                            q = message.tensors[0]
                            layer = message.layer
                        (out,) = ch.send_buffers(0, [q.shape], shape.dtype, as_torch=True)
                        ch.send([out], layer=layer, microbatch=0)
            ch.flush()
            service.channels[0].flush(30)
            # Open until the client's last writes (its credits) are acknowledged: it says so once flushed.
            conn.recv()
        chans.close()


def run_engine_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..engine import RemoteAttention
    torch.set_num_threads(1)
    shape = _shape(args)
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    responder = mp.Process(target=_responder, args=(child, args), daemon=True)
    responder.start()
    rows = []
    try:
        if not parent.poll(60):
            raise SystemExit("lamina-bench engine: the responder did not start")
        service_address, chan_port = parent.recv()
        with tr.Context(args.transport, progress=args.progress) as ctx, \
                RemoteAttention(ctx, [service_address], shape) as remote, \
                Channel.connect(ctx, ("127.0.0.1", chan_port), shape.channel_spec(0, 1),
                                piggyback_credits=True) as ch:
            for tokens in args.tokens:
                engine_ns, channel_ns = [], []
                out = torch.empty(tokens, shape.num_heads, shape.head_dim, dtype=getattr(torch, shape.dtype))
                for _ in range(args.rounds):
                    engine_ns.append(_engine_block(remote, out, tokens, args.iters))
                    channel_ns.append(_channel_block(ch, shape, out, tokens, args.iters))
                rows.append(_row(shape, tokens, np.concatenate(engine_ns), np.concatenate(channel_ns)))
            transport_name, progress = ch.endpoint.transport, ctx.progress
            ch.flush(30)
            remote.flush(30)
            parent.send("done")  # our writes are all acknowledged: the responder may close
    finally:
        responder.join(10)
        if responder.is_alive():
            responder.kill()
    return {"test": "engine", "transport": transport_name, "progress": progress,
            "shape": {"heads": shape.num_heads, "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                      "dtype": shape.dtype}, "rounds": args.rounds, "results": rows,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _engine_block(remote: Any, out: Any, tokens: int, iters: int) -> np.ndarray:
    rtts = np.empty(iters, dtype=np.int64)
    for i in range(iters + WARMUP):
        t0 = time.perf_counter_ns()
        buffers = remote.buffers(0, tokens)  # a model tier computes q/k/v into these
        remote.send(buffers, layer=i & 0xFFFF, microbatch=0)
        remote.recv_into(out, layer=i & 0xFFFF, microbatch=0)
        if i >= WARMUP:
            rtts[i - WARMUP] = time.perf_counter_ns() - t0
    return rtts


def _channel_block(ch: Channel, shape: Any, out: Any, tokens: int, iters: int) -> np.ndarray:
    d, dtype = shape.head_dim, shape.dtype
    shapes = [(tokens, shape.num_heads, d), (tokens, shape.num_kv_heads, d), (tokens, shape.num_kv_heads, d)]
    rtts = np.empty(iters, dtype=np.int64)
    for i in range(iters + WARMUP):
        t0 = time.perf_counter_ns()
        views = ch.send_buffers(0, shapes, dtype, as_torch=True)
        ch.send(views, layer=i & 0xFFFF, microbatch=0)
        with ch.recv(microbatch=0) as message:
            out.copy_(message.torch()[0])
        if i >= WARMUP:
            rtts[i - WARMUP] = time.perf_counter_ns() - t0
    return rtts


def _row(shape: Any, tokens: int, engine_ns: np.ndarray, channel_ns: np.ndarray) -> dict[str, Any]:
    itemsize = np.dtype("float16" if shape.dtype == "bfloat16" else shape.dtype).itemsize
    request = tokens * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim * itemsize
    row = {"tokens": tokens, "iterations": int(engine_ns.size), "request_bytes": request,
           "response_bytes": tokens * shape.num_heads * shape.head_dim * itemsize}
    for name, values in (("engine", engine_ns), ("channel", channel_ns)):
        row[f"{name}_rtt_p50_us"] = float(np.percentile(values, 50)) / 1e3
        row[f"{name}_rtt_p99_us"] = float(np.percentile(values, 99)) / 1e3
    row["ratio_p50"] = row["engine_rtt_p50_us"] / row["channel_rtt_p50_us"]
    return row


def format_report(report: dict[str, Any]) -> str:
    shape = report["shape"]
    line = "-" * 112
    out = [f" lamina-bench engine: transport={report['transport']} progress={report['progress']} heads "
           f"{shape['heads']}/{shape['kv_heads']} x {shape['head_dim']} {shape['dtype']}, {report['rounds']} "
           f"alternating rounds (layer round trips, usec)", line,
           f" {'#tokens':<9} {'q/k/v bytes':<13} {'out bytes':<11} {'engine p50':<12} {'engine p99':<12} "
           f"{'channel p50':<13} {'channel p99':<13} {'engine/channel p50'}"]
    for r in report["results"]:
        out.append(f" {r['tokens']:<9} {r['request_bytes']:<13} {r['response_bytes']:<11} "
                   f"{r['engine_rtt_p50_us']:<12.2f} {r['engine_rtt_p99_us']:<12.2f} {r['channel_rtt_p50_us']:<13.2f} "
                   f"{r['channel_rtt_p99_us']:<13.2f} {r['ratio_p50']:.3f}")
    out.append(line)
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 16],
                   help="tokens per micro-batch, comma-separated (default 1,16)")
    p.add_argument("--heads", type=int, default=8, help="query heads of the attention rank's share")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float16")
    p.add_argument("-n", "--iters", type=int, default=2000, help="layer round trips per round (after 100 warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="alternating engine/channel blocks")
    p.add_argument("--transport", choices=tr.TRANSPORT_CHOICES, default="auto")
    from .perf import add_progress_argument
    add_progress_argument(p)
    p.add_argument("--out_json", "--out-json", dest="out_json", default=None)


def run(args: argparse.Namespace) -> int:
    if not args.tokens or min(args.tokens) < 1 or args.iters < 1 or args.rounds < 1:
        raise SystemExit("lamina-bench engine: --tokens, --iters and --rounds must be >= 1")
    report = run_engine_bench(args)
    print(format_report(report))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
