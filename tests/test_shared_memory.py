"""Context.alloc (SharedMemory): regions an shm peer maps, so its writes take one copy (issue 13).

Over shm the writer copies straight into the target's pages once the target
granted the region (MAP_REQ / MAP_RESP); over tcp the same regions behave as
any other. Both must keep every rule of a registered region: bytes in posting
order (overlapping writes too, across the switch from the stream to the
mapping), bounds, access, and no write landing after deregistration.
"""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import lamina_comm as lc
from lamina_comm._bindings import check, ffi, lib

from .conftest import connect_pair
from .test_transport_hostile import HDR, MAGIC

WRITE, MAP_REQ, MAP_RESP = 1, 7, 8
FLAG_MAPPED = 4


def desc_of(ep: lc.Endpoint) -> lc.RemoteRegion:
    return lc.RemoteRegion.from_bytes(ep.peer_data)


def wait_done(ep: lc.Endpoint, count: int) -> list[lc.Completion]:
    done: list[lc.Completion] = []
    while len(done) < count:
        got = ep.wait(timeout=10)
        assert got, f"only {len(done)} of {count} completions came"
        done += got
    return done


def warm(ca: lc.Endpoint, source: lc.MemoryRegion, remote: lc.RemoteRegion, writes: int = 4) -> None:
    """A few writes: the first asks for the mapping, the later ones use it (shm)."""
    for _ in range(writes):
        ca.write(source, remote, length=4096)
        wait_done(ca, 1)[0].raise_for_status()
        time.sleep(0.01)


def random_source_to_shared_target(contexts, seed: int):
    """1 MiB of random bytes registered in a, 1 MiB of Context.alloc memory in b, and a connected pair."""
    a, b = contexts
    rng = np.random.default_rng(seed)
    target = b.alloc(1 << 20)
    source_bytes = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    source = a.register(source_bytes, lc.Access.LOCAL_WRITE)
    ca, cb = connect_pair(b, a, server_data=target.descriptor().to_bytes())
    return rng, target, source_bytes, source, ca, cb


def test_random_overlapping_writes_into_shared_memory_land_in_posting_order(contexts):
    a, _ = contexts
    rng, target, source_bytes, source, ca, cb = random_source_to_shared_target(contexts, 7)
    expected = np.zeros(1 << 20, np.uint8)
    count = 400
    for i in range(count):  # none waited for: the first ones go before the grant, the rest after
        n = int(rng.integers(1, 64 * 1024))
        src_off, dst_off = int(rng.integers(0, source_bytes.size - n)), int(rng.integers(0, (1 << 20) - n))
        ca.write(source, desc_of(ca), local_offset=src_off, remote_offset=dst_off, length=n, imm=i)
        expected[dst_off:dst_off + n] = source_bytes[src_off:src_off + n]
    imms: list[int] = []
    while len(imms) < count:
        imms += [c.imm for c in cb.wait(timeout=10) if c.op == lc.Op.RECV_IMM]
    assert imms == list(range(count))
    done = wait_done(ca, count)
    assert all(c.ok for c in done)
    assert np.array_equal(target.view(), expected)
    if a.transport == "shm":
        assert ca.mapped_writes > count // 2, "the writes did not go through the mapping"
    else:
        assert ca.mapped_writes == 0


def test_deregistration_revokes_the_mapping_and_nothing_lands_after(contexts):
    a, b = contexts
    target = b.alloc(64 << 10)
    view = target.view()
    source = a.register(np.full(64 << 10, 0xAB, np.uint8), lc.Access.LOCAL_WRITE)
    ca, cb = connect_pair(b, a, server_data=target.descriptor().to_bytes())
    remote = desc_of(ca)
    warm(ca, source, remote)
    mapped = ca.mapped_writes
    view[:] = 0x11
    target.close()  # the writer still holds its mapping of the old pages
    ca.write(source, remote, length=64 << 10, imm=5)
    done = wait_done(ca, 1)[0]
    assert done.status == lc.NoKeyError.status
    assert (view == 0x11).all(), "a write landed after deregistration"
    if a.transport == "shm":
        assert ca.mapped_writes == mapped + 1, "the refused write did not go through the old mapping"
    # The memory registers again (a new key) and takes writes again.
    again = b.register(target._shared)
    ca.write(source, again.descriptor(), length=4096)
    wait_done(ca, 1)[0].raise_for_status()
    assert (view[:4096] == 0xAB).all() and (view[4096:] == 0x11).all()


