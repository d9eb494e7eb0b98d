"""The verbs transport on soft-RoCE (rxe0), through the Python API.

Runs only where RXE_DEV names a verbs device: tools/rxe-test.sh runs it in the
soft-RoCE guest. Everything there is emulated and ~20x slower than the host, so
sizes and counts stay small and each test builds its own endpoints.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm._bindings import check, ffi, lib

from ..conftest import connect_pair as _connect_pair

RXE_DEV = os.environ.get("RXE_DEV")
HOST = os.environ.get("RXE_IP", "127.0.0.1")
MiB = 1 << 20

pytestmark = [
    pytest.mark.rxe,
    pytest.mark.skipif(not RXE_DEV, reason="needs a verbs device (RXE_DEV): run tools/rxe-test.sh"),
]


def connect_pair(server: lc.Context, client: lc.Context, server_data: bytes = b"",
                 client_data: bytes = b"", timeout: float = 60.0):
    """Connected endpoints (client side, server side); bootstrap over the rxe netdev's address."""
    return _connect_pair(server, client, server_data, client_data, timeout, host=HOST)


def collect(ep: lc.Endpoint, count: int, timeout: float = 60.0) -> list[lc.Completion]:
    out: list[lc.Completion] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} completions within {timeout} s"
        out += ep.wait(timeout=left, max_entries=count - len(out))
    return out


