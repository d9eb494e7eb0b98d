"""GPU tier on a real CUDA device: skipped, with gpu_status()'s reason, where there is none.

Runs on the lent H100/H200 through tools/device-check.sh. torch and cupy are
optional there: tests that need one skip on its absence; the raw-driver tests
need neither.
"""
from __future__ import annotations

import ctypes
import threading
import time

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm.gpu import gpu_status

OK, WHY = gpu_status()
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]
if not OK:
    pytest.skip(f"CUDA unavailable: {WHY}", allow_module_level=True)

from lamina_comm.gpu import (CudaCopyEngine, ReceiveGate, StreamOrderedWriter, cuda,  # noqa: E402
                             register_cuda)

from ..conftest import connect_pair  # noqa: E402
from ..test_gpu_unavailable import link_pair  # noqa: E402

DEV = cuda.get_device(0)
DRV = DEV.driver
POISON = 0xFF


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    torch.cuda.init()
    return torch


@pytest.fixture
def links():
    made = []

    def make(chunk_bytes=1 << 20, slots=4):
        ca, cb, la, lb = link_pair(CudaCopyEngine(0), CudaCopyEngine(0), dict(chunk_bytes=chunk_bytes, slots=slots),
                                   dict(chunk_bytes=chunk_bytes, slots=slots))
        made.append((ca, cb, la, lb))
        return la, lb

    yield make
    for ca, cb, la, lb in made:
        la.close(timeout=2)
        lb.close(timeout=2)
        la.engine.close(2)
        lb.engine.close(2)
        ca.close()
        cb.close()


def _random_bytes(torch, n, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)


# -- driver basics ---------------------------------------------------------------------------


def test_driver_reports_device():
    assert DEV.name and DRV.version >= 11070, f"driver {DRV.version} too old for the _v2 stream memory ops"
    assert DRV.has("cuStreamWaitValue32") and DRV.symbols["cuStreamWaitValue32"].endswith("_v2")
    major, _ = DEV.compute_capability
    assert major >= 7


def test_errors_are_typed_not_fatal():
    with pytest.raises(cuda.CudaError) as info:
        DEV.driver.call("cuMemFree", 0x1234)
    assert info.value.name.startswith("CUDA_ERROR_") and "cuMemFree" in str(info.value)


def test_primary_context_is_shared_with_torch(torch):
    torch.empty(1, device="cuda")
    cur = ctypes.c_void_p()
    DRV.call("cuCtxGetCurrent", ctypes.byref(cur))
    assert cur.value == DEV.context


def test_pointer_classification(torch):
    t = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    with DEV.activate():
        info = cuda.classify_pointer(DRV, t.data_ptr())
        assert info.memory_type == cuda.CU_MEMORYTYPE_DEVICE and info.device_ordinal == 0
        assert info.range_start <= t.data_ptr() and t.data_ptr() + t.numel() <= info.range_start + info.range_size
        host = np.zeros(4096, np.uint8)
        assert cuda.classify_pointer(DRV, host.ctypes.data) is None
        pinned = cuda.PinnedBuffer(DEV, 4096)
        try:
            assert cuda.classify_pointer(DRV, pinned.address).memory_type == cuda.CU_MEMORYTYPE_HOST
        finally:
            pinned.close()


def test_raw_pinned_round_trip_without_frameworks():
    n = 3 << 20
    dev = cuda.DeviceAllocation(DEV, n)
    a, b = cuda.PinnedBuffer(DEV, n), cuda.PinnedBuffer(DEV, n)
    try:
        src = np.frombuffer((ctypes.c_char * n).from_address(a.address), np.uint8)
        dst = np.frombuffer((ctypes.c_char * n).from_address(b.address), np.uint8)
        src[:] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
        dst[:] = POISON
        with DEV.activate():
            s = cuda.Stream(DEV)
            cuda.memcpy_htod_async(DRV, dev.ptr, a.address, n, s.handle)
            cuda.memcpy_dtoh_async(DRV, b.address, dev.ptr, n, s.handle)
            s.synchronize()
            s.close()
        assert np.array_equal(src, dst)
    finally:
        a.close()
        b.close()
        dev.close()