def test_out_of_bounds_and_read_only_targets_are_refused_untouched(contexts):
    a, b = contexts
    target = b.alloc(16 << 10)
    read_only = b.alloc(16 << 10, lc.Access.REMOTE_READ | lc.Access.LOCAL_WRITE)
    source = a.register(np.full(32 << 10, 0xCD, np.uint8), lc.Access.LOCAL_WRITE)
    ca, cb = connect_pair(b, a, server_data=target.descriptor().to_bytes())
    warm(ca, source, desc_of(ca))
    target.view()[:] = 0
    ca.write(source, desc_of(ca), remote_offset=(16 << 10) - 100, length=4096)
    assert wait_done(ca, 1)[0].status == lc.OutOfBoundsError.status
    ca.write(source, read_only.descriptor(), length=4096)
    assert wait_done(ca, 1)[0].status == lc.AccessDeniedError.status
    assert not target.view().any() and not read_only.view().any()


def test_views_outlive_the_region():
    with lc.Context("tcp") as ctx:
        region = ctx.alloc(10_000)
        assert region.nbytes == 12288 and region.path == "shared"  # whole pages
        view = region.view("uint32")
        view[:] = 7
        region.close()
        del region
        assert (view == 7).all()  # the memory lives as long as its arrays
        with pytest.raises(lc.InvalidArgumentError):
            lc.SharedMemory(0)


def test_one_live_region_per_allocation():
    with lc.Context("tcp") as ctx:
        memory = lc.SharedMemory(4096)
        first = ctx.register(memory)
        with pytest.raises(lc.InvalidArgumentError, match="registered already"):
            ctx.register(memory)
        first.close()
        ctx.register(memory).close()


@pytest.mark.parametrize("frame_type, flags, length", [(WRITE, FLAG_MAPPED, 64), (MAP_REQ, 0, 0), (MAP_RESP, 0, 4096)],
                         ids=["mapped-write", "map-request", "map-response"])
def test_tcp_fails_an_endpoint_that_sends_shm_only_frames(frame_type: int, flags: int, length: int):
    with lc.Context("tcp") as ctx:
        region = ctx.alloc(4096)
        ours, theirs = socket.socketpair()
        out = ffi.new("lm_ep_t **")
        check(lib.lm_ep_create_tcp(ctx._handle(), ours.detach(), 1, out), "endpoint")
        try:
            # magic, type, flags, imm, seq, key, offset, length, ack, status, reserved
            theirs.sendall(HDR.pack(MAGIC, frame_type, flags, 0, 0, region.descriptor().key, 0, length, 0, 0, 0))
            deadline = time.monotonic() + 10
            while lib.lm_ep_error(out[0]) == 0 and time.monotonic() < deadline:
                ctx.poll()
                time.sleep(0.01)
            assert lib.lm_ep_error(out[0]) == lc.ProtocolError.status
            assert not region.view().any()
        finally:
            lib.lm_ep_destroy(out[0])
            theirs.close()