def eventually(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclasses.dataclass
class Link:
    """Initiator context a, target context b, a connected endpoint pair and one region each."""

    a: lc.Context
    b: lc.Context
    source: np.ndarray
    target: np.ndarray
    src_mr: lc.MemoryRegion
    dst_mr: lc.MemoryRegion
    ini: lc.Endpoint
    tgt: lc.Endpoint

    @property
    def remote(self) -> lc.RemoteRegion:
        return lc.RemoteRegion.from_bytes(self.ini.peer_data)


@pytest.fixture
def link():
    rng = np.random.default_rng(2024)
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        source = rng.integers(0, 256, MiB, dtype=np.uint8)
        target = np.zeros(MiB, np.uint8)
        src_mr, dst_mr = a.register(source), b.register(target)
        ini, tgt = connect_pair(b, a, server_data=dst_mr.descriptor().to_bytes())
        yield Link(a, b, source, target, src_mr, dst_mr, ini, tgt)


# ---- device, context, negotiation -----------------------------------------------------

def test_context_opens_verbs_on_rxe():
    with lc.Context("verbs") as ctx:
        assert ctx.transports == ["verbs"]
        assert ctx.transport_status("verbs") == ""
        mr = ctx.register(np.zeros(4096, np.uint8))
        assert mr.descriptor().rkey != 0
    gid_index = int(os.environ.get("RXE_GID_INDEX", "1"))
    with lc.Context("verbs", ib_device=RXE_DEV, gid_index=gid_index) as ctx:
        assert ctx.transports == ["verbs"]


def test_missing_device_is_reported_and_auto_falls_back_to_tcp():
    with pytest.raises(lc.UnsupportedError):
        lc.Context("verbs", ib_device="no_such_dev0")
    with lc.Context("auto", ib_device="no_such_dev0") as ctx:
        assert "verbs" not in ctx.transports and "tcp" in ctx.transports
        why = ctx.transport_status("verbs")
        assert "no_such_dev0" in why and RXE_DEV in why


def test_endpoints_negotiate_verbs():
    # auto on both sides of one host picks shm; against a verbs-only peer it picks verbs.
    with lc.Context() as a, lc.Context() as same_host, lc.Context("verbs") as b:
        assert "verbs" in a.transports and "shm" in a.transports
        ab, _ = connect_pair(same_host, a)
        assert ab.transport == "shm"
        target = np.zeros(4096, np.uint8)
        ini, tgt = connect_pair(b, a, server_data=b.register(target).descriptor().to_bytes())
        assert ini.transport == "verbs" and tgt.transport == "verbs"
        assert "hw_offload" in ini.capabilities and "remote_ack" in tgt.capabilities
        src = a.register(np.full(4096, 7, np.uint8))
        ini.write(src, lc.RemoteRegion.from_bytes(ini.peer_data), imm=5)
        assert ini.wait_one(30).ok
        got = tgt.wait_one(30)
        assert (got.op, got.imm, got.byte_len) == (lc.Op.RECV_IMM, 5, 4096)
        assert (target == 7).all()


# ---- data movement -----------------------------------------------------------------------

def test_random_writes_land_byte_for_byte(link):
    rng = np.random.default_rng(11)
    # Around the inline threshold, page and chunk-free sizes, then random ones.
    sizes = [0, 1, 63, 64, 127, 128, 129, 4095, 4096, 65536, 200_000]
    sizes += [int(s) for s in rng.integers(1, 256 * 1024, 40)]
    expected = np.zeros_like(link.target)
    posted = []
    for n in sizes:
        src_off = int(rng.integers(0, MiB - n + 1))
        dst_off = int(rng.integers(0, MiB - n + 1))
        posted.append(link.ini.write(link.src_mr, link.remote, local_offset=src_off,
                                     remote_offset=dst_off, length=n))
        expected[dst_off:dst_off + n] = link.source[src_off:src_off + n]  # RC keeps write order
    done = collect(link.ini, len(posted))
    assert all(c.ok and c.op == lc.Op.WRITE for c in done), [c for c in done if not c.ok]
    assert sorted(c.wr_id for c in done) == sorted(posted)
    assert {c.wr_id: c.byte_len for c in done} == dict(zip(posted, sizes))
    assert np.array_equal(link.target, expected)
    assert link.tgt.poll() == [], "writes without immediate raise nothing on the target"


def test_immediates_arrive_intact_and_in_order(link):
    # More writes than the send queue holds: the rest wait in host memory.
    count, slot = 300, 2048
    rng = np.random.default_rng(5)
    sizes = [int(s) for s in rng.integers(0, slot + 1, count)]
    imms = [(i * 2654435761) & 0xFFFFFFFF for i in range(count)]
    for i, (n, imm) in enumerate(zip(sizes, imms)):
        link.ini.write(link.src_mr, link.remote, local_offset=i * slot, remote_offset=i * slot,
                       length=n, imm=imm)
    remote = collect(link.tgt, count)
    assert [c.op for c in remote] == [lc.Op.RECV_IMM] * count
    assert [c.imm for c in remote] == imms
    assert [c.byte_len for c in remote] == sizes
    local = collect(link.ini, count)
    assert all(c.ok for c in local)
    assert [c.wr_id for c in local] == sorted(c.wr_id for c in local)
    for i, n in enumerate(sizes):
        assert np.array_equal(link.target[i * slot:i * slot + n], link.source[i * slot:i * slot + n])
    assert link.ini.outstanding == 0


def test_reads_fetch_the_remote_bytes(link):
    rng = np.random.default_rng(3)
    link.target[:] = rng.integers(0, 256, MiB, dtype=np.uint8)
    local = np.zeros(MiB, np.uint8)
    mr = link.a.register(local)
    ranges = [(0, 0), (0, 1), (5, 100), (4096, 65536)]
    ranges += [(int(o), int(n)) for o, n in zip(rng.integers(0, MiB // 2, 16), rng.integers(1, MiB // 2, 16))]
    for i, (off, n) in enumerate(ranges):
        link.ini.read(mr, link.remote, local_offset=off, remote_offset=off, length=n, wr_id=100 + i)
    done = collect(link.ini, len(ranges))
    assert all(c.ok and c.op == lc.Op.READ for c in done)
    assert sorted(c.wr_id for c in done) == [100 + i for i in range(len(ranges))]
    for off, n in ranges:
        assert np.array_equal(local[off:off + n], link.target[off:off + n])
    assert link.tgt.poll() == [], "the target's application is not involved in a read"


def test_transfers_beyond_the_port_message_size_are_split():
    # rxe's max_msg_sz is 8 MiB: 20 MiB goes as three WRs, one completion, one immediate.
    size = 20 * MiB
    rng = np.random.default_rng(9)
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        source = rng.integers(0, 256, size, dtype=np.uint8)
        target = np.zeros(size, np.uint8)
        ms, mt = a.register(source), b.register(target)
        ini, tgt = connect_pair(b, a, server_data=mt.descriptor().to_bytes())
        ini.write(ms, lc.RemoteRegion.from_bytes(ini.peer_data), imm=77)
        done = ini.wait_one(120)
        assert done.ok and done.byte_len == size
        got = tgt.wait_one(30)
        assert (got.op, got.imm) == (lc.Op.RECV_IMM, 77)
        assert np.array_equal(target, source)
        assert tgt.poll() == []
        back = np.zeros(size, np.uint8)
        ini.read(a.register(back), lc.RemoteRegion.from_bytes(ini.peer_data))
        got = ini.wait_one(120)
        assert got.ok and got.byte_len == size and np.array_equal(back, source)


def test_gather_writes_land_byte_for_byte(link):
    # More pieces than one WR's scatter-gather list holds, so a gather spans several WRs.
    rng = np.random.default_rng(12)
    expected = np.zeros_like(link.target)
    counts = [2, 15, 16, 17, 100, 500]
    for i, count in enumerate(counts):
        lengths = rng.integers(0, 1024, count)
        pieces = [(int(rng.integers(0, MiB - n + 1)), int(n)) for n in lengths]
        total = int(lengths.sum())
        dst_off = int(rng.integers(0, MiB - total + 1))
        link.ini.writev(link.src_mr, pieces, link.remote, remote_offset=dst_off, imm=i)
        expected[dst_off:dst_off + total] = np.concatenate([link.source[o:o + n] for o, n in pieces])
    done = collect(link.ini, len(counts))
    assert all(c.ok and c.op == lc.Op.WRITE for c in done), [c for c in done if not c.ok]
    got = collect(link.tgt, len(counts))
    assert [c.imm for c in got] == list(range(len(counts)))
    assert np.array_equal(link.target, expected)


def test_a_gather_beyond_the_port_message_size_splits_inside_a_piece():
    # rxe's max_msg_sz is 8 MiB: three 4 MiB pieces go as two WRs, the middle piece split.
    rng = np.random.default_rng(13)
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        source = rng.integers(0, 256, 16 * MiB, dtype=np.uint8)
        target = np.zeros(12 * MiB, np.uint8)
        ms, mt = a.register(source), b.register(target)
        ini, tgt = connect_pair(b, a, server_data=mt.descriptor().to_bytes())
        pieces = [(12 * MiB, 4 * MiB), (0, 4 * MiB), (6 * MiB, 4 * MiB)]
        ini.writev(ms, pieces, lc.RemoteRegion.from_bytes(ini.peer_data), imm=5)
        done = ini.wait_one(120)
        assert done.ok and done.byte_len == 12 * MiB
        assert (tgt.wait_one(30).imm, tgt.poll()) == (5, [])
        assert np.array_equal(target, np.concatenate([source[o:o + n] for o, n in pieces]))


def channel_spec():
    from lamina_comm.channel import ChannelSpec
    return ChannelSpec(max_tokens=8, hidden=64, heads=4, kv_heads=2, head_dim=16, dtype="float16",
                       microbatches=1, slots_per_microbatch=2)


def open_channels(a: lc.Context, b: lc.Context, attention_payloads=None):
    """(model side on a, attention side on b), bootstrapped over the rxe netdev's address."""
    from lamina_comm.channel import Channel, ChannelListener
    spec = channel_spec()
    listener = ChannelListener(b, f"{HOST}:0", spec, timeout=60)
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("ch", listener.accept(timeout=60,
                                                                                  payloads=attention_payloads)))
    thread.start()
    try:
        model = Channel.connect(a, listener.address, spec, timeout=60)
    finally:
        thread.join(60)
        listener.close()
    return model, box["ch"]


def test_a_fused_qkv_split_goes_over_verbs_without_a_copy():
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        model, attention = open_channels(a, b)
        fused = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float16)
        model.add_source_region(a.register(fused))
        q, k, v = fused[:, :64].reshape(8, 4, 16), fused[:, 64:96].reshape(8, 2, 16), fused[:, 96:].reshape(8, 2, 16)
        model.send((q, k, v), layer=3, microbatch=0)
        assert (model.metrics.gather_messages, model.metrics.staged_bytes) == (1, 0)
        with attention.recv(timeout=60) as msg:
            assert msg.layer == 3
            for got, sent in zip(msg.tensors, (q, k, v)):
                assert got.shape == sent.shape and got.tobytes() == np.ascontiguousarray(sent).tobytes()
        model.close()
        attention.close()


def test_a_staged_link_moves_messages_over_verbs():
    """The staged link's native data plane over RC queue pairs (host memory standing in for the device):
    messages of 0 to 10 chunks through 2-slot rings both ways, credits pacing them, gated receives in
    order, and an oversized message failing only its receive."""
    from lamina_comm.gpu import HostCopyEngine, StagedLink
    rng = np.random.default_rng(7)
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        listener = b.listen((HOST, 0))
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("lb", StagedLink.accept(
            listener, timeout=60, engine=HostCopyEngine(), chunk_bytes=4096, slots=2)))
        t.start()
        la = StagedLink.connect(a, listener.address, engine=HostCopyEngine(), chunk_bytes=4096, slots=2, timeout=60)
        t.join(60)
        listener.close()
        lb = box["lb"]
        try:
            assert la._ep.transport == "verbs"
            for i, n in enumerate((0, 1, 4096, 4097, 40_000)):
                x, y = rng.integers(0, 256, n, dtype=np.uint8), rng.integers(0, 256, n, dtype=np.uint8)
                bx, ay = np.full(n + 8, 0xEE, np.uint8), np.zeros(n, np.uint8)
                rb, ra = lb.recv(bx, stream=5), la.recv(ay)
                sa, sb = la.send(x), lb.send(y)
                assert rb.wait(60) == n and ra.wait(60) == n and sa.wait(60) == n and sb.wait(60) == n
                assert np.array_equal(bx[:n], x) and (bx[n:] == 0xEE).all() and np.array_equal(ay, y)
                assert lb._gate.value == i + 1
            small = lb.recv(np.zeros(100, np.uint8))
            la.send(np.ones(9000, np.uint8))
            with pytest.raises(lc.InvalidArgumentError, match="larger than the 100-byte receive buffer"):
                small.wait(60)
            dst = np.zeros(10, np.uint8)  # the link carries on: the next message lands
            received = lb.recv(dst)
            la.send(np.full(10, 9, np.uint8))
            assert received.wait(60) == 10 and (dst == 9).all()
        finally:
            la.close(timeout=5)
            lb.close(timeout=5)
            la.engine.close(5)
            lb.engine.close(5)


def test_many_endpoints_share_one_completion_queue():
    # Enough queue pairs to make the shared CQ grow; completions find their endpoint.
    count = 8
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        target = np.zeros(count * 4096, np.uint8)
        mt = b.register(target)
        src = a.register(np.arange(count * 4096, dtype=np.uint32).astype(np.uint8))
        pairs = [connect_pair(b, a, server_data=mt.descriptor().to_bytes()) for _ in range(count)]
        for i, (ini, _) in enumerate(pairs):
            ini.write(src, lc.RemoteRegion.from_bytes(ini.peer_data), local_offset=i * 4096,
                      remote_offset=i * 4096, length=4096, imm=i)
        for i, (ini, tgt) in enumerate(pairs):
            assert ini.wait_one(60).ok
            got = tgt.wait_one(60)
            assert (got.op, got.imm, got.endpoint) == (lc.Op.RECV_IMM, i, tgt)
        assert np.array_equal(target, src.view())


# ---- device memory: the GPUDirect registration paths ---------------------------------------------

class DeviceRegion:
    """A region made by lm_mr_register_device over host memory. rxe pins any user memory, so host
    memory stands in for the GPU pointer nvidia-peermem would resolve: what this exercises is the
    plumbing (verbs registers it, tcp and shm refuse it), not GPU memory itself."""

    def __init__(self, ctx: lc.Context, array: np.ndarray):
        out = ffi.new("lm_mr_t **")
        check(lib.lm_mr_register_device(ctx._handle(), ffi.cast("void *", array.ctypes.data), array.nbytes,
                                        int(lc.Access.ALL), out), "register device memory")
        self._mr, self.array, self.nbytes = out[0], array, array.nbytes
        desc = ffi.new("lm_rdesc_t *")
        check(lib.lm_mr_descriptor(self._mr, desc), "descriptor")
        self.remote = lc.RemoteRegion(desc.key, desc.addr, desc.length, desc.rkey, desc.access)

    def _handle(self):
        return self._mr

    def close(self) -> None:  # before the context closes (it would deregister the region itself)
        lib.lm_mr_deregister(self._mr)


def test_device_memory_moves_over_verbs_only():
    rng = np.random.default_rng(11)
    n = 64 * 1024
    with lc.Context() as a, lc.Context("verbs") as b, lc.Context() as c:
        assert "verbs" in a.transports and "shm" in a.transports
        source, target = rng.integers(0, 256, n, dtype=np.uint8), np.zeros(n, np.uint8)
        src, dst = DeviceRegion(a, source), DeviceRegion(b, target)
        try:
            ini, tgt = connect_pair(b, a, server_data=dst.remote.to_bytes())
            assert ini.transport == "verbs"
            # A write small enough to go inline (which the CPU would copy: never from device
            # memory), then the rest, device region to device region.
            ini.write(src, dst.remote, length=16, imm=1)
            ini.write(src, dst.remote, local_offset=16, remote_offset=16, length=n - 16, imm=2)
            assert all(done.ok for done in collect(ini, 2))
            assert [got.imm for got in collect(tgt, 2)] == [1, 2]
            assert np.array_equal(target, source)
            # shm copies with the CPU: it refuses the region locally, and a peer's write to its key
            # finds no region there; the memory is untouched.
            near, far = connect_pair(c, a)
            assert near.transport == "shm"
            peer_target = c.register(np.zeros(4096, np.uint8))
            with pytest.raises(lc.UnsupportedError, match="device memory, which shm cannot reach"):
                near.write(src, peer_target.descriptor(), length=16)
            before = source.copy()
            far.write(c.register(np.full(4096, 9, np.uint8)), src.remote, length=16, imm=3)
            assert isinstance(far.wait_one(30).error(), lc.NoKeyError)
            assert np.array_equal(source, before)
        finally:
            src.close()
            dst.close()


@pytest.fixture
def mock_gpudirect(tmp_path, monkeypatch):
    """The mock driver as a GPU offering GPUDirect RDMA, with nvidia-peermem taken as loaded: its "device"
    memory is host memory, which rxe pins, so ibv_reg_mr on the device pointer stands in for peermem."""
    from lamina_comm.gpu import memory

    from ..mock_cuda import build_mock_libcuda, mock_driver_in_process
    lib_path = build_mock_libcuda(tmp_path)
    assert lib_path, "gcc is needed to build the mock driver (tools/rxe-test.sh builds it on the host)"
    monkeypatch.setattr(memory, "peermem_loaded", lambda: True)
    # Host functions on a thread of their own, as CUDA's.
    with mock_driver_in_process(monkeypatch, lib_path, "MOCK_CUDA_GPUDIRECT", "MOCK_CUDA_HOSTFN_THREAD") as dev:
        yield dev


def test_cuda_tensors_go_straight_from_registered_device_memory(mock_gpudirect):
    """GPUDirect sends through the Python API: q, k, v column blocks of a fused projection in a CUDA region
    registered for the NIC go, stream-ordered, as gather writes from that region: nothing through the
    slot. The same region on an shm channel is refused with the reason, and its tensors are staged."""
    from ..mock_cuda import MockDeviceArray, assert_sent_through_the_slot
    rng = np.random.default_rng(5)
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        fused = MockDeviceArray(mock_gpudirect, (8, 128), "float16")
        region = a.register(fused)
        assert region.path == "peermem", region.path_reason
        model, attention = open_channels(a, b)
        try:
            assert model.add_source_region(region) == ""
            q, k, v = (MockDeviceArray(mock_gpudirect, (8, 128), "float16", base=fused, columns=cols)
                       for cols in ((0, 64), (64, 32), (96, 32)))
            for layer in range(3):
                fused.full[...] = rng.standard_normal((8, 128)).astype(np.float16)
                model.send([q, k, v], layer=layer, microbatch=0, stream=0x77)
                with attention.recv(0, timeout=60) as msg:
                    assert msg.layer == layer
                    for got, sent in zip(msg.tensors, (q, k, v)):
                        assert got.shape == sent.shape and got.tobytes() == np.ascontiguousarray(sent.host).tobytes()
                model.flush(60)  # sent: the next round may rewrite the source
            metrics = model.metrics
            assert model.device_direct_messages == 3
            assert (metrics.gather_messages, metrics.slot_messages, metrics.staged_bytes) == (3, 0, 0), metrics
        finally:
            model.close()
            attention.close()
    from ..test_channel import WAIT_S, open_pair
    with lc.Context() as c, lc.Context() as d:
        fused = MockDeviceArray(mock_gpudirect, (8, 128), "float16")
        region = c.register(fused)
        assert region.path == "peermem", region.path_reason
        model, attention = open_pair(c, d)
        try:
            assert model.endpoint.transport == "shm"
            assert "runs over shm" in model.add_source_region(region)
            # Below the Python check, native code refuses it too (the CPU would have to read the GPU).
            from ..test_channel_device import _prepare_send_from
            rc, _, _ = _prepare_send_from(model, [fused.host[:4, :64]], [region])
            assert rc == lib.LM_ERR_UNSUPPORTED
            assert "device memory, which shm cannot reach" in ffi.string(lib.lm_last_error()).decode()
            assert_sent_through_the_slot(model, attention, MockDeviceArray(mock_gpudirect, (4, 4, 16), "float16"), 2,
                                         WAIT_S)
        finally:
            model.close()
            attention.close()


def test_a_direct_send_releases_its_source_to_a_stream_once_its_writes_completed(mock_gpudirect, tmp_path):
    """A send straight from GPU memory is read by the NIC after the stream passed it: wait_sent_on(s)
    queues on s a wait (cuStreamWaitValue32) for the word native code advances when the writes complete,
    so a kernel overwriting the source runs after the reads, and the host never waits."""
    import ctypes

    from ..mock_cuda import MockDeviceArray, build_mock_libcuda
    mock = ctypes.CDLL(build_mock_libcuda(tmp_path))
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        fused = MockDeviceArray(mock_gpudirect, (8, 128), "float16")
        region = a.register(fused)
        model, attention = open_channels(a, b)
        try:
            assert model.add_source_region(region) == ""
            q = MockDeviceArray(mock_gpudirect, (8, 64), "float16", base=fused, columns=(0, 64))
            assert not model.wait_sent_on(0x88, 0) and model.device_sent(0)  # nothing sent from GPU memory
            for layer in range(3):
                fused.full[...] = layer + 1
                mock.mock_hold_hostfns(1)  # the stream has not reached the send: nothing posted
                model.send([q], layer=layer, microbatch=0, stream=0x77)
                assert not model.device_sent(0)
                assert model.wait_sent_on(0x88, 0)
                address, value = ctypes.c_uint64(), ctypes.c_uint32()
                mock.mock_last_wait(ctypes.byref(address), ctypes.byref(value))
                words = model._staging._sent_words
                assert (address.value, value.value) == (words.device_address, layer + 1)  # seq + 1
                mock.mock_hold_hostfns(0)
                with attention.recv(0, timeout=60) as msg:
                    assert msg.layer == layer and (msg.tensors[0] == layer + 1).all()
                assert eventually(lambda: model.device_sent(0))
                assert not model.wait_sent_on(0x88, 0)  # sent: nothing to wait for
        finally:
            mock.mock_hold_hostfns(0)
            model.close()
            attention.close()


def test_payloads_land_in_registered_device_memory(mock_gpudirect):
    """GPUDirect receives: the attention side names a CUDA region registered for the NIC (peermem, the
    mock's memory) as its payload region; the NIC writes q/k/v there and only headers into the ring.
    recv() hands out CUDA views of the region (no copy); recv_into CUDA tensors copies device to device
    on the stream. Over shm the same region is refused at setup."""
    from lamina_comm.channel.device import DeviceSlotView
    from lamina_comm.channel.spec import RingLayout

    from ..mock_cuda import MockDeviceArray
    rng = np.random.default_rng(6)
    need = RingLayout.for_role(channel_spec(), "attention").payload_bytes
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        landing = MockDeviceArray(mock_gpudirect, (need,))
        region = b.register(landing)
        assert region.path == "peermem", region.path_reason
        model, attention = open_channels(a, b, attention_payloads=region)
        try:
            q = rng.standard_normal((8, 4, 16)).astype(np.float16)
            k = rng.standard_normal((8, 2, 16)).astype(np.float16)
            for layer in (0, 1, 2):  # more messages than slots: each slot must come back
                model.send([q, k], layer=layer, microbatch=0)
                got = attention.recv(0, timeout=60)
                views = got.tensors
                assert all(isinstance(v, DeviceSlotView) for v in views)
                for view, sent in zip(views, (q, k)):
                    ptr = view.__cuda_array_interface__["data"][0]
                    assert region.address <= ptr and ptr + sent.nbytes <= region.address + region.nbytes
                    offset = ptr - region.address
                    assert landing.host[offset:offset + sent.nbytes].tobytes() == sent.tobytes()
                got.release(stream=0x99)  # back once the kernels queued there (reading the views) ran
            attention.flush(60)
            model.send([q, k], layer=3, microbatch=0)
            q_out, k_out = MockDeviceArray(mock_gpudirect, q.shape, "float16"), MockDeviceArray(
                mock_gpudirect, k.shape, "float16")
            got = attention.recv_into([q_out, k_out], 0, stream=0x99, timeout=60)
            attention.flush(60)  # the stream's copies done (and the slot handed back)
            assert got.layer == 3 and np.array_equal(q_out.host, q) and np.array_equal(k_out.host, k)
            from ..test_channel import assert_ring_payloads_untouched
            assert_ring_payloads_untouched(attention)  # only headers went into the ring
        finally:
            model.close()
            attention.close()
    from ..test_channel import SPEC, open_pair
    with lc.Context() as c, lc.Context() as d:
        region = d.register(MockDeviceArray(mock_gpudirect, (RingLayout.for_role(SPEC, "attention").payload_bytes,)))
        with pytest.raises(lc.UnsupportedError, match="need a NIC that writes it"):
            open_pair(c, d, attention_payloads=region)


def test_the_engine_serves_layers_through_device_payload_regions(mock_gpudirect):
    """The engine API over GPUDirect receives, both ways: each side's data micro-batches land in a CUDA
    region registered for the NIC (peermem, the mock's memory), the control micro-batch in the ring.
    The attention ranks read q from device views (no copy) or copy them out with to_device, and answer
    stream-ordered; recv_into a CUDA tensor copies every rank's heads device to device; step metadata,
    compute times and an error text reach the host."""
    import ctypes

    from lamina_comm.channel.device import DeviceSlotView
    from lamina_comm.engine import AttentionRankError, AttentionService, AttentionShape, RemoteAttention

    from ..mock_cuda import MockDeviceArray
    shape = AttentionShape(num_heads=8, num_kv_heads=4, head_dim=16, max_tokens=4, dtype="float16")
    ranks, tokens = 2, 3

    def host_of(view):  # the mock's device memory is host memory
        raw = (ctypes.c_char * view.nbytes).from_address(view.ptr)
        return np.frombuffer(raw, np.float16).reshape(view.shape)

    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        landings = [MockDeviceArray(mock_gpudirect, (shape.payload_bytes(r, ranks, "attention"),))
                    for r in range(ranks)]
        service_regions = [b.register(landing) for landing in landings]
        assert all(region.path == "peermem" for region in service_regions)
        services = [AttentionService(b, shape, rank=r, ranks=ranks, listen=f"{HOST}:0", timeout=60,
                                     report_compute_time=True) for r in range(ranks)]
        seen, errors = [], []

        def serve(service: AttentionService) -> None:
            try:
                service.accept(1, timeout=60, payloads=[service_regions[service.rank]])
                for layer in range(3):
                    request = service.recv(timeout=60)
                    assert all(isinstance(view, DeviceSlotView) for view in request._views)
                    if request.layer == 2:
                        request.fail(f"rank {service.rank} refuses layer 2")
                        continue
                    if request.layer == 0:  # read where the NIC wrote it
                        q = host_of(request._views[0]).copy()
                    else:  # copied out on the stream (device to device)
                        q_dev = MockDeviceArray(mock_gpudirect, request._views[0].shape, "float16")
                        k_dev, v_dev = (MockDeviceArray(mock_gpudirect, v.shape, "float16") for v in request._views[1:])
                        request.to_device(q_dev, k_dev, v_dev, stream=0x99)
                        q = q_dev.host.copy()
                    seen.append((service.rank, request.layer, request.request_ids.tolist()))
                    out = MockDeviceArray(mock_gpudirect, q.shape, "float16")
                    out.host[...] = q * 2 + service.rank
                    request.respond(out, stream=0x99, compute_ns=5000 + service.rank)
                service.channels[0].flush(60)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in services]
        for thread in threads:
            thread.start()
        reply_regions = [a.register(MockDeviceArray(mock_gpudirect, (shape.payload_bytes(r, ranks),)))
                         for r in range(ranks)]
        rng = np.random.default_rng(11)
        try:
            with RemoteAttention(a, [s.address for s in services], shape, timeout=60,
                                 payloads=reply_regions) as remote:
                remote.send_metadata(0, [4, 4, 8], [0, 1, 0])
                for layer in range(2):
                    q = rng.standard_normal((tokens, 8, 16)).astype(np.float16)
                    k = rng.standard_normal((tokens, 4, 16)).astype(np.float16)
                    remote.send(q, k, k, layer=layer, microbatch=0)
                    out = MockDeviceArray(mock_gpudirect, (tokens, 8, 16), "float16")
                    with pytest.raises(lc.InvalidArgumentError, match="recv_into a CUDA tensor"):
                        remote.recv_into(np.empty((tokens, 8, 16), np.float16), layer=layer, microbatch=0)
                    remote.recv_into(out, layer=layer, microbatch=0, stream=0x55)
                    assert [reply.compute_ns for reply in remote.replies] == [5000, 5001]
                    remote.flush(60)
                    expected = q * 2
                    expected[:, 4:] += np.float16(1)
                    assert out.host.tobytes() == expected.tobytes(), layer
                remote.send(q, k, k, layer=2, microbatch=0)
                with pytest.raises(AttentionRankError, match="rank 0 refuses layer 2"):
                    remote.recv_into(MockDeviceArray(mock_gpudirect, (tokens, 8, 16), "float16"), layer=2,
                                     microbatch=0)
                remote.drain()
                for thread in threads:
                    thread.join(60)
        finally:
            for service in services:
                service.close()
    assert not errors, errors
    assert sorted(seen) == [(r, layer, [4, 4, 8]) for r in range(ranks) for layer in range(2)]


