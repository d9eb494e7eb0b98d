"""GPU checks and benchmarks for one run on a lent GPU machine (called by tools/device-check.sh).

Phases, each bounded in time and recorded even when it fails or is skipped:

  env      python, torch, cupy, driver, device, native build
  tests    pytest tests/gpu tests/test_gpu_unavailable.py (junit xml + log under --out)
  copy     pinned cuMemcpy ceilings: device->host and host->device, 256 MiB and in 1 MiB pieces
  tcp      lamina host->host bandwidth over tcp loopback (the network ceiling on this machine)
  staged   GPU->GPU bandwidth through StagedLink over tcp loopback, two ring geometries
  latency  one-way message latency (ping-pong / 2): raw host writes, the staging protocol on host
           memory, and GPU->GPU staging, at 64 B and 64 KiB
  decode   disaggregated decode (1 model + 2 attention nodes, --device cuda) against a monolithic
           GPU run: token parity and decode throughput

Writes <out>/device_check.json (everything) and prints a short table last.
Runs without a GPU too (GPU phases are skipped with the reason), which is how it is checked locally.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


class Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    @property
    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def phase(results: dict, name: str, budget: Budget, need: float, fn: Callable[[], Any]) -> Any:
    """Run fn if at least `need` seconds are left; record its result, error or skip reason."""
    started = time.monotonic()
    if budget.left < need:
        results[name] = {"skipped": f"time budget: {budget.left:.0f} s left, phase needs ~{need:.0f} s"}
        print(f"[device-check] {name}: skipped (budget)", flush=True)
        return None
    print(f"[device-check] {name} ...", flush=True)
    try:
        out = fn()
        results[name] = out if isinstance(out, dict) else {"result": out}
    except Exception as exc:  # recorded, and the run goes on
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"[device-check] {name}: ERROR {type(exc).__name__}: {exc}", flush=True)
    results[name]["seconds"] = round(time.monotonic() - started, 2)
    return results[name]


def gpu_ok() -> tuple[bool, str]:
    from lamina_comm.gpu import gpu_status
    return gpu_status()


def native_ok() -> tuple[bool, str]:
    try:
        from lamina_comm import _bindings  # noqa: F401
        return True, ""
    except ImportError as exc:
        return False, str(exc.__cause__ or exc)


# ------------------------------------------------------------------ env


def env_info(build: str) -> dict:
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "platform": platform.platform(), "build": build}
    ok, why = gpu_ok()
    info["gpu_status"] = [ok, why]
    info["native"] = list(native_ok())
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
        if info["torch_cuda"]:
            info["torch_device"] = torch.cuda.get_device_name(0)
    except Exception as exc:
        info["torch"] = f"unavailable: {exc}"
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except Exception as exc:
        info["cupy"] = f"unavailable: {type(exc).__name__}"
    if ok:
        from lamina_comm.gpu import cuda
        dev = cuda.get_device(0)
        info["device"] = dev.name
        info["compute_capability"] = list(dev.compute_capability)
        info["driver_version"] = dev.driver.version
        info["symbols"] = {k: v for k, v in dev.driver.symbols.items() if "Value32" in k or "Handle" in k}
        info["dma_buf_supported"] = dev.attribute(cuda.CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)
        info["gpudirect_rdma_supported"] = dev.attribute(cuda.CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED)
        info["can_use_stream_mem_ops_v1_attr"] = dev.attribute(cuda.CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.current,"
                              "pcie.link.width.current", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except Exception as exc:
        info["nvidia_smi"] = f"unavailable: {type(exc).__name__}"
    if info["native"][0]:
        import lamina_comm as lc
        with lc.Context() as ctx:
            info["transports"] = ctx.transports
            info["verbs_status"] = ctx.transport_status("verbs")
    return info


# ------------------------------------------------------------------ tests


def run_tests(out: Path, timeout: float) -> dict:
    junit = out / "pytest-junit.xml"
    log = out / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "tests/test_gpu_unavailable.py", "-q", "-rA",
           "-p", "no:cacheprovider", f"--junitxml={junit}"]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    log.write_text(text)
    result: dict[str, Any] = {"rc": rc, "wall_s": round(time.monotonic() - started, 1), "cases": {}}
    if junit.exists():
        root = ET.parse(junit).getroot()
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            state, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    state = "failed" if tag in ("failure", "error") else "skipped"
                    detail = (el.get("message") or "")[:300]
            result["cases"][name] = {"state": state, "time": float(case.get("time") or 0), "detail": detail}
    counts = {s: sum(1 for c in result["cases"].values() if c["state"] == s) for s in ("passed", "failed", "skipped")}
    result.update(counts)
    result["tail"] = text[-3000:]
    return result


# ------------------------------------------------------------------ helpers


def link_pair(engine_a: Any, engine_b: Any, **kw: Any):
    import lamina_comm as lc
    from lamina_comm.gpu import StagedLink
    ca, cb = lc.Context("tcp"), lc.Context("tcp")
    listener = cb.listen("127.0.0.1:0")
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("l", StagedLink.accept(listener, timeout=20,
                                                                              engine=engine_b, **kw)))
    t.start()
    la = StagedLink.connect(ca, listener.address, engine=engine_a, **kw)
    t.join(30)
    listener.close()
    return ca, cb, la, box["l"]


def close_pair(ca: Any, cb: Any, la: Any, lb: Any) -> None:
    la.close(timeout=2)
    lb.close(timeout=2)
    la.engine.close(2)
    lb.engine.close(2)
    ca.close()
    cb.close()


def pinned_random(dev: Any, nbytes: int, seed: int):
    import numpy as np
    from lamina_comm.gpu import cuda
    buf = cuda.PinnedBuffer(dev, nbytes)
    view = np.frombuffer((ctypes.c_char * nbytes).from_address(buf.address), np.uint8)
    view[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return buf, view


def device_random(dev: Any, nbytes: int, seed: int):
    from lamina_comm.gpu import cuda
    host, _ = pinned_random(dev, nbytes, seed)
    d = cuda.DeviceAllocation(dev, nbytes)
    with dev.activate():
        cuda.memcpy_htod_async(dev.driver, d.ptr, host.address, nbytes, None)
        dev.driver.call("cuStreamSynchronize", None)
    host.close()
    return d


# ------------------------------------------------------------------ copy ceilings


def bench_copy(quick: bool) -> dict:
    from lamina_comm.gpu import cuda
    dev = cuda.get_device(0)
    drv = dev.driver
    n = (64 if quick else 256) * MiB
    host, _ = pinned_random(dev, n, 1)
    d = device_random(dev, n, 2)
    out: dict[str, Any] = {"bytes": n}
    with dev.activate():
        s = cuda.Stream(dev)
        e0, e1 = cuda.Event(dev, cuda.CU_EVENT_DEFAULT), cuda.Event(dev, cuda.CU_EVENT_DEFAULT)

        def timed(fn: Callable[[], None], reps: int = 5) -> float:
            fn()
            s.synchronize()
            samples = []
            for _ in range(reps):
                e0.record(s.handle)
                fn()
                e1.record(s.handle)
                e1.synchronize()
                samples.append(e0.elapsed_ms(e1) / 1e3)
            return statistics.median(samples)

        def pieces(copy: Callable[[int, int, int], None], piece: int) -> Callable[[], None]:
            return lambda: [copy(off, min(piece, n - off), 0) for off in range(0, n, piece)]

        d2h = lambda off, m, _=0: cuda.memcpy_dtoh_async(drv, host.address + off, d.ptr + off, m, s.handle)  # noqa: E731
        h2d = lambda off, m, _=0: cuda.memcpy_htod_async(drv, d.ptr + off, host.address + off, m, s.handle)  # noqa: E731
        out["dtoh_GBps"] = round(n / timed(lambda: d2h(0, n)) / 1e9, 2)
        out["htod_GBps"] = round(n / timed(lambda: h2d(0, n)) / 1e9, 2)
        out["dtoh_1MiB_pieces_GBps"] = round(n / timed(pieces(d2h, MiB)) / 1e9, 2)
        out["htod_1MiB_pieces_GBps"] = round(n / timed(pieces(h2d, MiB)) / 1e9, 2)
        for x in (s, e0, e1):
            x.close()
    host.close()
    d.close()
    return out


# ------------------------------------------------------------------ tcp host ceiling


def bench_tcp(quick: bool) -> dict:
    """lamina writes between two host regions over tcp loopback, at the staging chunk sizes."""
    import numpy as np
    import lamina_comm as lc
    from tests.conftest import connect_pair
    window, total = 8, 64 * MiB
    duration = 0.5 if quick else 1.5
    out: dict[str, Any] = {"window": window, "by_write_size": {}}
    with lc.Context("tcp") as a, lc.Context("tcp") as b:
        src = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
        dst = np.zeros(total, np.uint8)
        ms, mt = a.register(src, lc.Access.LOCAL_WRITE), b.register(dst)
        ea, eb = connect_pair(b, a, server_data=mt.descriptor().to_bytes())
        remote = lc.RemoteRegion.from_bytes(ea.peer_data)
        ok = True
        for size in (MiB, 4 * MiB):
            slots = total // size
            posted = done = 0
            started = time.perf_counter()
            while True:
                while posted - done < window and time.perf_counter() - started < duration:
                    off = (posted % slots) * size
                    ea.write(ms, remote, local_offset=off, remote_offset=off, length=size)
                    posted += 1
                if done == posted:
                    break
                for c in ea.wait(timeout=5):
                    c.raise_for_status()
                    done += 1
            wall = time.perf_counter() - started
            n = min(posted, slots) * size
            ok = ok and bool(np.array_equal(dst[:n], src[:n]))
            out["by_write_size"][f"{size // MiB}MiB"] = round(done * size / wall / 1e9, 2)
    out["GBps"] = max(out["by_write_size"].values())
    out["data_ok"] = ok
    return out


# ------------------------------------------------------------------ staged GPU->GPU bandwidth


def bench_staged(quick: bool) -> dict:
    from lamina_comm.gpu import CudaCopyEngine, cuda
    dev = cuda.get_device(0)
    msg = (32 if quick else 64) * MiB
    duration = 0.7 if quick else 2.0
    src = device_random(dev, msg, 3)
    dst = cuda.DeviceAllocation(dev, msg)
    results = {}
    same: list[bool] = []
    for chunk, slots in ((MiB, 8), (4 * MiB, 4)):
        pair = link_pair(CudaCopyEngine(0), CudaCopyEngine(0), chunk_bytes=chunk, slots=slots)
        ca, cb, la, lb = pair
        try:
            for _ in range(2):   # warm up
                r = lb.recv(dst)
                la.send(src)
                r.wait(60)
            moved, started = 0, time.perf_counter()
            while time.perf_counter() - started < duration:
                recvs = [lb.recv(dst) for _ in range(4)]
                for _ in range(4):
                    la.send(src)
                for r in recvs:
                    moved += r.wait(60)
            wall = time.perf_counter() - started
            results[f"{chunk // MiB}MiBx{slots}"] = round(moved / wall / 1e9, 2)
            # One more message into a poisoned destination must land bit-exact.
            with dev.activate():
                dev.driver.call("cuMemsetD8Async", dst.ptr, 0xA5, msg, None)
                dev.driver.call("cuStreamSynchronize", None)
            r = lb.recv(dst)
            la.send(src)
            r.wait(60)
            same.append(_same_device_bytes(dev, src, dst, msg))
        finally:
            close_pair(*pair)
    for x in (src, dst):
        x.close()
    return {"message_bytes": msg, "GBps": results, "best_GBps": max(results.values()), "data_ok": all(same)}


def _same_device_bytes(dev: Any, x: Any, y: Any, nbytes: int) -> bool:
    import numpy as np
    from lamina_comm.gpu import cuda
    a, b = cuda.PinnedBuffer(dev, nbytes), cuda.PinnedBuffer(dev, nbytes)
    try:
        with dev.activate():
            cuda.memcpy_dtoh_async(dev.driver, a.address, x.ptr, nbytes, None)
            cuda.memcpy_dtoh_async(dev.driver, b.address, y.ptr, nbytes, None)
            dev.driver.call("cuStreamSynchronize", None)
        return bool(np.array_equal(np.frombuffer((ctypes.c_char * nbytes).from_address(a.address), np.uint8),
                                   np.frombuffer((ctypes.c_char * nbytes).from_address(b.address), np.uint8)))
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ latency


def _percentiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"p50_us": round(samples[len(samples) // 2] * 1e6, 1),
            "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6, 1),
            "n": len(samples)}


def _one_way(round_trip: Callable[[int], None], iters: int, warmup: int = 50) -> dict:
    """Percentiles of half of each timed round_trip(i), after `warmup` untimed ones."""
    samples = []
    for i in range(iters + warmup):
        t0 = time.perf_counter()
        round_trip(i)
        if i >= warmup:
            samples.append((time.perf_counter() - t0) / 2)
    return _percentiles(samples)


def latency_raw_host(n: int, iters: int) -> dict:
    import numpy as np
    import lamina_comm as lc
    from tests.conftest import connect_pair
    with lc.Context("tcp") as a, lc.Context("tcp") as b:
        ba, bb = np.zeros(max(n, 64), np.uint8), np.zeros(max(n, 64), np.uint8)
        ma, mb = a.register(ba), b.register(bb)
        ea, eb = connect_pair(b, a, server_data=mb.descriptor().to_bytes(), client_data=ma.descriptor().to_bytes())
        to_b, to_a = lc.RemoteRegion.from_bytes(ea.peer_data), lc.RemoteRegion.from_bytes(eb.peer_data)

        def until_imm(ep: Any) -> None:
            while True:
                for c in ep.wait(timeout=5):
                    c.raise_for_status()
                    if c.op == lc.Op.RECV_IMM:
                        return

        def round_trip(i: int) -> None:
            ea.write(ma, to_b, length=n, imm=i)
            until_imm(eb)
            eb.write(mb, to_a, length=n, imm=i)
            until_imm(ea)

        return _one_way(round_trip, iters)


def latency_staged(engine_factory: Callable[[], Any], make_buf: Callable[[int], Any], n: int, iters: int) -> dict:
    pair = link_pair(engine_factory(), engine_factory(), chunk_bytes=MiB, slots=4)
    ca, cb, la, lb = pair
    try:
        xa, xb = make_buf(max(n, 1)), make_buf(max(n, 1))

        def round_trip(i: int) -> None:
            r = lb.recv(xb, nbytes=n)
            la.send(xa, nbytes=n)
            r.wait(5)
            r = la.recv(xa, nbytes=n)
            lb.send(xb, nbytes=n)
            r.wait(5)

        return _one_way(round_trip, iters)
    finally:
        close_pair(*pair)


def latency_channel(n: int, iters: int, on_gpu: bool) -> dict:
    """One-way latency of an n-byte message through a channel pair (ping-pong over tcp loopback, one
    thread): host arrays, or CUDA memory sent and received stream-ordered (copy engine + host functions;
    the side that answers queues its send behind its receive on one stream, no host wait)."""
    import numpy as np
    import lamina_comm as lc
    from lamina_comm.channel import ChannelSpec
    from tests.test_channel import open_pair
    spec = ChannelSpec(max_tokens=1, hidden=64, heads=1, kv_heads=1, head_dim=64, dtype="uint8",
                       microbatches=1, slots_per_microbatch=2, extra_bytes=n)
    bufs: list[Any] = []
    with lc.Context("tcp") as a, lc.Context("tcp") as b:
        model, attention = open_pair(a, b, spec)
        try:
            if on_gpu:
                from lamina_comm.gpu import cuda
                dev = cuda.get_device(0)
                bufs += [cuda.DeviceAllocation(dev, n) for _ in range(2)]
                xa, xb = bufs
                sa, sb = cuda.Stream(dev), cuda.Stream(dev)
                bufs += [sa, sb]
            else:
                xa, xb, sa, sb = np.zeros(n, np.uint8), np.zeros(n, np.uint8), None, None

            def round_trip(i: int) -> None:
                model.send([xa], layer=0, microbatch=0, stream=sa.handle if sa else None)
                attention.recv_into([xb], 0, stream=sb.handle if sb else None, timeout=5)
                attention.send([xb], layer=0, microbatch=0, stream=sb.handle if sb else None)
                model.recv_into([xa], 0, stream=sa.handle if sa else None, timeout=5)
                if sa is not None:
                    with dev.activate():
                        sa.synchronize()

            return _one_way(round_trip, iters)
        finally:
            model.close()
            attention.close()
            for buf in bufs:
                buf.close()


def bench_latency(quick: bool, with_gpu: bool) -> dict:
    import numpy as np
    from lamina_comm.gpu import HostCopyEngine
    iters = 200 if quick else 1000
    out: dict[str, Any] = {}
    for n in (64, 64 * 1024):
        row: dict[str, Any] = {"raw_host": latency_raw_host(n, iters),
                               "staged_host": latency_staged(lambda: HostCopyEngine(asynchronous=False),
                                                             lambda m: np.zeros(m, np.uint8), n, iters),
                               "channel_host": latency_channel(n, iters, on_gpu=False)}
        if with_gpu:
            from lamina_comm.gpu import CudaCopyEngine, cuda
            dev = cuda.get_device(0)
            bufs: list[Any] = []

            def dev_buf(m: int) -> Any:
                bufs.append(cuda.DeviceAllocation(dev, m))
                return bufs[-1]

            row["staged_gpu"] = latency_staged(lambda: CudaCopyEngine(0), dev_buf, n, iters)
            row["channel_gpu"] = latency_channel(n, iters, on_gpu=True)
            for b in bufs:
                b.close()
        out[f"{n}B"] = row
    return out


# ------------------------------------------------------------------ decode


def decode_check(timeout: float) -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA here"}
    from lamina_comm.node import demo
    from lamina_comm.node.cli import _node_parser
    if "--device" not in _node_parser().format_help():
        return {"skipped": "lamina_comm.node has no --device option"}
    from lamina_comm.model import LlamaConfig, LlamaWeights, MonolithicModel, SamplingParams
    from lamina_comm.node.metrics import parse_prometheus
    deadline = time.monotonic() + timeout
    nodes: list[Any] = []
    out: dict[str, Any] = {"note": "node tensors cross the wire from host memory (the nodes copy to/from cuda); "
                                   "lamina_comm.gpu is not on that path yet"}
    try:
        attention = [demo.start_attention(f"attention node {i}", "--config", "tiny", "--blocks", "256",
                                          "--device", "cuda") for i in range(2)]
        nodes += attention
        addresses = [n.wait_ready(max(5.0, deadline - time.monotonic()))["address"] for n in attention]
        model = demo.start_model(addresses, "--config", "tiny", "--seed", "0", "--microbatches", "2",
                                 "--device", "cuda")
        nodes.append(model)
        http = model.wait_ready(max(5.0, deadline - time.monotonic()))["http"]
        workload = demo.Workload.mixed(6, 0, LlamaConfig.tiny().vocab_size)
        split, wall = demo.run_disaggregated(http, workload)
        samples = parse_prometheus(demo.get_text(http, "/metrics"))
        out["split_tokens_per_s_end_to_end"] = round(sum(map(len, split)) / wall, 1)
        out["split_decode_tokens_per_s"] = round(samples.get("lamina_decode_tokens_total", 0) /
                                                 max(samples.get("lamina_decode_step_seconds_total", 0), 1e-9), 1)
    finally:
        out["node_exit_codes"] = [c if isinstance(c, int) else c[:500] for c in demo.stop_nodes(nodes)]
    config = LlamaConfig.tiny()
    mono = MonolithicModel(config, LlamaWeights.random(config, seed=0), device="cuda")
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in workload.max_tokens]
    alone = [mono.generate([p], sp)[0] for p, sp in zip(workload.prompts, params)]
    tokens, seconds = demo._monolithic_decode_rate(mono, workload, params)
    out["mono_decode_tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
    matches = [a == b for a, b in zip(split, alone)]
    out["attention_kernel"] = mono.cache.attention  # the nodes' too (--attention-kernel auto: sdpa on CUDA)
    out["parity"] = f"{sum(matches)}/{len(matches)} requests identical (greedy)"
    out["parity_ok"] = all(matches)
    if not out["parity_ok"]:
        out["mismatches"] = [{"split": a, "mono": b} for a, b, m in zip(split, alone, matches) if not m][:2]
    return out


# ------------------------------------------------------------------ report


def table(r: dict) -> str:
    def get(*path: str, default: Any = "-") -> Any:
        cur: Any = r
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return default
            cur = cur[p]
        return cur

    def why(name: str) -> str:
        ph = r.get(name)
        if ph is None:
            return "not run"
        text = ph.get("skipped") or ph.get("error") or ""
        return text if len(text) <= 140 else text[:137] + "..."

    env = r.get("env", {})
    lines = [f"== lamina-comm device check: {env.get('device', 'no CUDA device')} "
             f"(driver {env.get('driver_version', '-')}, python {env.get('python', '?')}, torch {env.get('torch', '-')}) =="]
    t = r.get("tests", {})
    lines.append(f"build            {env.get('build', '?')}")
    if "passed" in t:
        failed = [k for k, v in t["cases"].items() if v["state"] == "failed"]
        lines.append(f"tests            {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped "
                     f"({t['wall_s']} s){'; FAILED: ' + ', '.join(failed)[:300] if failed else ''}")
    else:
        lines.append(f"tests            {why('tests')}")
    c = r.get("copy", {})
    lines.append("pinned memcpy    " + (f"DtoH {c['dtoh_GBps']} GB/s, HtoD {c['htod_GBps']} GB/s (one copy); "
                                         f"in 1 MiB pieces {c['dtoh_1MiB_pieces_GBps']} / {c['htod_1MiB_pieces_GBps']}"
                                         if "dtoh_GBps" in c else why("copy")))
    lines.append("tcp loopback     " + (f"host->host {get('tcp', 'GBps')} GB/s (best of 1 and 4 MiB writes, "
                                         f"window 8: {get('tcp', 'by_write_size')})"
                                         if "GBps" in r.get("tcp", {}) else why("tcp")))
    s = r.get("staged", {})
    if "GBps" in s:
        ceiling = min(x for x in (get("copy", "dtoh_GBps", default=None), get("copy", "htod_GBps", default=None),
                                  get("tcp", "GBps", default=None)) if isinstance(x, (int, float)))
        lines.append(f"staged gpu->gpu  {', '.join(f'{k} {v} GB/s' for k, v in s['GBps'].items())}; best = "
                     f"{100 * s['best_GBps'] / ceiling:.0f}% of min(ceilings) {ceiling} GB/s; "
                     f"data {'ok' if s['data_ok'] else 'CORRUPT'}")
    else:
        lines.append(f"staged gpu->gpu  {why('staged')}")
    lat = r.get("latency", {})
    for size in ("64B", "65536B"):
        row = lat.get(size)
        if row:
            lines.append(f"latency {size:>7}  one-way p50: raw host {row['raw_host']['p50_us']} us, staged host "
                         f"{row['staged_host']['p50_us']} us, staged gpu "
                         f"{row.get('staged_gpu', {}).get('p50_us', '-')} us; channel host "
                         f"{row['channel_host']['p50_us']} us, channel gpu "
                         f"{row.get('channel_gpu', {}).get('p50_us', '-')} us")
    if not lat or "error" in lat or "skipped" in lat:
        lines.append(f"latency          {why('latency')}")
    d = r.get("decode", {})
    if "parity" in d:
        lines.append(f"decode (tiny)    parity {d['parity']}, {d.get('attention_kernel', '?')} attention; "
                     f"decode steps: split {d['split_decode_tokens_per_s']} tok/s vs monolithic "
                     f"{d['mono_decode_tokens_per_s']} tok/s (GPU)")
    else:
        lines.append(f"decode           {why('decode')}")
    lines.append(f"verdict          {r.get('verdict')}  ({r.get('elapsed_s')} s; full results in "
                 f"{r.get('json_path')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "device-out"))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for everything")
    parser.add_argument("--build", default="unknown", help="what the native build step reported")
    parser.add_argument("--quick", action="store_true", help="short benchmarks (local dry runs)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    r: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    phase(r, "env", budget, 5, lambda: env_info(args.build))
    has_gpu, why_not = gpu_ok()
    has_native, native_why = native_ok()
    gpu_skip = None if has_gpu else f"CUDA unavailable: {why_not}"
    native_skip = None if has_native else f"native module unavailable: {native_why}"

    def guarded(name: str, need: float, fn: Callable[[], Any], *reasons: str | None) -> None:
        reason = next((x for x in reasons if x), None)
        if reason:
            r[name] = {"skipped": reason}
            print(f"[device-check] {name}: skipped ({reason})", flush=True)
        else:
            phase(r, name, budget, need, fn)

    guarded("tests", 60, lambda: run_tests(out, min(300.0, max(30.0, budget.left - 150))),
            "--skip-tests" if args.skip_tests else None, native_skip)
    guarded("copy", 10, lambda: bench_copy(args.quick), gpu_skip)
    guarded("tcp", 10, lambda: bench_tcp(args.quick), native_skip)
    guarded("staged", 25, lambda: bench_staged(args.quick), gpu_skip, native_skip)
    guarded("latency", 25, lambda: bench_latency(args.quick, has_gpu), native_skip)
    guarded("decode", 60, lambda: decode_check(min(200.0, budget.left - 10)),
            "--skip-decode" if args.skip_decode else None, gpu_skip, native_skip)

    t = r.get("tests", {})
    failures = []
    if t.get("failed") or t.get("rc") == "timeout" or "error" in t:
        failures.append("tests")
    for name in ("staged", "tcp"):
        if r.get(name, {}).get("data_ok") is False:
            failures.append(f"{name} data")
    if r.get("decode", {}).get("parity_ok") is False:
        failures.append("decode parity")
    errors = [k for k, v in r.items() if isinstance(v, dict) and "error" in v]
    r["verdict"] = ("FAIL: " + ", ".join(failures + [f"{e} error" for e in errors if e not in failures])
                    if failures or errors else ("PASS" if has_gpu else f"PASS without GPU ({why_not[:80]})"))
    r["elapsed_s"] = round(time.monotonic() - budget.start, 1)
    path = out / "device_check.json"
    r["json_path"] = str(path)
    path.write_text(json.dumps(r, indent=2, default=str))
    print("\n" + table(r), flush=True)
    return 0 if not failures and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