def test_gate_holds_a_stream_until_released_raw():
    """cuStreamWaitValue32 on host-mapped memory: the copy behind it waits for the host's store."""
    n = 1 << 20
    src, dst = cuda.DeviceAllocation(DEV, n), cuda.DeviceAllocation(DEV, n)
    host = cuda.PinnedBuffer(DEV, n)
    gate = ReceiveGate(DEV)
    try:
        with DEV.activate():
            s, probe = cuda.Stream(DEV), cuda.Stream(DEV)
            cuda.memset_d8_async(DRV, src.ptr, 0x5A, n, s.handle)
            cuda.memset_d8_async(DRV, dst.ptr, POISON, n, s.handle)
            s.synchronize()
            gate.enqueue_wait(s.handle, 1)
            cuda.memcpy_dtod_async(DRV, dst.ptr, src.ptr, n, s.handle)
            done = cuda.Event(DEV).record(s.handle)
            time.sleep(0.05)
            assert not done.done(), "the stream ran past an unreleased gate"
            cuda.memcpy_dtoh_async(DRV, host.address, dst.ptr, n, probe.handle)
            probe.synchronize()
            view = np.frombuffer((ctypes.c_char * n).from_address(host.address), np.uint8)
            assert (view == POISON).all()
            gate.release(1)
            done.synchronize()
            cuda.memcpy_dtoh_async(DRV, host.address, dst.ptr, n, probe.handle)
            probe.synchronize()
            assert (view == 0x5A).all()
            for x in (s, probe, done):
                x.close()
    finally:
        gate.close()
        host.close()
        src.close()
        dst.close()


# -- round trips through the tcp transport on loopback -------------------------------------------


@pytest.mark.parametrize("n", [1, 4095, (1 << 20) - 1, 1 << 20, (3 << 20) + 17, 64 << 20])
def test_torch_round_trip_bit_exact(torch, links, n):
    la, lb = links()
    src = _random_bytes(torch, n, n)
    dst = torch.full((n + 64,), POISON, dtype=torch.uint8, device="cuda")
    s = la.send(src)                  # send first: a gated recv on the same stream would hold the send back
    r = lb.recv(dst, nbytes=n)
    assert r.wait(60) == n and s.wait(60) == n
    torch.cuda.synchronize()
    assert torch.equal(dst[:n], src)
    assert bool((dst[n:] == POISON).all())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int64"])
def test_torch_dtypes_bit_exact(torch, links, dtype):
    la, lb = links(chunk_bytes=64 << 10, slots=3)
    dt = getattr(torch, dtype)
    src = torch.randn(1000, 77, device="cuda").to(dt) if dt.is_floating_point else \
        torch.randint(-2**40, 2**40, (1000, 77), device="cuda", dtype=dt)
    dst = torch.empty_like(src).view(torch.uint8).fill_(POISON).view(dt)
    la.send(src)
    r = lb.recv(dst)
    r.wait(30)
    torch.cuda.synchronize()
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))


def test_cupy_round_trip_bit_exact(links):
    cupy = pytest.importorskip("cupy")
    la, lb = links(chunk_bytes=256 << 10, slots=4)
    src = cupy.random.default_rng(5).integers(0, 256, (5 << 20) + 3, dtype=cupy.uint8)
    dst = cupy.full(src.shape, POISON, dtype=cupy.uint8)
    la.send(src)
    r = lb.recv(dst)
    r.wait(30)
    cupy.cuda.get_current_stream().synchronize()
    assert bool((dst == src).all())


class CaiOnly:
    """Exposes nothing but __cuda_array_interface__ over someone else's memory (a raw device pointer)."""

    def __init__(self, t):
        self._t = t
        self.__cuda_array_interface__ = {"shape": (t.numel() * t.element_size(),), "typestr": "|u1",
                                         "data": (t.data_ptr(), False), "version": 3, "strides": None,
                                         "stream": None}


class DLPackOnly:
    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_raw_pointer_and_dlpack_objects(torch, links):
    la, lb = links(chunk_bytes=64 << 10, slots=2)
    src = _random_bytes(torch, 300_001, 11)
    for wrap_src, wrap_dst in ((CaiOnly, DLPackOnly), (DLPackOnly, CaiOnly)):
        dst = torch.full_like(src, POISON)
        torch.cuda.synchronize()
        la.send(wrap_src(src))
        r = lb.recv(wrap_dst(dst))
        r.wait(30)
        torch.cuda.synchronize()
        assert torch.equal(dst, src)


def test_register_cuda_on_tcp_is_staged(torch, links):
    la, lb = links(chunk_bytes=64 << 10, slots=2)
    with lc.Context("tcp") as ctx:
        src = _random_bytes(torch, 100_000, 3)
        dst = torch.full_like(src, POISON)
        rs, rd = register_cuda(ctx, src), register_cuda(ctx, dst)
        assert rs.path == "staging" and "no verbs transport" in rs.path_reason
        with pytest.raises(lc.UnsupportedError):
            rs.descriptor()
        rs.send(la)
        r = rd.recv(lb)
        r.wait(30)
        torch.cuda.synchronize()
        assert torch.equal(dst, src)


