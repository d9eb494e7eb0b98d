"""`lamina-bench bandwidth` and `lamina-bench latency`, perftest-style.

As with ib_write_bw: the side started without a host is the server and keeps
serving one client after another; the client names the host. `--loopback`
runs a server process and the client in one command.

Bandwidth is measured where the data lands: the server timestamps every
write-with-immediate completion and reports, per message size, the bytes
and the time between the first and last arrival back to the client (with a
one-sided write into the client's result region), so a sender that merely
queued its writes measures nothing.

Latency is a ping-pong of writes with immediate; like ib_write_lat and
sockperf it reports half the round trip.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np

from .. import progress_bar
from .. import transport as tr
from .._bindings import check, ffi, lib
from ..errors import LaminaError, TimeoutError_

DEFAULT_PORT = 18515
# Where the writes go, as perftest's ib_write_bw places them: writes of at
# most half the cycle buffer advance through it (a page by default), larger
# ones all go to one buffer, from one buffer (iperf3 too sends from one
# buffer). The figure is then about the transport, not about the memory
# system missing its caches; --cycle-buffer 8M cycles 1 MiB writes over 8
# buffers, for the figure out of cache.
CYCLE_BUFFER = 4096
CYCLE_BUFFER_BOUNDS = (64, 1 << 30)  # what a server accepts (it allocates the cycle buffer)
ALL_SIZES = [2 ** k for k in range(1, 24)]  # 2 B .. 8 MiB, as perftest -a
RESULT = struct.Struct("<QQQQd")  # count, bytes, first_ns, last_ns, peak bytes/s
END_FLAG = 0x80000000
DONE_FLAG = 0x40000000


@dataclasses.dataclass
class Config:
    mode: str                 # "bandwidth" | "latency"
    sizes: list[int]
    iterations: int
    duration: float | None
    streams: int
    depth: int
    transport: str
    loop: str = "native"      # "native" (the C loop, as perftest's) or "python" (through the API)
    cycle_buffer: int = CYCLE_BUFFER  # bytes the writes advance through (see CYCLE_BUFFER)

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Config":
        d = json.loads(data.decode())
        try:
            cfg = cls(**d)
        except TypeError as exc:  # unknown or missing fields: another version, or not a client of ours
            raise ValueError(f"bad benchmark request: {exc}") from None
        numbers = [*cfg.sizes, cfg.iterations, cfg.streams, cfg.depth, cfg.cycle_buffer] \
            if isinstance(cfg.sizes, list) else [None]
        if not all(type(n) is int for n in numbers) or \
                not (cfg.duration is None or type(cfg.duration) in (int, float)):
            raise ValueError("bad benchmark request: sizes, counts and the cycle buffer are integers")
        if cfg.mode not in ("bandwidth", "latency") or not cfg.sizes or max(cfg.sizes) > 1 << 30 \
                or cfg.loop not in ("native", "python"):
            raise ValueError("bad benchmark request")
        low, high = CYCLE_BUFFER_BOUNDS
        if not 0 <= cfg.depth <= 4096 or not 1 <= cfg.streams <= 64 or not low <= cfg.cycle_buffer <= high:
            raise ValueError("bad benchmark request")
        return cfg


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, mult in (("K", 1024), ("M", 1024 ** 2), ("G", 1024 ** 3)):
        if text.endswith(suffix) or text.endswith(suffix + "B"):
            return int(float(text.rstrip("B")[:-1]) * mult)
    return int(text)


# --------------------------------------------------------------------------- server

def depth_for(size: int, depth: int) -> int:
    """The depth asked for, else perftest's 128 writes in flight capped at 16 MiB:
    over tcp the socket buffers are the real queue and a deeper one only spills
    the caches (measured: 1 MiB writes ran at 13 Gb/s with 128 in flight, 18.6
    with 16, same machine, same run)."""
    return depth or max(2, min(128, (16 << 20) // max(size, 1)))


def window_slots(size: int, depth: int, cycle_buffer: int = CYCLE_BUFFER) -> int:
    """Target slots the writes of ``size`` cycle over: one above half the cycle buffer (perftest)."""
    if size > cycle_buffer // 2:
        return 1
    return max(1, min(depth_for(size, depth), cycle_buffer // max(size, 1)))


def _recv_buffer_bytes(cfg: Config) -> int:
    if cfg.mode == "latency":
        return max(cfg.sizes)
    return max(size * window_slots(size, cfg.depth, cfg.cycle_buffer) for size in cfg.sizes)


class _Session:
    """One client's connection(s) on the server."""

    def __init__(self, ctx: tr.Context, cfg: Config):
        self.cfg = cfg
        # Context.alloc: shm writes into it take one copy (the peer maps it), as a receiver would set it up.
        self.mr = ctx.alloc(_recv_buffer_bytes(cfg))
        self.result = np.zeros(RESULT.size, np.uint8)
        self.result_mr = ctx.register(self.result, tr.Access.LOCAL_WRITE)
        self.endpoints: list[tr.Endpoint] = []
        self.client_desc: list[tr.RemoteRegion] = []

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
        self.mr.close()
        self.result_mr.close()


