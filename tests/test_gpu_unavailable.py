"""The GPU tier where CUDA is missing (or forced off), and its pure-Python logic.

Runs everywhere: CUDA is made unavailable with LAMINA_LIBCUDA / LAMINA_DISABLE_CUDA
where a driver exists. The staging protocol (ring, credits, chunking,
ordering, gates, failures) runs over real tcp loopback with HostCopyEngine,
whose "device" memory is host memory.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm.gpu import cuda
from lamina_comm.gpu.memory import PathCaps, choose_path, is_cuda_object, parse_cuda_array_interface
from lamina_comm.gpu.staging import (HostCopyEngine, StagedLink, credit_imm, data_imm, decode_imm, plan_chunks,
                                     KIND_CREDIT, KIND_DATA)

from .conftest import ROOT
from .mock_cuda import build_mock_libcuda


class FakeCAI:
    """Claims to be CUDA memory; the pointer is made up and must never be touched."""

    def __init__(self, nbytes: int = 1024):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (0xDEAD0000, False),
                                         "version": 3, "strides": None, "stream": None}


class FakeDLPackCuda:
    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):  # pragma: no cover - must not be reached without CUDA
        raise AssertionError("DLPack export attempted without CUDA")


@pytest.fixture
def no_cuda(monkeypatch):
    """CUDA unavailable for the duration of a test, whatever the machine has."""
    monkeypatch.setenv("LAMINA_LIBCUDA", "/nonexistent/libcuda.so.1")
    cuda._reset_for_tests()
    yield
    monkeypatch.undo()
    cuda._reset_for_tests()


# -- availability -----------------------------------------------------------------------


def test_status_names_the_missing_driver(no_cuda):
    from lamina_comm.gpu import gpu_status
    ok, why = gpu_status()
    assert ok is False
    assert "cannot load" in why and "/nonexistent/libcuda.so.1" in why


def test_status_when_disabled(monkeypatch):
    monkeypatch.setenv("LAMINA_DISABLE_CUDA", "1")
    cuda._reset_for_tests()
    try:
        from lamina_comm.gpu import gpu_status
        assert gpu_status() == (False, "CUDA disabled by LAMINA_DISABLE_CUDA")
    finally:
        monkeypatch.undo()
        cuda._reset_for_tests()


def test_status_here_is_a_clear_tuple():
    from lamina_comm.gpu import gpu_status
    ok, why = gpu_status()
    assert isinstance(ok, bool) and isinstance(why, str) and why
    if not ok:
        assert any(word in why for word in ("driver", "device", "CUDA"))


def test_import_never_fails_without_cuda():
    env = {**os.environ, "PYTHONPATH": ROOT, "LAMINA_LIBCUDA": "/nonexistent/libcuda.so.1"}
    code = ("import lamina_comm.gpu as g, lamina_comm.gpu.staging, lamina_comm.gpu.stream, lamina_comm.gpu.memory;"
            "ok, why = g.gpu_status(); print(ok, why)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False no CUDA driver")


def test_driver_raises_typed_unavailable(no_cuda):
    with pytest.raises(cuda.CudaUnavailableError, match="cannot load") as info:
        cuda.driver()
    assert isinstance(info.value, lc.UnsupportedError)


# -- registration refused with the reason --------------------------------------------------


def test_register_cuda_refuses_with_reason(no_cuda):
    from lamina_comm.gpu import gpu_status, register_cuda
    _, why = gpu_status()
    with lc.Context("tcp") as ctx:
        with pytest.raises(lc.UnsupportedError) as info:
            register_cuda(ctx, FakeCAI())
        assert why in str(info.value) and "FakeCAI" in str(info.value)
        with pytest.raises(lc.UnsupportedError):   # the host path refuses it too
            ctx.register(FakeCAI())


def test_default_staged_link_refuses_with_reason(no_cuda):
    from lamina_comm.gpu import gpu_status
    _, why = gpu_status()
    with lc.Context("tcp") as ctx:
        with pytest.raises(lc.UnsupportedError, match="cannot load"):
            StagedLink(ctx)
        assert why


def test_cuda_buffer_refuses_with_reason(no_cuda):
    from lamina_comm.gpu import cuda_buffer
    with pytest.raises(lc.UnsupportedError, match="needs CUDA: no CUDA driver"):
        cuda_buffer(FakeCAI())
    with pytest.raises(lc.UnsupportedError, match="needs CUDA"):
        cuda_buffer(FakeDLPackCuda())


# -- recognising CUDA objects ---------------------------------------------------------------


def test_is_cuda_object():
    assert is_cuda_object(FakeCAI())
    assert is_cuda_object(FakeDLPackCuda())
    assert not is_cuda_object(np.zeros(4))
    assert not is_cuda_object(bytearray(4))
    torch = pytest.importorskip("torch")
    assert not is_cuda_object(torch.zeros(4))


def test_parse_cuda_array_interface():
    cai = {"shape": (4, 8), "typestr": "<f4", "data": (4096, False), "version": 3, "strides": None, "stream": 1}
    assert parse_cuda_array_interface(cai) == (4096, 128, False, 1)
    assert parse_cuda_array_interface({**cai, "strides": (32, 4)})[1] == 128
    assert parse_cuda_array_interface({**cai, "version": 2, "data": (8, True)}) == (8, 128, True, None)
    assert parse_cuda_array_interface({**cai, "shape": (0, 8), "data": (0, False)})[1] == 0
    assert parse_cuda_array_interface({**cai, "shape": (1, 8), "strides": (999, 4)})[1] == 32  # size-1 dims
    with pytest.raises(lc.InvalidArgumentError, match="not C-contiguous"):
        parse_cuda_array_interface({**cai, "strides": (4, 16)})
    assert parse_cuda_array_interface({**cai, "stream": 0})[3] == cuda.CU_STREAM_LEGACY  # v3 forbids 0: legacy
    with pytest.raises(lc.InvalidArgumentError, match="typestr"):
        parse_cuda_array_interface({**cai, "typestr": "f4"})
    with pytest.raises(lc.InvalidArgumentError, match="NULL"):
        parse_cuda_array_interface({**cai, "data": (0, False)})
    with pytest.raises(lc.InvalidArgumentError, match="malformed"):
        parse_cuda_array_interface({"shape": (4,)})


# -- pure logic: chunks, immediates, paths ----------------------------------------------------


@pytest.mark.parametrize("nbytes", [1, 63, 64, 65, 4096, 4097, 10 * 4096, 10 * 4096 + 1, 1 << 20])
@pytest.mark.parametrize("chunk", [64, 4096, 1 << 20])
def test_plan_chunks_tiles_the_message(nbytes, chunk):
    plan = plan_chunks(nbytes, chunk)
    assert plan[0][0] == 0
    assert all(0 < n <= chunk for _, n in plan)
    assert all(a + n == b for (a, n), (b, _) in zip(plan, plan[1:]))
    assert sum(n for _, n in plan) == nbytes
    assert len(plan) == -(-nbytes // chunk)


def test_plan_chunks_edges():
    assert plan_chunks(0, 4096) == [(0, 0)]
    with pytest.raises(lc.InvalidArgumentError):
        plan_chunks(10, 0)
    with pytest.raises(lc.InvalidArgumentError):
        plan_chunks(-1, 64)


def test_immediates_round_trip():
    for n in (0, 1, 4096, (1 << 28), (1 << 29) - 1):
        for last in (False, True):
            assert decode_imm(data_imm(n, last)) == (KIND_DATA, last, n)
    assert decode_imm(credit_imm(3)) == (KIND_CREDIT, False, 3)
    with pytest.raises(lc.InvalidArgumentError):
        data_imm(1 << 29, False)


def caps(**kw):
    base = dict(verbs=True, native_dmabuf=True, native_device_mr=True, dmabuf_supported=True,
                gpudirect_supported=True, peermem_loaded=True)
    return PathCaps(**{**base, **kw})


def test_choose_path():
    assert choose_path(caps())[0] == "dmabuf"
    assert choose_path(caps(dmabuf_supported=False))[0] == "peermem"
    path, why = choose_path(caps(native_dmabuf=False, peermem_loaded=False))
    assert path == "staging" and "lm_mr_register_dmabuf" in why and "nvidia_peermem" in why
    path, why = choose_path(caps(verbs=False))
    assert path == "staging" and "no verbs transport" in why
    assert choose_path(caps(), prefer="staging")[0] == "staging"
    assert choose_path(caps(), prefer="peermem")[0] == "peermem"
    with pytest.raises(lc.UnsupportedError, match="dmabuf registration impossible"):
        choose_path(caps(native_dmabuf=False), prefer="dmabuf")
    with pytest.raises(lc.UnsupportedError):
        choose_path(caps(verbs=False), prefer="peermem")
    with pytest.raises(lc.InvalidArgumentError):
        choose_path(caps(), prefer="nvlink")
    # Today's native library: verbs open, no entry points -> staging, and the reason says what is missing.
    path, why = choose_path(caps(native_dmabuf=False, native_device_mr=False))
    assert path == "staging" and "lm_mr_register_device" in why


# -- the staging protocol over tcp loopback, host memory standing in for the device --------------


def link_pair(engine_a=None, engine_b=None, a_kw=None, b_kw=None):
    """Two contexts and a connected StagedLink pair (a: connecting side, b: accepting side)."""
    ca, cb = lc.Context("tcp"), lc.Context("tcp")
    listener = cb.listen("127.0.0.1:0")
    box: dict = {}

    def accept() -> None:
        try:
            box["link"] = StagedLink.accept(listener, timeout=10, engine=engine_b or HostCopyEngine(),
                                            **(b_kw or {}))
        except Exception as exc:  # surfaced below
            box["err"] = exc

    t = threading.Thread(target=accept)
    t.start()
    try:
        la = StagedLink.connect(ca, listener.address, engine=engine_a or HostCopyEngine(), **(a_kw or {}))
    finally:
        t.join(15)
        listener.close()
    if "err" in box:
        raise box["err"]
    return ca, cb, la, box["link"]


@pytest.fixture
def links():
    made = []

    def make(**kw):
        pair = link_pair(**kw)
        made.append(pair)
        return pair[2], pair[3]

    yield make
    for ca, cb, la, lb in made:
        la.close(timeout=1)
        lb.close(timeout=1)
        la.engine.close(1)
        lb.engine.close(1)
        ca.close()
        cb.close()


@pytest.mark.parametrize("asynchronous", [True, False])
def test_round_trip_sizes(links, asynchronous):
    la, lb = links(engine_a=HostCopyEngine(asynchronous), engine_b=HostCopyEngine(asynchronous),
                   a_kw=dict(chunk_bytes=4096, slots=3), b_kw=dict(chunk_bytes=4096, slots=3))
    rng = np.random.default_rng(1)
    for n in (0, 1, 63, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 1, 100_000):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dst = np.full(n + 16, 0xEE, np.uint8)
        tr = lb.recv(dst)
        ts = la.send(src)
        assert tr.wait(10) == n
        assert ts.wait(10) == n
        assert np.array_equal(dst[:n], src)
        assert (dst[n:] == 0xEE).all(), "bytes past the message must stay untouched"


def test_every_post_behind_a_copy_has_run_when_the_transfers_are_done(links):
    """The native posts behind the copies (lm_poster_run) all ran once sends and receives completed: none
    left queued, none lost."""
    la, lb = links(engine_a=HostCopyEngine(delay=0.0002), a_kw=dict(chunk_bytes=1024, slots=2),
                   b_kw=dict(chunk_bytes=1024, slots=2))
    src, dst = np.arange(10_000, dtype=np.uint32).view(np.uint8), np.zeros(40_000, np.uint8)
    tr, ts = lb.recv(dst), la.send(src)
    assert tr.wait(10) == 40_000 and ts.wait(10) == 40_000 and np.array_equal(dst, src)
    assert la.stats["chunks_sent"] == len(plan_chunks(40_000, 1024)) == 40 and lb.stats["credits_sent"] == 40
    # (a post frees its record just after posting: the completion may come first)
    deadline = time.monotonic() + 5
    while (la.stats["posts_pending"], lb.stats["posts_pending"]) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert la.stats["posts_pending"] == 0 and lb.stats["posts_pending"] == 0


def test_closing_the_context_under_an_open_link_stops_it_cleanly():
    """Context.close() with the links still open: each link's poster is closed before its endpoint goes,
    so a copy that finishes later posts nothing (under `make asan`, a post on the freed endpoint would
    show); its transfers fail, and closing the link afterwards is harmless."""
    ca, cb, la, lb = link_pair(engine_a=HostCopyEngine(delay=0.05), a_kw=dict(chunk_bytes=1024, slots=2))
    pending = la.send(np.ones(8192, np.uint8))  # copies queued behind a slow "stream"
    ca.close()
    with pytest.raises((lc.ClosedError, lc.PeerLostError)):
        pending.wait(10)
    assert isinstance(la.error, lc.ClosedError)
    la.close(timeout=1)
    la.engine.close(1)
    lb.close(timeout=1)
    lb.engine.close(1)
    cb.close()


def test_both_directions_and_different_geometries(links):
    la, lb = links(a_kw=dict(chunk_bytes=8192, slots=2), b_kw=dict(chunk_bytes=4096, slots=5))
    rng = np.random.default_rng(2)
    for n in (1, 5000, 40_000):
        x = rng.integers(0, 256, n, dtype=np.uint8)
        y = rng.integers(0, 256, n, dtype=np.uint8)
        bx, ay = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        t1, t2 = lb.recv(bx), la.recv(ay)
        la.send(x)
        lb.send(y)
        t1.wait(10)
        t2.wait(10)
        assert np.array_equal(bx, x) and np.array_equal(ay, y)


def test_many_sends_before_any_receive_flow_control(links):
    """Messages far larger than the ring, all queued before the receiver posts: credits pace them."""
    la, lb = links(engine_a=HostCopyEngine(delay=0.0005), a_kw=dict(chunk_bytes=1024, slots=2),
                   b_kw=dict(chunk_bytes=1024, slots=2))
    rng = np.random.default_rng(3)
    msgs = [rng.integers(0, 256, int(rng.integers(0, 20_000)), dtype=np.uint8) for _ in range(12)]
    sends = [la.send(m) for m in msgs]
    time.sleep(0.05)
    assert not sends[-1].done(), "without receive slots the last message cannot have gone"
    for m in msgs:
        dst = np.zeros(len(m), np.uint8)
        assert lb.recv(dst).wait(10) == len(m)
        assert np.array_equal(dst, m)
    for s in sends:
        s.wait(10)


def test_receives_posted_ahead_match_in_order(links):
    la, lb = links(engine_b=HostCopyEngine(delay=0.0002), a_kw=dict(chunk_bytes=2048, slots=4),
                   b_kw=dict(chunk_bytes=2048, slots=4))
    rng = np.random.default_rng(4)
    msgs = [rng.integers(0, 256, n, dtype=np.uint8) for n in (10, 9000, 0, 2048, 30_000, 1)]
    dsts = [np.zeros(max(1, len(m)), np.uint8) for m in msgs]
    recvs = [lb.recv(d, stream=7) for d in dsts]
    for m in msgs:
        la.send(m)
    for r, d, m in zip(recvs, dsts, msgs):
        assert r.wait(10) == len(m)
        assert np.array_equal(d[:len(m)], m)
    gate = lb._gate
    assert [v for _, v in gate.waits] == list(range(1, len(msgs) + 1)), "one gate value per receive, in order"
    assert gate.value == len(msgs)


def test_no_per_message_allocation(links):
    ea, eb = HostCopyEngine(), HostCopyEngine()
    la, lb = links(engine_a=ea, engine_b=eb, a_kw=dict(chunk_bytes=1024, slots=2), b_kw=dict(chunk_bytes=1024, slots=2))
    src, dst = np.arange(5000, dtype=np.uint8), np.zeros(5000, np.uint8)
    for _ in range(50):
        r = lb.recv(dst)
        la.send(src)
        r.wait(10)
    assert ea.stats["pinned_allocs"] == 1 and eb.stats["pinned_allocs"] == 1
    # The receiver can finish before the sender's thread counts its last chunk.
    deadline = time.monotonic() + 10
    while (la.stats["chunks_sent"], lb.stats["credits_sent"]) != (250, 250) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert la.stats["chunks_sent"] == 50 * 5 and lb.stats["credits_sent"] == 50 * 5


def test_oversized_message_fails_that_receive_only(links):
    la, lb = links(a_kw=dict(chunk_bytes=1024, slots=2), b_kw=dict(chunk_bytes=1024, slots=2))
    small = np.zeros(3000, np.uint8)
    r = lb.recv(small, stream=3)
    la.send(np.ones(5000, np.uint8))
    with pytest.raises(lc.InvalidArgumentError, match="larger than the 3000-byte receive buffer"):
        r.wait(10)
    assert lb._gate.value == 1, "the gate opens even for a failed receive"
    # The link carries on: the next message lands.
    dst = np.zeros(5000, np.uint8)
    r2 = lb.recv(dst)
    la.send(np.full(5000, 7, np.uint8))
    assert r2.wait(10) == 5000 and (dst == 7).all()


def test_short_message_into_larger_buffer(links):
    la, lb = links()
    dst = np.full(100, 0xEE, np.uint8)
    r = lb.recv(dst)
    la.send(np.arange(10, dtype=np.uint8))
    assert r.wait(10) == 10
    assert np.array_equal(dst[:10], np.arange(10)) and (dst[10:] == 0xEE).all()


def test_peer_loss_fails_pending_receive_and_opens_gate(links):
    la, lb = links()
    r = lb.recv(np.zeros(100, np.uint8), stream=5)
    assert not r.done()
    la.close(timeout=1)
    with pytest.raises((lc.PeerLostError, lc.ClosedError)):
        r.wait(10)
    assert lb._gate.value == 1, "a waiting stream must be released"
    with pytest.raises((lc.PeerLostError, lc.ClosedError)):
        lb.recv(np.zeros(10, np.uint8))


def test_copy_failure_fails_the_link(links):
    eb = HostCopyEngine()
    la, lb = links(engine_b=eb)
    eb.fail_next_copy_in()
    r = lb.recv(np.zeros(10, np.uint8), stream=1)
    la.send(np.ones(10, np.uint8))
    with pytest.raises(lc.LaminaError, match="refused a chunk's copy into the device"):
        r.wait(10)
    assert lb.error is not None and lb._gate.value == 1


def test_close_waits_for_queued_sends_then_refuses(links):
    la, lb = links(a_kw=dict(chunk_bytes=1024, slots=2))
    dst = np.zeros(20_000, np.uint8)
    r = lb.recv(dst)
    s = la.send(np.full(20_000, 3, np.uint8))
    r.wait(10)
    la.close(timeout=5)
    assert s.wait(0) == 20_000 and (dst == 3).all()
    with pytest.raises(lc.ClosedError):
        la.send(np.zeros(4, np.uint8))


def test_pending_send_fails_on_close(links):
    la, lb = links(a_kw=dict(chunk_bytes=1024, slots=1), b_kw=dict(chunk_bytes=1024, slots=1))
    s = la.send(np.zeros(10_000, np.uint8))   # needs 10 credits, the peer never receives
    la.close(timeout=0.2)
    with pytest.raises(lc.ClosedError):
        s.wait(5)


def test_hello_from_a_stranger_is_refused():
    with lc.Context("tcp") as a, lc.Context("tcp") as b:
        listener = b.listen("127.0.0.1:0")
        t = threading.Thread(target=lambda: listener.accept(timeout=10, private_data=b"not a staged link"))
        t.start()
        with pytest.raises(lc.ProtocolError, match="not a staged link"):
            StagedLink.connect(a, listener.address, engine=HostCopyEngine())
        t.join(10)


def test_bad_geometry_is_refused():
    with lc.Context("tcp") as ctx:
        with pytest.raises(lc.InvalidArgumentError):
            StagedLink(ctx, HostCopyEngine(), chunk_bytes=100)
        with pytest.raises(lc.InvalidArgumentError):
            StagedLink(ctx, HostCopyEngine(), slots=0)


# -- the ctypes layer against a mock driver ----------------------------------------------------------


MOCK_SCRIPT = r"""
import ctypes, json, logging, sys
import numpy as np
import lamina_comm as lc
from lamina_comm.gpu import CudaCopyEngine, cuda, gpu_status, register_cuda
from tests.test_gpu_unavailable import link_pair