# -- stream ordering ------------------------------------------------------------------------------


def _spin(torch, ms):
    """Keep the current stream busy for about ms milliseconds (torch.cuda._sleep counts cycles)."""
    torch.cuda._sleep(int(ms * 1e-3 * 2.0e9))


def test_stream_ordered_send_waits_for_the_producer(torch, links):
    la, lb = links(chunk_bytes=256 << 10, slots=4)
    n = 2 << 20
    payload = _random_bytes(torch, n, 21)
    src = torch.full((n,), POISON, dtype=torch.uint8, device="cuda")
    dst = torch.full((n,), POISON, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    producer = torch.cuda.Stream()
    with torch.cuda.stream(producer):
        _spin(torch, 100)
        src.copy_(payload)            # only after the spin does src hold the payload
    r = lb.recv(dst, stream=torch.cuda.current_stream())
    t0 = time.perf_counter()
    s = la.send(src, stream=producer)
    assert time.perf_counter() - t0 < 0.02, "send must not block its caller"
    assert not s.done()
    r.wait(30)
    torch.cuda.synchronize()
    assert torch.equal(dst, payload), "the send read the source before its producer finished"


def test_gated_receive_never_reads_stale_data(torch, links):
    la, lb = links(chunk_bytes=128 << 10, slots=3)
    consumer = torch.cuda.Stream()
    rng = np.random.default_rng(0)
    for i in range(12):
        n = int(rng.integers(1, 3 << 20))
        payload = _random_bytes(torch, n, 100 + i)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        out = torch.empty(n, dtype=torch.int16, device="cuda")
        with torch.cuda.stream(consumer):
            dst.fill_(POISON)
            out.fill_(-1)
        torch.cuda.synchronize()
        r = lb.recv(dst, stream=consumer)
        with torch.cuda.stream(consumer):
            out.copy_(dst.to(torch.int16))          # a kernel released by the data, not by the host
            ev = torch.cuda.Event()
            ev.record()
        delay = [0.0, 0.001, 0.03][i % 3]
        time.sleep(delay)
        if delay >= 0.03:
            assert not ev.query(), "the consumer ran before any data was sent"
        la.send(payload)
        r.wait(30)
        consumer.synchronize()
        assert torch.equal(out, payload.to(torch.int16)), f"iteration {i}: the kernel saw stale bytes"


def test_send_after_gated_receive_on_the_same_stream(torch, links):
    """recv(gate) then send on one stream (a decode layer): separate copy streams keep it deadlock-free."""
    la, lb = links(chunk_bytes=64 << 10, slots=2)
    s = torch.cuda.Stream()
    a_in = torch.full((500_000,), POISON, dtype=torch.uint8, device="cuda")
    b_buf = torch.full((500_000,), POISON, dtype=torch.uint8, device="cuda")
    q = _random_bytes(torch, 500_000, 7)
    torch.cuda.synchronize()
    ra = la.recv(a_in, stream=s)                   # A waits for B's answer ...
    with torch.cuda.stream(s):
        a_out = (a_in.to(torch.int16) + 1).to(torch.uint8)
    sa = la.send(a_out, stream=s)                  # ... then sends on from the same stream
    lb.send(q)                                     # B answers (before its own gated recv on the
    rb = lb.recv(b_buf)                            # default stream, which would hold this send back)
    ra.wait(30)
    rb.wait(30)
    sa.wait(30)
    torch.cuda.synchronize()
    assert torch.equal(b_buf, ((q.to(torch.int16) + 1).to(torch.uint8)))


def test_peer_loss_releases_the_gated_stream(torch, links):
    la, lb = links()
    consumer = torch.cuda.Stream()
    dst = torch.zeros(1000, dtype=torch.uint8, device="cuda")
    r = lb.recv(dst, stream=consumer)
    with torch.cuda.stream(consumer):
        dst.add_(1)
    la.close(timeout=1)
    with pytest.raises((lc.PeerLostError, lc.ClosedError)):
        r.wait(20)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("ok", consumer.synchronize() or True), daemon=True)
    t.start()
    t.join(10)
    assert box.get("ok"), "a failed receive left its stream blocked"