def serve(ctx: tr.Context, port: int, once: bool = False, host: str = "0.0.0.0",
          ready=None) -> None:
    listener = ctx.listen((host, port))
    if ready:
        ready(listener.address[1])
    while True:
        session = None
        try:
            session = _accept_session(ctx, listener)
            if session.cfg.mode == "bandwidth":
                _serve_bandwidth(session)
            else:
                _serve_latency(session)
        except (LaminaError, OSError, ValueError) as exc:
            print(f"lamina-bench server: client dropped: {exc}", file=sys.stderr)
        finally:
            if session:
                session.close()
        if once:
            return


def _accept_session(ctx: tr.Context, listener: tr.Listener) -> _Session:
    holder: dict = {}

    def reply(peer_data: bytes) -> bytes:
        cfg = Config.from_bytes(peer_data[tr.RemoteRegion.SIZE:])
        if "session" not in holder:
            holder["session"] = _Session(ctx, cfg)
        return holder["session"].mr.descriptor().to_bytes()

    ep = listener.accept(private_data=reply)
    session: _Session = holder["session"]
    session.endpoints.append(ep)
    session.client_desc.append(tr.RemoteRegion.from_bytes(ep.peer_data[:tr.RemoteRegion.SIZE]))
    for _ in range(session.cfg.streams - 1):
        ep = listener.accept(timeout=10, private_data=reply)
        session.endpoints.append(ep)
        session.client_desc.append(tr.RemoteRegion.from_bytes(ep.peer_data[:tr.RemoteRegion.SIZE]))
    return session


def _serve_bandwidth(s: _Session) -> None:
    ctx = s.endpoints[0].context
    for size_idx, size in enumerate(s.cfg.sizes):
        stamps: list[int] = []
        total = 0
        ended = 0
        while ended < len(s.endpoints):
            for c in ctx.wait(timeout=30):
                if c.op != tr.Op.RECV_IMM:
                    continue
                if c.imm & END_FLAG:
                    ended += 1
                    continue
                stamps.append(time.perf_counter_ns())
                total += c.byte_len
            if not stamps and ended == 0 and any(ep.error for ep in s.endpoints):
                raise TimeoutError_("client vanished")
        ts = np.asarray(stamps, dtype=np.int64)
        count = len(ts)
        first, last = (int(ts[0]), int(ts[-1])) if count else (0, 0)
        peak = _peak_rate(ts, size)
        s.result[:] = np.frombuffer(RESULT.pack(count, total, first, last, peak), np.uint8)
        s.endpoints[0].write(s.result_mr, s.client_desc[0], imm=DONE_FLAG | size_idx)
        # The client may close as soon as the result lands: its status is not ours to judge.
        s.endpoints[0].wait_one(timeout=30)


def _peak_rate(ts: np.ndarray, size: int) -> float:
    """Best bytes/s over ten equal time slices of the run. Completions reach Python in
    batches, so per-message gaps (perftest's peak) would be meaningless here; runs
    shorter than 50 ms report no peak (0)."""
    if len(ts) < 20 or ts[-1] - ts[0] < 50_000_000:
        return 0.0
    edges = np.linspace(ts[0], ts[-1], 11)
    counts, _ = np.histogram(ts, bins=edges)
    return float(counts.max() * size / ((edges[1] - edges[0]) / 1e9))


LATENCY_WARMUP = 100