def test_rxe_refuses_dmabuf_with_the_reason():
    size = 64 * 1024
    backing = np.zeros(size, np.uint8)
    fd = os.memfd_create("not-a-gpu-dmabuf")  # rxe refuses any dma-buf before looking at the fd
    try:
        os.ftruncate(fd, size)
        with lc.Context("verbs") as ctx:
            out = ffi.new("lm_mr_t **")
            with pytest.raises(lc.UnsupportedError) as info:
                check(lib.lm_mr_register_dmabuf(ctx._handle(), fd, 0, size, backing.ctypes.data,
                                                int(lc.Access.ALL), out), "register dmabuf")
            why = str(info.value)
            assert "ibv_reg_dmabuf_mr" in why and RXE_DEV in why and "dma-buf support" in why, why
    finally:
        os.close(fd)


def test_gpu_tier_falls_back_to_staging_when_rxe_refuses_dmabuf(tmp_path, monkeypatch):
    """A (mock) GPU offering dma-buf export, a verbs context on rxe: the dma-buf registration is tried
    for real, rxe refuses it, and the region is staged with the refusal quoted."""
    from lamina_comm.gpu import cuda, register_cuda

    from ..mock_cuda import build_mock_libcuda, mock_driver_in_process
    lib_path = build_mock_libcuda(tmp_path)
    assert lib_path, "gcc is needed to build the mock driver (tools/rxe-test.sh builds it on the host)"
    with mock_driver_in_process(monkeypatch, lib_path, "MOCK_CUDA_DMABUF") as dev:
        with lc.Context("verbs") as ctx:
            region = ctx.register(cuda.DeviceAllocation(dev, 4096))
            assert region.path == "staging", region.path_reason
            assert "the transport refused it" in region.path_reason
            assert "ibv_reg_dmabuf_mr" in region.path_reason and "dma-buf support" in region.path_reason
            with pytest.raises(lc.UnsupportedError, match="ibv_reg_dmabuf_mr"):
                register_cuda(ctx, cuda.DeviceAllocation(dev, 4096), prefer="dmabuf")