def test_capture_is_refused_and_the_gate_wait_captures(torch, links):
    la, lb = links(chunk_bytes=64 << 10, slots=2)
    dst = torch.zeros(1024, dtype=torch.uint8, device="cuda")
    src = torch.zeros(1024, dtype=torch.float32, device="cuda")
    out = torch.zeros(1024, dtype=torch.float32, device="cuda")
    gate = ReceiveGate(DEV)
    g = torch.cuda.CUDAGraph()
    refused = []
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        try:
            lb.recv(dst, stream=torch.cuda.current_stream())
        except lc.UnsupportedError as exc:
            refused.append(exc)
        gate.enqueue_wait(torch.cuda.current_stream().cuda_stream, 1, flags=cuda.CU_STREAM_WAIT_VALUE_EQ, reset_to=0)
        out.copy_(src * 2)
    assert refused and "CUDA graph" in str(refused[0])
    for i in range(3):
        src.fill_(float(i + 1))
        out.fill_(-1)
        torch.cuda.synchronize()
        g.replay()
        ev = torch.cuda.Event()
        ev.record()
        time.sleep(0.02)
        assert not ev.query(), f"replay {i} ran past the captured gate"
        gate.release(1)
        torch.cuda.synchronize()
        assert bool((out == 2.0 * (i + 1)).all()) and gate.value == 0, "the replayed graph must re-arm the gate"


def test_stream_ordered_writer_posts_after_the_stream(torch):
    """A pinned host region filled by a copy queued behind a busy stream is written only once it holds the data."""
    n = 1 << 20
    payload = _random_bytes(torch, n, 9)
    pinned = cuda.PinnedBuffer(DEV, n)
    writer = StreamOrderedWriter(DEV)
    try:
        with lc.Context("tcp") as a, lc.Context("tcp") as b:
            from lamina_comm.tensors import numpy_view
            local = numpy_view(pinned.address, n)
            local[:] = POISON
            target = np.zeros(n, np.uint8)
            mt = b.register(target)
            ml = a.register(local)
            ca, cb = connect_pair(b, a, server_data=mt.descriptor().to_bytes())
            s = torch.cuda.Stream()
            torch.cuda.synchronize()
            with torch.cuda.stream(s):
                _spin(torch, 100)
            with DEV.activate():
                cuda.memcpy_dtoh_async(DRV, pinned.address, payload.data_ptr(), n, s.cuda_stream)
            wr = writer.write(ca, ml, lc.RemoteRegion.from_bytes(ca.peer_data), stream=s, imm=77, notify=True)
            assert writer.pending() == 1, "posted before the stream's work was done"
            got = [c for c in cb.wait(timeout=30) if c.op == lc.Op.RECV_IMM]
            assert got and got[0].imm == 77
            mine = []
            while len(mine) < 2:
                batch = ca.wait(timeout=10)
                assert batch, mine
                mine += batch
            assert sorted((c.op, c.wr_id, c.ok) for c in mine) == sorted([(lc.Op.WRITE, wr, True),
                                                                          (lc.Op.POSTED, wr, True)])
            assert np.array_equal(target, payload.cpu().numpy())
            ml.close()
    finally:
        writer.close()
        pinned.close()


def test_no_per_message_allocation(torch):
    ea, eb = CudaCopyEngine(0), CudaCopyEngine(0)
    ca, cb, la, lb = link_pair(ea, eb, dict(chunk_bytes=64 << 10, slots=3), dict(chunk_bytes=64 << 10, slots=3))
    try:
        src = _random_bytes(torch, 200_000, 1)
        dst = torch.empty_like(src)
        s = torch.cuda.Stream()
        for _ in range(5):
            r = lb.recv(dst, stream=s)
            la.send(src)
            r.wait(10)
        def counts() -> tuple[int, int, int, int]:
            return (la.stats["events_created"], lb.stats["events_created"], ea.stats["pinned_allocs"],
                    eb.stats["pinned_allocs"])
        before = counts()
        for _ in range(50):
            r = lb.recv(dst, stream=s)
            la.send(src)
            r.wait(10)
        after = counts()
        # 50 messages of 4 chunks each: per-message events would add hundreds; the pool may add a few
        # when more copies happen to be in flight at once than during the warm-up.
        assert after[2:] == before[2:] and after[0] - before[0] < 8 and after[1] - before[1] < 8, (before, after)
    finally:
        la.close(timeout=2)
        lb.close(timeout=2)
        ea.close(2)
        eb.close(2)
        ca.close()
        cb.close()