def _serve_latency(s: _Session) -> None:
    ep, remote = s.endpoints[0], s.client_desc[0]
    if s.cfg.loop == "native":
        for size in s.cfg.sizes:
            rc = lib.lm_bench_pingpong(ep.context._handle(), ep._handle(), s.mr._handle(), remote._native,
                                       size, s.cfg.iterations + LATENCY_WARMUP, 0, 30000, ffi.NULL)
            check(rc, "latency responder")
        return
    for size in s.cfg.sizes:
        while True:
            c = ep.wait_one(timeout=30)
            if c.op == tr.Op.WRITE:
                c.raise_for_status()
                continue
            if c.op != tr.Op.RECV_IMM:
                raise TimeoutError_(f"unexpected completion {c}")
            if c.imm & END_FLAG:
                break
            ep.write(s.mr, remote, length=size, imm=c.imm)


# --------------------------------------------------------------------------- client

@dataclasses.dataclass
class Client:
    ctx: tr.Context
    cfg: Config
    host: str
    port: int

    def __post_init__(self):
        self.src = np.random.default_rng(0).integers(0, 256, _recv_buffer_bytes(self.cfg), dtype=np.uint8)
        self.src_mr = self.ctx.register(self.src)
        # The server writes results (bandwidth) or pongs (latency) here.
        self.inbox_mr = self.ctx.alloc(max(RESULT.size, max(self.cfg.sizes)))
        hello = self.inbox_mr.descriptor().to_bytes() + self.cfg.to_bytes()
        self.endpoints = [self.ctx.connect((self.host, self.port), private_data=hello, timeout=15)
                          for _ in range(self.cfg.streams)]
        self.remote = [tr.RemoteRegion.from_bytes(ep.peer_data) for ep in self.endpoints]

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
        self.src_mr.close()
        self.inbox_mr.close()


def run_bandwidth(client: Client, progress) -> list[dict]:
    cfg = client.cfg
    rows = []
    for idx, size in enumerate(cfg.sizes):
        n = cfg.iterations
        _send_stream_window(client, size, n, cfg.duration, progress)
        for ep, remote in zip(client.endpoints, client.remote):
            ep.write(client.src_mr, remote, length=0, imm=END_FLAG | idx)
        result = _await_result(client, idx)
        count, total, first, last, peak = result
        secs = (last - first) / 1e9 if last > first else float("nan")
        # Between first and last arrival count-1 messages landed (the first marks t0).
        avg = (total - total / max(count, 1)) / secs if count > 1 else float("nan")
        rows.append({"bytes": size, "iterations": count, "bw_peak_Bps": max(peak, avg),
                     "bw_avg_Bps": avg, "bw_avg_gbps": avg * 8 / 1e9,
                     "msg_rate_mpps": (count - 1) / secs / 1e6 if count > 1 else float("nan")})
        progress.row_done()
    return rows


def _send_stream_window(client: Client, size: int, n: int, duration: float | None, progress) -> None:
    """Keep `depth` writes in flight on every stream until n are sent (or the duration ends)."""
    cfg = client.cfg
    if cfg.loop == "native":
        progress.tick(_native_stream(client, size, n, duration))
        return
    eps, remotes = client.endpoints, client.remote
    depth = depth_for(size, cfg.depth)
    slots = window_slots(size, cfg.depth, cfg.cycle_buffer)
    inflight = [0] * len(eps)
    sent = [0] * len(eps)
    index = {ep.id: i for i, ep in enumerate(eps)}
    end = time.monotonic() + duration if duration else None
    target = n if not duration else 1 << 62
    while True:
        for i, ep in enumerate(eps):
            while inflight[i] < depth and sent[i] < target:
                slot = sent[i] % slots
                ep.write(client.src_mr, remotes[i], local_offset=slot * size, remote_offset=slot * size,
                         length=size, imm=sent[i] & 0xFFFFFF)
                inflight[i] += 1
                sent[i] += 1
        if end and time.monotonic() >= end:
            target = 0
        if all(s >= target for s in sent) and not any(inflight):
            return
        # One blocking wait for all streams: polling them in turn would spin a core
        # that the kernel needs for the copies.
        for c in client.ctx.wait(timeout=30):
            c.raise_for_status()
            if c.op == tr.Op.WRITE:
                inflight[index[c.endpoint.id]] -= 1
        progress.tick(sum(sent))