# ---- refusals and failures -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["wrong rkey", "out of bounds"])
def test_refused_write_fails_only_that_endpoint(link, case):
    remote = link.remote
    offset = 0
    if case == "wrong rkey":
        remote = dataclasses.replace(remote, rkey=remote.rkey ^ 0x5A5A00)
    else:
        offset = remote.length - 100
    link.ini.write(link.src_mr, remote, remote_offset=offset, length=4096, imm=1)
    done = link.ini.wait_one(60)
    assert done.status == lib.LM_ERR_REMOTE
    assert isinstance(done.error(), lc.RemoteAccessError)
    assert (link.target == 0).all(), "a refused write must not touch the target"
    assert isinstance(link.ini.error, lc.RemoteAccessError)
    with pytest.raises(lc.LaminaError):
        link.ini.write(link.src_mr, link.remote, length=16)
    # The target's device refused it without the target's software seeing it;
    # the broken connection is reported to the target through the control socket.
    assert eventually(lambda: isinstance(link.tgt.error, lc.PeerLostError))
    assert [c for c in link.tgt.poll() if c.op == lc.Op.RECV_IMM] == []
    # Both contexts keep serving other endpoints.
    ini2, tgt2 = connect_pair(link.b, link.a, server_data=link.dst_mr.descriptor().to_bytes())
    ini2.write(link.src_mr, lc.RemoteRegion.from_bytes(ini2.peer_data), length=4096, imm=2)
    assert ini2.wait_one(60).ok
    assert tgt2.wait_one(60).imm == 2
    assert np.array_equal(link.target[:4096], link.source[:4096])