records = []
logging.getLogger("lamina_comm.gpu").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: records.append(r.getMessage())})())
out = {"status": gpu_status()}
dev = cuda.get_device(0)
ca, cb, la, lb = link_pair(CudaCopyEngine(0), CudaCopyEngine(0), dict(chunk_bytes=4096, slots=3),
                           dict(chunk_bytes=4096, slots=3))
rng = np.random.default_rng(0)
ok = []
for n in (1, 4096, 50001, 0):
    a, b = cuda.DeviceAllocation(dev, n), cuda.DeviceAllocation(dev, n + 8)
    av = np.frombuffer((ctypes.c_char * max(n, 1)).from_address(a.ptr), np.uint8)[:n]
    bv = np.frombuffer((ctypes.c_char * (n + 8)).from_address(b.ptr), np.uint8)
    av[:] = rng.integers(0, 256, n, dtype=np.uint8)
    bv[:] = 0xFF
    s = la.send(a)
    r = lb.recv(b, stream=0x1234)
    ok.append(r.wait(10) == n and s.wait(10) == n and bool(np.array_equal(bv[:n], av)) and bool((bv[n:] == 0xFF).all()))
out["round_trips"] = ok
out["gate"] = lb._gate.value
out["stream_waits"] = ctypes.CDLL(sys.argv[1]).mock_waits()
out["hostfns"] = ctypes.CDLL(sys.argv[1]).mock_hostfns_run()
out["chunks"] = [la.stats["chunks_sent"], lb.stats["credits_sent"]]
import threading
out["threads"] = sorted(t.name for t in threading.enumerate() if t.name.startswith("lamina"))
import glob
out["native_threads"] = sorted(n for n in (open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm"))
                               if n.startswith("lamina-staged"))
from lamina_comm.gpu import memory
with lc.Context("tcp") as ctx:
    reg = register_cuda(ctx, cuda.DeviceAllocation(dev, 100))
    out["path"] = reg.path
    # Context.register hands CUDA memory to the GPU tier, and closes it with the context.
    held = ctx.register(cuda.DeviceAllocation(dev, 100))
    out["register"] = [type(held).__name__, held.path, held.path_reason]
    # A driver offering dma-buf and a context claiming verbs: the native call is made for real and
    # refused (tcp cannot reach device memory), so the region falls back to staging and says why.
    real_probe = memory.probe_caps
    memory.probe_caps = lambda c, d: memory.PathCaps(True, True, True, True, False, False)
    fallback = ctx.register(cuda.DeviceAllocation(dev, 100))
    out["fallback"] = [fallback.path, fallback.path_reason]
    try:
        register_cuda(ctx, cuda.DeviceAllocation(dev, 100), prefer="dmabuf")
    except lc.UnsupportedError as exc:
        out["asked_for"] = str(exc)
    memory.probe_caps = real_probe
out["closed_with_context"] = held.closed and fallback.closed
try:
    dev.driver.call("cuMemFree", 0x1234)
except cuda.CudaError as exc:
    out["error"] = [exc.name, str(exc)]
la.close(timeout=1); lb.close(timeout=1); ca.close(); cb.close()
out["leaks"] = [m for m in records if "leaked" in m]
print(json.dumps(out))
"""


@pytest.mark.parametrize("host_functions", ["inline", "driver thread"])
def test_cuda_layer_against_a_mock_driver(tmp_path, host_functions):
    """Symbols, argument plumbing and context handling of the CUDA engine, with a host-memory mock driver.

    The mock refuses every call made without the primary context current
    (CUDA_ERROR_INVALID_CONTEXT), as the real driver does. Its host functions run at once, or on a
    thread of their own after the caller returned, as the driver runs them.
    """
    lib = build_mock_libcuda(tmp_path)
    if lib is None:
        pytest.skip("no gcc to build the mock driver")
    env = {**os.environ, "PYTHONPATH": ROOT, "LAMINA_LIBCUDA": str(lib)}
    env.pop("LAMINA_DISABLE_CUDA", None)
    if host_functions == "driver thread":
        env["MOCK_CUDA_HOSTFN_THREAD"] = "1"
    run = subprocess.run([sys.executable, "-c", MOCK_SCRIPT, str(lib)], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    import json
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["status"][0] is True and "Mock GPU" in out["status"][1]
    assert out["round_trips"] == [True] * 4
    assert out["gate"] == 4 and out["stream_waits"] == 4, "one stream wait and one gate write per gated receive"
    # Per chunk, one host function posts the data write behind its copy out, and one the credit behind
    # its copy in (1 + 1 + 13 + 1 chunks of 4 KiB); no helper thread waits on the copies, and each link's
    # completions are handled on a native thread of its own.
    assert out["chunks"] == [16, 16] and out["hostfns"] == 32, out
    assert out["threads"] == [], "no Python thread per link: completions are handled in native code"
    assert out["native_threads"] == ["lamina-staged", "lamina-staged"], out["native_threads"]
    assert out["path"] == "staging"
    assert out["register"][:2] == ["CudaRegion", "staging"] and "no verbs transport" in out["register"][2]
    assert out["fallback"][0] == "staging"
    assert "dmabuf: " in out["fallback"][1] and "reaches device memory" in out["fallback"][1], out["fallback"]
    assert "the transport refused it" in out["fallback"][1]
    assert "reaches device memory" in out["asked_for"], "a path asked for by name is not silently replaced"
    assert out["closed_with_context"]
    assert out["error"][0] == "CUDA_ERROR_INVALID_VALUE" and "cuMemFree" in out["error"][1]
    assert out["leaks"] == [], "close() must find the copy streams idle and free the ring"


def test_the_device_check_runs_end_to_end_against_the_mock_driver(tmp_path):
    """tools/device_check.py, the one script for a lent GPU machine, with the mock driver standing in: the
    copy ceilings, the staged GPU-to-GPU link (its native data plane calling the driver's entry points)
    with its bit-exact check, and the GPU latency rows all run, and the verdict is PASS. A dry run of the
    plumbing before device time is spent on it; the numbers are the mock's (host memcpy), not a GPU's."""
    import json
    lib = build_mock_libcuda(tmp_path)
    if lib is None:
        pytest.skip("no gcc to build the mock driver")
    env = {**os.environ, "PYTHONPATH": ROOT, "LAMINA_LIBCUDA": str(lib)}
    env.pop("LAMINA_DISABLE_CUDA", None)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "tools/device_check.py", "--quick", "--skip-tests", "--skip-decode",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    result = json.loads((out / "device_check.json").read_text())
    assert result["verdict"] == "PASS", result
    assert "Mock GPU" in json.dumps(result["env"])
    assert result["staged"]["data_ok"] is True and set(result["staged"]["GBps"]) == {"1MiBx8", "4MiBx4"}
    assert "error" not in result["copy"] and result["copy"]["dtoh_GBps"] > 0
    for size in ("64B", "65536B"):
        assert {"staged_gpu", "channel_gpu"} <= set(result["latency"][size]), result["latency"][size]