def _native_stream(client: Client, size: int, n: int, duration: float | None) -> int:
    """The same window of writes, kept full by the C loop (GIL released throughout); writes posted."""
    eps = client.endpoints
    handles = ffi.new("lm_ep_t *[]", [ep._handle() for ep in eps])
    ids = ffi.new("uint64_t[]", [ep.id for ep in eps])
    remotes = ffi.new("lm_rdesc_t[]", len(eps))
    for i, remote in enumerate(client.remote):
        remotes[i] = remote._native[0]
    sent = ffi.new("uint64_t[]", len(eps))
    cfg = client.cfg
    check(lib.lm_bench_stream(client.ctx._handle(), handles, ids, remotes, len(eps), client.src_mr._handle(), size,
                              depth_for(size, cfg.depth), window_slots(size, cfg.depth, cfg.cycle_buffer), n,
                              int((duration or 0) * 1e9), 30000, sent), "bandwidth stream")
    return sum(sent[i] for i in range(len(eps)))


def _await_result(client: Client, idx: int) -> tuple:
    ep = client.endpoints[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for c in ep.wait(timeout=1):
            if c.op == tr.Op.RECV_IMM and c.imm == DONE_FLAG | idx:
                return RESULT.unpack(client.inbox_mr.view()[:RESULT.size].tobytes())
            c.raise_for_status()
    raise TimeoutError_("server did not report the result")


def _native_latency(client: Client, size: int) -> np.ndarray:
    """Round trips in ns, measured by the C loop (GIL released throughout)."""
    ep, remote = client.endpoints[0], client.remote[0]
    n = client.cfg.iterations + LATENCY_WARMUP
    rtt = ffi.new("uint64_t[]", n)
    check(lib.lm_bench_pingpong(client.ctx._handle(), ep._handle(), client.src_mr._handle(), remote._native,
                                size, n, 1, 30000, rtt), "latency")
    return np.frombuffer(ffi.buffer(rtt), dtype=np.uint64)[LATENCY_WARMUP:].astype(np.int64)


def run_latency(client: Client, progress) -> list[dict]:
    cfg = client.cfg
    ep, remote = client.endpoints[0], client.remote[0]
    rows = []
    if cfg.loop == "native":
        for size in cfg.sizes:
            rows.append(_latency_row(size, _native_latency(client, size) / 2e3))
            progress.row_done()
        return rows
    for size in cfg.sizes:
        n = cfg.iterations
        rtts = np.empty(n, dtype=np.int64)
        warmup = LATENCY_WARMUP
        end = time.monotonic() + cfg.duration if cfg.duration else None
        done = 0
        for i in range(n + warmup):
            t0 = time.perf_counter_ns()
            ep.write(client.src_mr, remote, length=size, imm=i & 0xFFFFFF)
            while True:
                c = ep.wait_one(timeout=30)
                if c.op == tr.Op.RECV_IMM:
                    break
                c.raise_for_status()
            if i >= warmup:
                rtts[done] = time.perf_counter_ns() - t0
                done += 1
            progress.tick(i)
            if end and time.monotonic() >= end:
                break
        ep.write(client.src_mr, remote, length=0, imm=END_FLAG)
        half_us = rtts[:done] / 2e3
        rows.append(_latency_row(size, half_us))
        progress.row_done()
    return rows


def _latency_row(size: int, half_us: np.ndarray) -> dict:
    return {"bytes": size, "iterations": int(half_us.size), "t_min_us": float(half_us.min()),
            "t_max_us": float(half_us.max()), "t_typical_us": float(np.median(half_us)),
            "t_avg_us": float(half_us.mean()), "t_stdev_us": float(half_us.std()),
            "p50_us": float(np.percentile(half_us, 50)), "p99_us": float(np.percentile(half_us, 99)),
            "p99_9_us": float(np.percentile(half_us, 99.9))}


# --------------------------------------------------------------------------- output

class Progress:
    """The size sweep's progress bar (lamina_comm.progress: tqdm on a terminal, after two seconds)."""

    def __init__(self, enabled: bool, total_rows: int):
        self.bar = progress_bar.bar(total_rows, desc="sizes", unit="size", enabled=enabled)
        self.last = 0.0

    def tick(self, count: int) -> None:
        now = time.monotonic()
        if now - self.last > 0.5:  # set_postfix is not free: at most twice a second
            self.last = now
            self.bar.set_postfix(messages=count, refresh=False)

    def row_done(self) -> None:
        self.bar.update(1)
        if self.bar.n >= (self.bar.total or 0):
            self.bar.close()


def format_bandwidth(rows: list[dict], gbits: bool) -> str:
    unit = "Gb/sec" if gbits else "MB/sec"
    scale = (lambda bps: bps * 8 / 1e9) if gbits else (lambda bps: bps / 2 ** 20)
    line = "-" * 87
    out = [line, f" {'#bytes':<10} {'#iterations':<13} {'BW peak[' + unit + ']':<20} "
                 f"{'BW average[' + unit + ']':<22} {'MsgRate[Mpps]':<14}"]
    for r in rows:
        out.append(f" {r['bytes']:<10} {r['iterations']:<13} {scale(r['bw_peak_Bps']):<20.2f} "
                   f"{scale(r['bw_avg_Bps']):<22.2f} {r['msg_rate_mpps']:<14.6f}")
    out.append(line)
    return "\n".join(out)


def format_latency(rows: list[dict]) -> str:
    line = "-" * 120
    cols = ["t_min", "t_max", "t_typical", "t_avg", "t_stdev", "p50", "p99", "p99_9"]
    names = ["t_min[usec]", "t_max[usec]", "t_typical[usec]", "t_avg[usec]", "t_stdev[usec]",
             "50% [usec]", "99% percentile[usec]", "99.9% percentile[usec]"]
    out = [line, f" {'#bytes':<8} {'#iterations':<12} " + " ".join(f"{n:<12}" for n in names)]
    for r in rows:
        out.append(f" {r['bytes']:<8} {r['iterations']:<12} " +
                   " ".join(f"{r[c + '_us']:<12.2f}" for c in cols))
    out.append(line)
    return "\n".join(out)


def plot_bandwidth(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {exc}")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogx([r["bytes"] for r in rows], [r["bw_avg_gbps"] for r in rows], marker="o", base=2)
    ax.set_xlabel("message size [bytes]")
    ax.set_ylabel("bandwidth [Gbit/s]")
    ax.set_title("lamina-bench bandwidth")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser, mode: str) -> None:
    p.add_argument("host", nargs="?", help="server to connect to; without it, act as the server")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT)
    p.add_argument("-s", "--size", type=parse_size, default=65536 if mode == "bandwidth" else 64,
                   help="message size (bytes; K/M suffixes)")
    p.add_argument("-a", "--all", action="store_true", help="all sizes from 2 B to 8 MiB")
    p.add_argument("-n", "--iters", type=int, default=None, help="iterations per size")
    p.add_argument("-D", "--duration", type=float, default=None, help="seconds per size instead of -n")
    p.add_argument("-q", "--qp", "--streams", dest="streams", type=int, default=1,
                   help="parallel connections (perftest: QPs)")
    p.add_argument("-t", "--tx-depth", dest="depth", type=int, default=None,
                   help="writes in flight per connection (bandwidth default: 128, at most 16 MiB in flight)")
    p.add_argument("--transport", choices=tr.TRANSPORT_CHOICES, default="auto")
    p.add_argument("--cycle-buffer", "--cycle_buffer", dest="cycle_buffer", type=parse_size, default=CYCLE_BUFFER,
                   help="bandwidth: writes of at most half of it advance through it (over at most as many "
                        "buffers as writes in flight), larger ones all go to one buffer, as perftest places "
                        "them (default: 4 KiB; 8M: 1 MiB writes over 8 buffers, out of cache)")
    add_progress_argument(p)
    p.add_argument("-d", "--ib-dev", default=None, help="verbs device (as perftest -d)")
    p.add_argument("-x", "--gid-index", type=int, default=None)
    p.add_argument("--report_gbits", "--report-gbits", dest="report_gbits", action="store_true")
    p.add_argument("--out_json", "--out-json", dest="out_json", default=None)
    p.add_argument("--loopback", action="store_true", help="run server and client here, in two processes")
    p.add_argument("--once", action="store_true", help="server: exit after one client")
    p.add_argument("--plot", default=None, help="bandwidth: draw bandwidth against size (PNG)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--loop", choices=["native", "python"], default="native",
                   help="native: the ping-pong or streaming loop runs in C, as perftest's (default); "
                        "python: every write and wait goes through the Python API")


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=sorted(tr.PROGRESS_MODES), default=None,
                   help="event: waiting threads sleep in epoll (default, or $LAMINA_PROGRESS); "
                        "poll: they busy-poll and never sleep (a core per waiting thread)")