def _hold_peer(conn, nbytes: int) -> None:
    """Forked child: listen, accept one verbs endpoint, then wait to be killed."""
    with lc.Context("verbs") as ctx:
        mr = ctx.register(np.zeros(nbytes, np.uint8))
        listener = ctx.listen((HOST, 0))
        conn.send(listener.address[1])
        listener.accept(timeout=60, private_data=mr.descriptor().to_bytes())  # ctx keeps it open
        time.sleep(600)


def test_killed_peer_fails_outstanding_operations():
    nbytes, window = 256 * 1024, 48
    parent_end, child_end = multiprocessing.Pipe()
    # Forked before this process opens a context: the child shares no verbs state.
    child = multiprocessing.get_context("fork").Process(target=_hold_peer, args=(child_end, nbytes),
                                                        daemon=True)
    child.start()
    try:
        assert parent_end.poll(60), "peer did not start listening"
        port = parent_end.recv()
        with lc.Context("verbs") as ctx:
            src = ctx.register(np.ones(nbytes, np.uint8))
            ep = ctx.connect((HOST, port), timeout=60)
            remote = lc.RemoteRegion.from_bytes(ep.peer_data)
            posted, done = 0, []
            deadline = time.monotonic() + 120
            killed = False
            # Keep a window of writes in flight; kill the peer once data flows.
            # The writes in flight at that moment may still all land (the dying
            # process's QP acknowledges until it is torn down), so the end is the
            # endpoint failing, not necessarily a failed completion.
            while not (any(not c.ok for c in done) or (killed and ep.error is not None)):
                assert time.monotonic() < deadline, "the peer's death was never reported"
                try:
                    while posted - len(done) < window:
                        ep.write(src, remote)
                        posted += 1
                except lc.PeerLostError:
                    pass  # failed between two posts: the completions tell the rest
                done += ep.wait(timeout=1)
                if not killed and len(done) >= 8:
                    os.kill(child.pid, signal.SIGKILL)
                    killed = True
            done += collect(ep, posted - len(done), timeout=60)
            assert killed and len(done) == posted, "an operation never completed"
            failed = [c for c in done if not c.ok]
            assert {c.status for c in failed} <= {lc.PeerLostError.status, lc.CanceledError.status}
            # In order: once one failed, every later one did too.
            first = next((i for i, c in enumerate(done) if not c.ok), len(done))
            assert all(not c.ok for c in done[first:])
            assert isinstance(ep.error, lc.PeerLostError)
            assert ep.outstanding == 0
            with pytest.raises(lc.PeerLostError):
                ep.write(src, remote)
    finally:
        child.kill()
        child.join(10)