def test_both_sides_switching_to_mapped_writes_at_once_do_not_wait_on_each_other(contexts):
    """Each side's first mapped write waits for the other's acknowledgement of its ring writes; the
    acknowledgements (answers) must overtake a held head, or two peers would wait on each other."""
    a, b = contexts
    rng = np.random.default_rng(3)
    targets = {"a": a.alloc(256 << 10), "b": b.alloc(256 << 10)}
    sources = {name: ctx.register(rng.integers(0, 256, 256 << 10, dtype=np.uint8), lc.Access.LOCAL_WRITE)
               for name, ctx in (("a", a), ("b", b))}
    ea, eb = connect_pair(b, a, server_data=targets["b"].descriptor().to_bytes(),
                          client_data=targets["a"].descriptor().to_bytes())
    expected = {"a": np.zeros(256 << 10, np.uint8), "b": np.zeros(256 << 10, np.uint8)}
    count = 300
    for i in range(count):  # both directions posted together, nothing waited for
        for ep, src, dst in ((ea, "a", "b"), (eb, "b", "a")):
            n = int(rng.integers(1, 16 << 10))
            off = int(rng.integers(0, (256 << 10) - n))
            ep.write(sources[src], desc_of(ep), local_offset=off, remote_offset=off, length=n)
            expected[dst][off:off + n] = sources[src].view()[off:off + n]
    for ep in (ea, eb):
        assert all(c.ok for c in wait_done(ep, count))
    for name in ("a", "b"):
        assert np.array_equal(targets[name].view(), expected[name])
    if a.transport == "shm":
        assert ea.mapped_writes > 0 and eb.mapped_writes > 0


def test_a_read_is_answered_as_the_memory_was_before_a_later_mapped_write(contexts):
    """An 8 MiB read (8 pieces) then, without waiting, a write over the same bytes: the read sees the
    old bytes. The mapped write must wait for the read (the target answers its pieces from the region)."""
    a, b = contexts
    size = 8 << 20
    target = b.alloc(size)
    target.view()[:] = 0x11
    local = a.register(np.zeros(size, np.uint8))
    source = a.register(np.full(size, 0x22, np.uint8), lc.Access.LOCAL_WRITE)
    ca, cb = connect_pair(b, a, server_data=target.descriptor().to_bytes())
    remote = desc_of(ca)
    warm(ca, source, remote)
    target.view()[:4096] = 0x11
    for round_ in range(3):
        target.view()[:] = 0x11
        local.view()[:] = 0
        ca.read(local, remote, length=size)
        ca.write(source, remote, length=size)
        done = wait_done(ca, 2)
        assert all(c.ok for c in done), done
        assert (local.view() == 0x11).all(), f"round {round_}: the read saw the later write"
        assert (target.view() == 0x22).all()


def test_gather_writes_into_shared_memory(contexts):
    a, _ = contexts
    rng, target, source_bytes, source, ca, _ = random_source_to_shared_target(contexts, 11)
    warm(ca, source, desc_of(ca))
    expected = target.view().copy()
    for i in range(50):
        pieces = [(int(rng.integers(0, (1 << 20) - 4096)), int(rng.integers(1, 4096))) for _ in range(8)]
        total = sum(n for _, n in pieces)
        at = int(rng.integers(0, (1 << 20) - total))
        ca.writev(source, pieces, desc_of(ca), remote_offset=at)
        expected[at:at + total] = np.concatenate([source_bytes[o:o + n] for o, n in pieces])
    assert all(c.ok for c in wait_done(ca, 50))
    assert np.array_equal(target.view(), expected)
    if a.transport == "shm":
        assert ca.mapped_writes >= 50


def test_a_region_holds_a_file_descriptor_only_while_registered():
    """Processes make many channels: their memory must not hold a descriptor each once closed."""
    import os

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    with lc.Context("shm") as ctx:
        memory = lc.SharedMemory(1 << 16)  # its memfd stays open until a registration ends
        memory.array()[:] = 3
        region = ctx.register(memory)
        held = descriptors()
        region.close()
        assert descriptors() == held - 1
        again = ctx.register(memory)  # a fresh file, same addresses, same bytes
        assert descriptors() == held and (memory.array() == 3).all()
        again.close()
        for region in [ctx.alloc(4096) for _ in range(300)]:
            region.close()
        assert descriptors() <= held - 1