def _context(args) -> tr.Context:
    return tr.Context(args.transport, ib_device=args.ib_dev, gid_index=args.gid_index, progress=args.progress)


def run(args: argparse.Namespace, mode: str) -> int:
    if args.loopback:
        return _run_loopback(args, mode)
    if args.host is None:
        with _context(args) as ctx:
            print(f"lamina-bench {mode} server on port {args.port} ({', '.join(ctx.transports)}); "
                  "Ctrl-C to stop", file=sys.stderr, flush=True)
            try:
                serve(ctx, args.port, once=args.once)
            except KeyboardInterrupt:
                pass
        return 0
    return _run_client(args, mode, args.host, args.port)


def _config(args, mode: str) -> Config:
    sizes = ALL_SIZES if args.all else [args.size]
    default_iters = 5000 if mode == "bandwidth" else 1000
    depth = args.depth or (0 if mode == "bandwidth" else 1)  # 0: per size, see depth_for
    loop = getattr(args, "loop", "native")
    if mode == "latency" and loop == "native" and args.duration:
        print("lamina-bench: -D applies to --loop python; the native loop runs -n iterations",
              file=sys.stderr)
    cycle_buffer = getattr(args, "cycle_buffer", CYCLE_BUFFER)
    low, high = CYCLE_BUFFER_BOUNDS
    if not low <= cycle_buffer <= high:
        raise SystemExit(f"lamina-bench: --cycle-buffer must be {low} B .. {high >> 30} GiB, got {cycle_buffer}")
    return Config(mode, sizes, args.iters or default_iters, args.duration, args.streams, depth,
                  args.transport, loop, cycle_buffer)