def test_closing_an_endpoint_completes_its_operations_and_tells_the_peer(link):
    for _ in range(200):
        link.ini.write(link.src_mr, link.remote, length=64 * 1024)
    link.ini.close()
    done = link.ini.poll(1000)
    assert len(done) == 200, "every operation completes by the time close returns"
    assert {c.status for c in done} <= {0, lc.CanceledError.status}
    assert eventually(lambda: isinstance(link.tgt.error, lc.PeerLostError))


def test_deregistration_waits_for_writes_in_flight(link):
    # Source bytes never equal 0xEE; after deregistration the buffer is
    # overwritten with 0xEE, which then must never reach the target.
    count, size = 300, 64 * 1024
    buf = np.random.default_rng(1).integers(0, 0xEE, MiB, dtype=np.uint8)
    mr = link.a.register(buf)
    for i in range(count):
        offset = (i % (MiB // size)) * size
        link.ini.write(mr, link.remote, local_offset=offset, remote_offset=offset, length=size)
    mr.close()  # returns once the device no longer reads the buffer
    buf[:] = 0xEE
    done = collect(link.ini, count)
    assert {c.status for c in done} <= {0, lc.LocalRegionError.status}
    assert not (link.target == 0xEE).any()
    assert link.ini.error is None, "the endpoint stays usable"
    link.ini.write(link.src_mr, link.remote, length=4096, imm=9)
    assert link.ini.wait_one(60).ok
    assert eventually(lambda: any(c.imm == 9 for c in link.tgt.poll()))


# ---- operations waiting for the peer (C API, so a test decides when each side comes up) ----

class RawLink:
    """Verbs endpoints a -> b through the C API, with a socketpair as their control channel.

    Until b is connected its ready byte is missing, so a's operations wait in
    host memory: that makes the queued paths deterministic (on rxe a posting
    thread runs the requester itself, so the send queue rarely fills)."""

    def __init__(self, a: lc.Context, b: lc.Context):
        self.a, self.b = a, b
        self.target = np.zeros(MiB, np.uint8)
        self.dst_mr = b.register(self.target)
        d = self.dst_mr.descriptor()
        self.remote = ffi.new("lm_rdesc_t *", {"key": d.key, "addr": d.addr, "length": d.length,
                                               "rkey": d.rkey, "access": d.access})
        self.ep_a, self.ep_b = self._create(a, 1), self._create(b, 2)
        self.sock_a, self.sock_b = socket.socketpair()

    @staticmethod
    def _create(ctx: lc.Context, ep_id: int):
        out = ffi.new("lm_ep_t **")
        check(lib.lm_ep_create_verbs(ctx._handle(), ep_id, out), "lm_ep_create_verbs")
        return out[0]

    @staticmethod
    def _address(ep) -> bytes:
        buf, size = ffi.new("char[]", 1024), ffi.new("size_t *", 1024)
        check(lib.lm_ep_address(ep, buf, size), "lm_ep_address")
        return bytes(ffi.buffer(buf, size[0]))

    def connect_a(self) -> None:
        blob = self._address(self.ep_b)
        check(lib.lm_ep_connect(self.ep_a, blob, len(blob), self.sock_a.detach()), "lm_ep_connect")

    def connect_b(self) -> None:
        blob = self._address(self.ep_a)
        check(lib.lm_ep_connect(self.ep_b, blob, len(blob), self.sock_b.detach()), "lm_ep_connect")

    def write(self, mr: lc.MemoryRegion, offset: int, length: int, wr_id: int, imm: int | None = None):
        flags = lib.LM_WRITE_IMM if imm is not None else 0
        check(lib.lm_ep_write(self.ep_a, mr._handle(), offset, length, self.remote, offset, imm or 0, flags,
                              wr_id), "lm_ep_write")

    @staticmethod
    def completions(ctx: lc.Context, count: int, timeout: float = 60.0) -> list:
        comps, out = ffi.new("lm_completion_t[64]"), []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            n = lib.lm_cq_wait(ctx._handle(), comps, 64, 200)
            out += [(comps[i].opcode, comps[i].status, comps[i].wr_id) for i in range(n)]
        assert len(out) == count, f"{len(out)} of {count} completions within {timeout} s"
        return out

    def close(self) -> None:
        self.sock_a.close()  # no-ops once detached; the endpoints own them then
        self.sock_b.close()


@pytest.fixture
def raw():
    with lc.Context("verbs") as a, lc.Context("verbs") as b:
        link = RawLink(a, b)
        yield link
        link.close()


def test_operations_wait_for_the_peers_ready_byte(raw):
    source = np.arange(MiB, dtype=np.uint32).astype(np.uint8)
    mr = raw.a.register(source)
    raw.connect_a()
    for i in range(200):  # more than the send queue holds
        raw.write(mr, i * 4096, 4096, wr_id=i, imm=i)
    time.sleep(0.5)
    assert lib.lm_ep_outstanding(raw.ep_a) == 200
    assert not raw.target.any(), "nothing may be sent before the peer's QP is ready"
    raw.connect_b()
    done = RawLink.completions(raw.a, 200)
    assert done == [(lib.LM_OP_WRITE, 0, i) for i in range(200)]
    assert np.array_equal(raw.target[:200 * 4096], source[:200 * 4096])
    imms = RawLink.completions(raw.b, 200)
    assert [op for op, _, _ in imms] == [lib.LM_OP_RECV_IMM] * 200


def test_close_cancels_queued_operations(raw):
    mr = raw.a.register(np.ones(MiB, np.uint8))
    raw.connect_a()
    for i in range(50):
        raw.write(mr, 0, 65536, wr_id=i)
    lib.lm_ep_destroy(raw.ep_a)
    done = RawLink.completions(raw.a, 50, timeout=1)
    assert done == [(lib.LM_OP_WRITE, lc.CanceledError.status, i) for i in range(50)]
    assert not raw.target.any()


def test_deregistration_refuses_queued_writes(raw):
    source = np.ones(MiB, np.uint8)
    mr = raw.a.register(source)
    raw.connect_a()
    for i in range(50):
        raw.write(mr, 0, 65536, wr_id=i)
    mr.close()  # nothing was posted: returns at once
    raw.connect_b()
    done = RawLink.completions(raw.a, 50)
    assert done == [(lib.LM_OP_WRITE, lc.LocalRegionError.status, i) for i in range(50)]
    assert not raw.target.any()
    assert lib.lm_ep_error(raw.ep_a) == 0, "the endpoint stays usable"
    other = raw.a.register(np.full(4096, 3, np.uint8))
    raw.write(other, 0, 4096, wr_id=99)
    assert RawLink.completions(raw.a, 1) == [(lib.LM_OP_WRITE, 0, 99)]
    assert (raw.target[:4096] == 3).all()