@pytest.mark.parametrize("dtype_name, atol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_sdpa_attention_on_cuda_agrees_with_the_exact_kernel(torch, dtype_name, atol):
    """The nodes' default kernel on CUDA (torch's fused SDPA in the cache dtype) against the float32
    exact kernel over ragged prefill + decode steps: within the half-precision tolerance."""
    from lamina_comm.model import LlamaConfig, PagedKVCache
    dtype = getattr(torch, dtype_name)
    config = LlamaConfig.tiny(num_layers=1)
    caches = {kernel: PagedKVCache(config, 0, config.num_kv_heads, num_blocks=64, block_size=16, device="cuda",
                                   dtype=dtype, attention=kernel) for kernel in ("exact", "auto")}
    assert caches["auto"].attention == "sdpa"
    gen = torch.Generator(device="cuda").manual_seed(0)
    for cache in caches.values():
        for request in "ab":
            cache.reserve(request, 80)
    steps = [(["a"] * 40 + ["b"] * 7, list(range(40)) + list(range(7))), (["a", "b"], [40, 7]), (["b", "a"], [8, 41])]
    for request_ids, positions in steps:
        n = len(request_ids)
        q = torch.randn(n, config.num_heads, config.head_dim, device="cuda", generator=gen)
        k = torch.randn(n, config.num_kv_heads, config.head_dim, device="cuda", generator=gen)
        v = torch.randn(n, config.num_kv_heads, config.head_dim, device="cuda", generator=gen)
        pos = torch.tensor(positions, device="cuda")
        exact = caches["exact"].attend(0, request_ids, pos, q, k, v)
        fused = caches["auto"].attend(0, request_ids, pos, q, k, v)
        torch.testing.assert_close(fused.float(), exact.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_channel_carries_cuda_tensors_stream_ordered(torch, transport):
    """torch CUDA tensors through a channel: sent after a slow kernel on the producer stream (the copy
    waits for it, the host does not), received into poisoned CUDA destinations on a consumer stream
    that reads them after the receive; bit-exact, every dtype the wire knows, both micro-batches."""
    from lamina_comm.channel import ChannelSpec
    from ..test_channel import open_pair
    spec = ChannelSpec(max_tokens=8, hidden=256, heads=8, kv_heads=2, head_dim=32, dtype="bfloat16",
                       microbatches=2, slots_per_microbatch=2, extra_bytes=64 << 10)  # room for int64 too
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    with lc.Context(transport) as a, lc.Context(transport) as b:
        model, attention = open_pair(a, b, spec)
        try:
            for i, dtype in enumerate([torch.bfloat16, torch.float16, torch.float32, torch.int64] * 3):
                mb = i % 2
                with torch.cuda.stream(producer):
                    torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the data is final
                    q = (torch.randn(8, 8, 32, device="cuda") * 100).to(dtype)
                    k = (torch.randn(8, 2, 32, device="cuda") * 100).to(dtype)
                started = time.perf_counter()
                model.send([q, k], layer=i, microbatch=mb, stream=producer)
                # (the first send page-locks the ring; after that nothing waits for the ~10 ms kernel)
                assert i == 0 or time.perf_counter() - started < 0.005, "send waited for the device"
                q_out, k_out = torch.full_like(q, 7), torch.full_like(k, 7)
                got = attention.recv_into([q_out, k_out], mb, stream=consumer, timeout=10)
                with torch.cuda.stream(consumer):
                    same = bool(torch.equal(q_out, q)) and bool(torch.equal(k_out, k))
                torch.cuda.synchronize()
                assert same and got.layer == i and got.released
            assert model.metrics.staged_messages == 0
        finally:
            model.close()
            attention.close()


@pytest.mark.parametrize("report_compute_time", [False, True])
def test_remote_attention_stream_ordered_on_cuda(torch, report_compute_time):
    """The engine API with CUDA q/k/v and a CUDA output, on a stream: each rank's heads go by one 2D copy
    into its slot and come back by one 2D copy into its heads of out; bit-exact, poisoned output first.
    With the ranks' compute time in every reply (as lamina-node's attention node sends it), the time
    lands in ``replies`` and the output is the same."""
    from ..test_engine import SHAPE, Cluster
    cluster = Cluster(ranks=2, report_compute_time=report_compute_time)
    stream = torch.cuda.Stream()
    try:
        for layer in range(3):
            for microbatch in range(SHAPE.microbatches):
                with torch.cuda.stream(stream):
                    q = torch.randn(7, 8, 16, device="cuda")
                    k, v = torch.randn(7, 4, 16, device="cuda"), torch.randn(7, 4, 16, device="cuda")
                    cluster.remote.send(q, k, v, layer=layer, microbatch=microbatch)
                    out = torch.full((7, 8 * 16), float("nan"), device="cuda")
                    assert cluster.remote.recv_into(out, layer=layer, microbatch=microbatch) is out
                    same = torch.equal(out.view(7, 8, 16).cpu(), cluster.expected(q.cpu()))
                assert same, (layer, microbatch)
                assert all((reply.compute_ns is not None) == report_compute_time
                           for reply in cluster.remote.replies)
        assert cluster.staged_bytes() == 0
    finally:
        cluster.close()