def _run_client(args, mode: str, host: str, port: int) -> int:
    cfg = _config(args, mode)
    with _context(args) as ctx:
        client = Client(ctx, cfg, host, port)
        transport = client.endpoints[0].transport
        progress_mode = ctx.progress
        progress = Progress(not args.quiet, len(cfg.sizes))
        try:
            rows = run_bandwidth(client, progress) if mode == "bandwidth" else run_latency(client, progress)
        finally:
            client.close()
    depth = cfg.depth or "auto"
    loop = f" loop={cfg.loop}"
    cycle = f" cycle_buffer={cfg.cycle_buffer}" if mode == "bandwidth" else ""
    header = (f" lamina-bench {mode}: transport={transport} progress={progress_mode} streams={cfg.streams}"
              f" depth={depth}{loop}{cycle} host={host}:{port}")
    print(header)
    print(format_bandwidth(rows, args.report_gbits) if mode == "bandwidth" else format_latency(rows))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"test": mode, "transport": transport, "progress": progress_mode, "streams": cfg.streams,
                       "depth": cfg.depth, "cycle_buffer": cfg.cycle_buffer, "host": host, "results": rows,
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
    if args.plot and mode == "bandwidth":
        plot_bandwidth(rows, args.plot)
    return 0


def _run_loopback(args, mode: str) -> int:
    """Server in a child process on a free port, client here."""
    cmd = [sys.executable, "-c",
           "import sys; from lamina_comm.bench.perf import _loopback_server; "
           "_loopback_server(sys.argv[1], sys.argv[2] or None)",
           args.transport, args.progress or ""]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"lamina-bench: loopback server failed to start (rc={server.poll()})")
        return _run_client(args, mode, "127.0.0.1", int(line.split()[1]))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def _loopback_server(transport: str, progress: str | None = None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with tr.Context(transport, progress=progress) as ctx:
        serve(ctx, 0, once=True, host="127.0.0.1",
              ready=lambda port: print(f"PORT {port}", flush=True))
