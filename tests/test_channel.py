"""Activation channels: credits, sequence checks, zero-copy paths, dtypes, asyncio, spec checks."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import lamina_comm as lc
import lamina_comm.channel as lc_channel
from lamina_comm.channel import (HEADER_BYTES, Channel, ChannelListener, ChannelSpec, SpecMismatchError,
                                 as_bfloat16, to_torch)
from lamina_comm._bindings import lib
from lamina_comm.channel.core import _VIEW_CACHE_MAX

# Every wait in these tests is bounded; a hang becomes a TimeoutError.
WAIT_S = 10.0
SPEC = ChannelSpec(max_tokens=4, hidden=64, heads=4, kv_heads=2, head_dim=16, dtype="float16",
                   microbatches=2, slots_per_microbatch=2)
Q_SHAPE, KV_SHAPE = (4, 4, 16), (4, 2, 16)
NUMPY_DTYPES = ["float16", "float32", "int32", "int64", "uint8", "int8", "float64"]
TORCH_DTYPES = NUMPY_DTYPES + ["bfloat16"]


def open_pair(model_ctx: lc.Context, attention_ctx: lc.Context, spec: ChannelSpec = SPEC,
              attention_spec: ChannelSpec | None = None, piggyback: bool = False, attention_payloads=None,
              model_payloads=None) -> tuple[Channel, Channel]:
    """(model side, attention side) over loopback; the accept runs in a thread. *_payloads: a region of
    that side's own for the payloads it receives (Channel payloads=)."""
    listener = ChannelListener(attention_ctx, "127.0.0.1:0", attention_spec or spec, timeout=WAIT_S,
                               piggyback_credits=piggyback)
    box: dict = {}

    def accept() -> None:
        try:
            box["ch"] = listener.accept(timeout=WAIT_S, payloads=attention_payloads)
        except Exception as exc:  # re-raised in the test thread
            box["err"] = exc

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        model = Channel.connect(model_ctx, listener.address, spec, timeout=WAIT_S, piggyback_credits=piggyback,
                                payloads=model_payloads)
    finally:
        thread.join(WAIT_S)
        listener.close()
    if "err" in box:
        model.close()
        raise box["err"]
    return model, box["ch"]


@contextlib.contextmanager
def open_pairs(contexts: tuple[lc.Context, lc.Context], count: int,
               piggyback: bool = False) -> Iterator[list[tuple[Channel, Channel]]]:
    """count (model side, attention side) pairs on the same two contexts; all closed at the end."""
    pairs: list[tuple[Channel, Channel]] = []
    try:
        for _ in range(count):
            pairs.append(open_pair(*contexts, piggyback=piggyback))
        yield pairs
    finally:
        for model, attention in pairs:
            model.close()
            attention.close()


@pytest.fixture
def pair(contexts):
    model_ctx, attention_ctx = contexts
    model, attention = open_pair(model_ctx, attention_ctx)
    yield model, attention
    model.close()
    attention.close()


@pytest.fixture(params=[False, True], ids=["credit-writes", "piggybacked-credits"])
def credit_pair(contexts, request):
    """Both credit modes: a write per release, or credits riding on the next message."""
    model_ctx, attention_ctx = contexts
    model, attention = open_pair(model_ctx, attention_ctx, piggyback=request.param)
    yield model, attention
    model.close()
    attention.close()


def random_bits(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Arbitrary bit patterns (NaNs and infinities included) of a numpy dtype."""
    storage = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * storage.itemsize, np.uint8)
    return raw.view(storage).reshape(shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def qkv(value: float) -> list[np.ndarray]:
    return [np.full(Q_SHAPE, value, np.float16), np.full(KV_SHAPE, value + 1, np.float16),
            np.full(KV_SHAPE, value + 2, np.float16)]


# --------------------------------------------------------------------------
# Messages and copy paths


def test_multiple_tensors_round_trip_with_metadata(pair):
    model, attention = pair
    sent = qkv(3.0)
    seq = model.send(sent, layer=7, microbatch=1)
    with attention.recv(timeout=WAIT_S) as msg:
        assert (msg.layer, msg.microbatch, msg.seq) == (7, 1, seq) == (7, 1, 0)
        assert msg.dtype_names == ["float16"] * 3
        assert all(same_bits(a, b) for a, b in zip(msg.tensors, sent))
    metrics = model.metrics
    assert metrics.messages == 1 and metrics.staged_messages == 1
    assert metrics.staged_bytes == sum(t.nbytes for t in sent)
    assert metrics.bytes_sent >= HEADER_BYTES + metrics.staged_bytes
    assert attention.metrics.messages_received == 1 and attention.metrics.credits_returned == 1


def test_send_buffers_go_in_one_write_and_arrive_zero_copy(pair):
    model, attention = pair
    q, k, v = model.send_buffers(0, [Q_SHAPE, KV_SHAPE, KV_SHAPE], timeout=WAIT_S)
    for i, t in enumerate((q, k, v)):
        t[...] = np.arange(t.size, dtype=np.float16).reshape(t.shape) + i
    model.send([q, k, v], layer=0, microbatch=0)
    assert model.metrics.slot_messages == 1 and model.metrics.staged_bytes == 0
    with attention.recv(microbatch=0, timeout=WAIT_S) as msg:
        for got, want in zip(msg.tensors, (q, k, v)):
            assert same_bits(got, want)
            address = got.__array_interface__["data"][0]
            assert attention.region.contains(address, got.nbytes)
        torch = pytest.importorskip("torch")
        tensors = msg.torch()
        assert tensors[0].dtype == torch.float16
        assert attention.region.contains(tensors[0].data_ptr(), tensors[0].numel() * 2)


def test_forwarding_a_received_tensor_writes_from_the_region(pair):
    model, attention = pair
    model.send(qkv(1.0), layer=2, microbatch=0)
    msg = attention.recv(timeout=WAIT_S)
    attention.send(msg.tensors[0], layer=msg.layer, microbatch=msg.microbatch)  # echo q from the slot
    msg.release()
    assert attention.metrics.region_messages == 1 and attention.metrics.staged_bytes == 0
    with model.recv(microbatch=0, timeout=WAIT_S) as reply:
        assert reply.layer == 2 and same_bits(reply.tensors[0], qkv(1.0)[0])


def test_tensors_in_a_user_registered_region_are_not_staged(contexts, pair):
    model, attention = pair
    backing = np.zeros(2 * 64 + 4 * 4 * 16, np.float16)
    region = contexts[0].register(backing)
    model.add_source_region(region)
    q = backing[:64 * 4].reshape(Q_SHAPE)
    q[...] = 5
    model.send(q, layer=1, microbatch=1)
    assert model.metrics.region_messages == 1 and model.metrics.staged_bytes == 0
    with attention.recv(timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], q)


def test_non_contiguous_tensor_is_staged_once(pair):
    model, attention = pair
    strided = np.arange(64, dtype=np.float32).reshape(8, 8).T
    model.send(strided, layer=0, microbatch=0)
    assert model.metrics.staged_bytes == strided.nbytes
    with attention.recv(timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], strided)


def fused_qkv(contexts, tokens: int = 4, torch_tensors: bool = False):
    """A registered fused qkv activation [tokens, (4 + 2 + 2) * 16] and its q, k, v column views."""
    rng = np.random.default_rng(tokens)
    backing = rng.standard_normal((tokens, 8 * 16)).astype(np.float16)
    region = contexts[0].register(backing)
    fused = backing
    if torch_tensors:
        torch = pytest.importorskip("torch")
        fused = torch.from_numpy(backing)
    q = fused[:, :64].reshape(tokens, 4, 16)
    k = fused[:, 64:96].reshape(tokens, 2, 16)
    v = fused[:, 96:].reshape(tokens, 2, 16)
    return region, backing, (q, k, v)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_fused_qkv_split_is_gathered_without_a_copy(contexts, pair, kind):
    model, attention = pair
    region, backing, (q, k, v) = fused_qkv(contexts, torch_tensors=kind == "torch")
    assert not (q.flags.c_contiguous if kind == "numpy" else q.is_contiguous())
    model.add_source_region(region)
    token = None
    for layer in range(3):
        model.send((q, k, v), layer=layer, microbatch=layer % 2)
        token = model.send_token()
    m = model.metrics
    assert (m.gather_messages, m.staged_messages, m.staged_bytes) == (3, 0, 0), m
    model.wait_sent(token, timeout=WAIT_S)
    for layer in range(3):
        with attention.recv(timeout=WAIT_S) as msg:
            got = msg.tensors
            assert msg.layer == layer and [t.shape for t in got] == [Q_SHAPE, KV_SHAPE, KV_SHAPE]
            assert same_bits(got[0], backing[:, :64].reshape(Q_SHAPE))
            assert same_bits(got[1], backing[:, 64:96].reshape(KV_SHAPE))
            assert same_bits(got[2], backing[:, 96:].reshape(KV_SHAPE))


def test_gather_keeps_alignment_between_odd_sized_tensors(contexts, pair):
    model, attention = pair
    backing = np.arange(4 * 400, dtype=np.uint32).astype(np.uint8).reshape(4, 400)
    region = contexts[0].register(backing)
    model.add_source_region(region)
    a, b = backing[:, :65], backing[:, 200:270]  # 260 B then 280 B: a run ends at the padding after a
    model.send((a, b), layer=0, microbatch=0)
    assert model.metrics.gather_messages == 1 and model.metrics.staged_bytes == 0
    with attention.recv(timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], a) and same_bits(msg.tensors[1], b)


def test_an_empty_tensor_does_not_join_two_runs_across_padding(contexts, pair):
    model, attention = pair
    backing = np.arange(4 * 400, dtype=np.uint32).astype(np.uint8).reshape(4, 400)
    model.add_source_region(contexts[0].register(backing))
    x, empty, y = backing[:, :65], backing[:0, :], backing[:, 200:270]  # 260 B, 0 B, 280 B (y at 320)
    model.send((x, empty, y), layer=0, microbatch=0)
    assert model.metrics.gather_messages == 1 and model.metrics.staged_bytes == 0
    with attention.recv(timeout=WAIT_S) as msg:
        got = msg.tensors
        assert same_bits(got[0], x) and got[1].shape == (0, 400) and same_bits(got[2], y)


def test_short_strided_rows_are_copied_rather_than_gathered(contexts, pair):
    model, attention = pair
    backing = np.arange(4 * 64, dtype=np.float16).reshape(4, 64)
    model.add_source_region(contexts[0].register(backing))
    narrow = backing[:, :16]  # 32-byte rows: a copy is cheaper than a gather entry each
    model.send(narrow, layer=0, microbatch=0)
    assert model.metrics.gather_messages == 0 and model.metrics.staged_bytes == narrow.nbytes
    with attention.recv(timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], narrow)


def test_strided_view_outside_a_region_is_copied_in_rows(pair):
    model, attention = pair
    wide = np.arange(4 * 128, dtype=np.float16).reshape(4, 128)
    q = wide[:, 32:96].reshape(Q_SHAPE)
    model.send(q, layer=0, microbatch=0)
    assert model.metrics.staged_bytes == q.nbytes and model.metrics.gather_messages == 0
    with attention.recv(timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], q)


def test_more_rows_than_one_gather_list_holds_are_copied(contexts):
    big = ChannelSpec(max_tokens=1100, hidden=64, heads=4, kv_heads=2, head_dim=16, dtype="float16",
                      microbatches=1, slots_per_microbatch=1)
    model, attention = open_pair(*contexts, spec=big)
    with model, attention:
        backing = np.arange(32 * (lib.LM_MAX_SEGS + 1), dtype=np.int32).reshape(-1, 32)
        model.add_source_region(contexts[0].register(backing))
        column = backing[:, :16]  # LM_MAX_SEGS + 1 rows of 64 B, 128 B apart
        model.send(column, layer=0, microbatch=0)
        assert model.metrics.gather_messages == 0 and model.metrics.staged_bytes == column.nbytes
        with attention.recv(timeout=WAIT_S) as msg:
            assert same_bits(msg.tensors[0], column)


@pytest.mark.parametrize("make, rows", [
    (lambda a: a[:, 16:48], (8, 128)),           # a column block: 8 rows, 128 B apart
    (lambda a: a[2:6], (0, 0)),                  # contiguous rows
    (lambda a: a.reshape(8, 4, 16)[:, 1:3], (8, 128)),  # heads 1..2 of every token
    (lambda a: a[::2, :16], (4, 256)),           # every other token
    (lambda a: a.T, None),                       # transposed: no row structure
    (lambda a: a[:, ::2], (256, 4)),             # every other element: 2-byte rows
    (lambda a: a[:, ::-1], None),                # reversed: no row structure
])
def test_views_are_described_as_rows(make, rows):
    from lamina_comm.channel.views import _describe
    view = make(np.zeros((8, 64), np.float16))
    info = _describe(view)
    if rows is None:
        assert info.address is None
    else:
        assert (info.rows, info.row_stride) == rows and info.address is not None


def test_message_larger_than_a_slot_is_refused(pair):
    model, _ = pair
    with pytest.raises(lc.InvalidArgumentError, match="exceeds"):
        model.send(np.zeros(2 * SPEC.request_bytes, np.uint8), layer=0, microbatch=0)


# --------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_dtypes_round_trip_bit_exactly(pair, dtype):
    model, attention = pair
    data = random_bits(dtype, (3, 5), seed=len(dtype))
    model.send([data, data[:1]], layer=0, microbatch=0)
    with attention.recv(timeout=WAIT_S) as msg:
        assert msg.dtype_names == [dtype, dtype]
        assert same_bits(msg.tensors[0], data) and same_bits(msg.tensors[1], data[:1])


def test_numpy_bfloat16_travels_as_marked_uint16(pair):
    model, attention = pair
    bits = random_bits("bfloat16", (2, 7))
    model.send(as_bfloat16(bits), layer=0, microbatch=0)
    with attention.recv(timeout=WAIT_S) as msg:
        got = msg.tensors[0]
        assert got.dtype == np.uint16 and got.dtype_name == "bfloat16"
        assert same_bits(got, bits)
        torch = pytest.importorskip("torch")
        assert to_torch(got).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_dtypes_round_trip_bit_exactly(pair, dtype):
    torch = pytest.importorskip("torch")
    model, attention = pair
    bits = random_bits(dtype, (4, 3), seed=7)
    tensor = to_torch(as_bfloat16(bits) if dtype == "bfloat16" else bits)
    assert tensor.dtype == getattr(torch, dtype)
    model.send([tensor, tensor.T], layer=0, microbatch=1)  # .T is strided: staged through torch
    with attention.recv(timeout=WAIT_S) as msg:
        got, got_t = msg.torch()
        assert got.dtype == getattr(torch, dtype) and got_t.shape == (3, 4)
        assert same_bits(np.asarray(msg.tensors[0]), bits)
        assert same_bits(np.asarray(msg.tensors[1]), bits.T)


def test_torch_send_buffers_are_filled_in_place(pair):
    torch = pytest.importorskip("torch")
    model, attention = pair
    (out,) = model.send_buffers(0, [(4, 8)], "bfloat16", as_torch=True, timeout=WAIT_S)
    assert out.dtype == torch.bfloat16
    out.copy_(torch.linspace(-3, 3, 32).reshape(4, 8))
    model.send(out, layer=0, microbatch=0)
    assert model.metrics.slot_messages == 1
    with attention.recv(timeout=WAIT_S) as msg:
        assert torch.equal(msg.torch()[0], out)


# --------------------------------------------------------------------------
# Credits, buffering, sequence numbers


def test_slot_reuse_under_credit_pressure_overwrites_nothing(credit_pair):
    model, attention = credit_pair
    count = 4 * SPEC.slots_per_microbatch
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(count):
                model.send(np.full(Q_SHAPE, i, np.float16), layer=i, microbatch=0, timeout=WAIT_S)
        except BaseException as exc:  # reported below
            errors.append(exc)

    sender = threading.Thread(target=produce)
    sender.start()
    for i in range(count):
        msg = attention.recv(microbatch=0, timeout=WAIT_S)
        assert (msg.layer, msg.seq) == (i, i)
        if i == 0:
            _wait_until(lambda: model.metrics.credit_waits >= 1)  # the sender is now blocked
        assert np.all(msg.tensors[0] == i), "a held slot was overwritten"
        msg.release()
    sender.join(WAIT_S)
    assert not sender.is_alive() and not errors
    assert model.metrics.credit_waits >= 1 and model.metrics.messages == count


def _wait_until(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def test_sender_times_out_when_the_receiver_never_releases(credit_pair):
    model, attention = credit_pair
    held = []
    for i in range(SPEC.slots_per_microbatch):
        model.send(qkv(i), layer=i, microbatch=1)
        held.append(attention.recv(timeout=WAIT_S))
    with pytest.raises(lc.TimeoutError, match=r"channel model-ep\d+: no credit for micro-batch 1"):
        model.send(qkv(9), layer=9, microbatch=1, timeout=0.2)
    assert model.metrics.credit_waits == 1 and model.metrics.credit_wait_seconds > 0
    held[0].release()
    attention.flush(WAIT_S)  # a piggybacked credit waits for the next send or wait; push it now
    model.send(qkv(9), layer=9, microbatch=1, timeout=WAIT_S)  # the freed slot is reusable
    with attention.recv(timeout=WAIT_S) as msg:
        assert msg.layer == 9 and same_bits(msg.tensors[0], qkv(9)[0])


def test_recv_times_out_naming_the_channel(pair):
    _, attention = pair
    with pytest.raises(lc.TimeoutError, match="no message for micro-batch 1"):
        attention.recv(microbatch=1, timeout=0.05)


def test_recv_for_one_microbatch_keeps_the_others_in_arrival_order(pair):
    model, attention = pair
    model.send(qkv(10), layer=10, microbatch=1)
    model.send(qkv(11), layer=11, microbatch=1)
    model.send(qkv(0), layer=0, microbatch=0)
    with attention.recv(microbatch=0, timeout=WAIT_S) as msg:
        assert (msg.microbatch, msg.layer) == (0, 0)
    for layer in (10, 11):
        with attention.recv(timeout=WAIT_S) as msg:
            assert (msg.microbatch, msg.layer) == (1, layer)


def test_duplicate_sequence_number_raises(credit_pair):
    model, attention = credit_pair
    model.send(qkv(0), layer=0, microbatch=0)
    attention.recv(timeout=WAIT_S).release()
    attention.flush(WAIT_S)  # send a piggybacked credit now: the raw send reuses slot 0
    model._send_raw(qkv(0), layer=0, microbatch=0, seq=0, timeout=WAIT_S)
    with pytest.raises(lc.SequenceError, match="got seq 0, expected 1: duplicate"):
        attention.recv(timeout=WAIT_S)
    model.send(qkv(1), layer=1, microbatch=0, timeout=WAIT_S)  # the channel goes on in order
    with attention.recv(timeout=WAIT_S) as msg:
        assert msg.seq == 1 and msg.layer == 1


def test_sequence_gap_raises(pair):
    model, attention = pair
    model._send_raw(qkv(0), layer=0, microbatch=1, seq=3, timeout=WAIT_S)
    with pytest.raises(lc.SequenceError, match="got seq 3, expected 0: gap"):
        attention.recv(microbatch=1, timeout=WAIT_S)


def test_credits_flow_in_both_directions(credit_pair):
    model, attention = credit_pair
    for layer in range(3 * SPEC.slots_per_microbatch):
        for mb in range(SPEC.microbatches):
            model.send(qkv(layer), layer=layer, microbatch=mb, timeout=WAIT_S)
        for _ in range(SPEC.microbatches):
            with attention.recv(timeout=WAIT_S) as request:
                attention.send(request.tensors[0], layer=request.layer, microbatch=request.microbatch,
                               timeout=WAIT_S)
        for mb in range(SPEC.microbatches):
            with model.recv(microbatch=mb, timeout=WAIT_S) as reply:
                assert reply.layer == layer and np.all(reply.tensors[0] == layer)
    model.flush(WAIT_S)
    attention.flush(WAIT_S)
    sent = SPEC.microbatches * 3 * SPEC.slots_per_microbatch
    assert model.metrics.credits_returned == attention.metrics.credits_returned == sent


def test_piggybacked_credit_is_applied_while_its_message_waits_in_the_buffer(contexts):
    model, attention = open_pair(*contexts, piggyback=True)
    with model, attention:
        for i in range(SPEC.slots_per_microbatch):  # fill micro-batch 0's request slots
            model.send(qkv(i), layer=i, microbatch=0)
        attention.recv(microbatch=0, timeout=WAIT_S).release()
        attention.send(qkv(0)[0], layer=0, microbatch=1)  # carries the credit, lands for mb 1
        model.send(qkv(2), layer=2, microbatch=0, timeout=WAIT_S)  # needs that credit; mb 1 unread
        assert attention.metrics.credits_piggybacked == 1
        with model.recv(microbatch=1, timeout=WAIT_S) as reply:
            assert reply.layer == 0


# --------------------------------------------------------------------------
# asyncio


def test_arecv_waits_on_the_context_fd(pair):
    model, attention = pair

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, lambda: model.send(qkv(4), layer=4, microbatch=1))
        msg = await attention.arecv(microbatch=1, timeout=WAIT_S)
        with msg:
            return msg.layer, int(msg.tensors[0].flat[0])

    assert asyncio.run(main()) == (4, 4)


def test_channels_sharing_a_context_await_concurrently(contexts):
    async def serve(attention: Channel) -> None:
        with await attention.arecv(timeout=WAIT_S) as request:
            await attention.asend(request.tensors[0], layer=request.layer, microbatch=request.microbatch,
                                  timeout=WAIT_S)

    async def ask(model: Channel, value: int) -> int:
        await model.asend(qkv(value), layer=value, microbatch=0, timeout=WAIT_S)
        with await model.arecv(microbatch=0, timeout=WAIT_S) as reply:
            return int(reply.tensors[0].flat[0])

    async def main(pairs: list[tuple[Channel, Channel]]) -> list[int]:
        servers = [asyncio.create_task(serve(attention)) for _, attention in pairs]
        answers = await asyncio.gather(*(ask(model, 20 + i) for i, (model, _) in enumerate(pairs)))
        await asyncio.gather(*servers)
        return answers

    with open_pairs(contexts, 2) as pairs:
        assert asyncio.run(main(pairs)) == [20, 21]


def test_arecv_times_out(pair):
    _, attention = pair
    with pytest.raises(lc.TimeoutError):
        asyncio.run(attention.arecv(timeout=0.05))


# --------------------------------------------------------------------------
# Setup checks


def test_spec_mismatch_fails_on_both_sides_with_a_clear_error(contexts):
    model_ctx, attention_ctx = contexts
    other = ChannelSpec(max_tokens=8, hidden=64, heads=4, kv_heads=2, head_dim=16)
    with pytest.raises(SpecMismatchError, match=r"max_tokens: ours=4 peer's=8"):
        open_pair(model_ctx, attention_ctx, SPEC, attention_spec=other)


def test_both_ends_with_the_same_role_are_refused(contexts):
    model_ctx, attention_ctx = contexts
    with ChannelListener(attention_ctx, "127.0.0.1:0", SPEC, role="model") as listener:
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(err=_accept_error(listener)))
        thread.start()
        with pytest.raises(SpecMismatchError, match="role 'model'"):
            Channel.connect(model_ctx, listener.address, SPEC, role="model")
        thread.join(WAIT_S)
    assert isinstance(box["err"], SpecMismatchError)


def _accept_error(listener: ChannelListener) -> BaseException | None:
    try:
        listener.accept(timeout=WAIT_S).close()
    except BaseException as exc:
        return exc
    return None


def test_spec_validation():
    assert ChannelSpec(1, 8, 1, 1, 8, dtype="bf16").dtype == "bfloat16"
    with pytest.raises(lc.InvalidArgumentError):
        ChannelSpec(0, 8, 1, 1, 8)
    with pytest.raises(lc.InvalidArgumentError):
        ChannelSpec(1, 8, 1, 1, 8, dtype="complex64")
    assert SPEC.digest() == ChannelSpec(**SPEC.to_dict()).digest()


def test_a_thread_waiting_in_a_channel_receive_releases_the_gil(pair):
    """recv is one native call that runs progress with the GIL released: while it waits,
    this thread computes in Python and then sends the message that ends the wait."""
    model, attention = pair
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(attention.recv(microbatch=0, timeout=20)))
    waiter.start()
    total = sum(i * i for i in range(300_000))  # needs the GIL while the waiter waits
    model.send([np.array([total], np.int64)], layer=1, microbatch=0)
    waiter.join(30)
    assert len(got) == 1 and int(got[0].tensors[0][0]) == total
    got[0].release()


def test_a_channel_receive_is_one_native_call_and_demultiplexes_natively(pair):
    """The endpoint's completions go to the native channel, never to the Context's queue."""
    model, attention = pair
    for layer in range(4):  # two slots per micro-batch: all in flight at once
        model.send([np.full(16, layer, np.float32)], layer=layer, microbatch=layer % 2)
    model.flush()
    assert attention.context.poll() == []  # nothing reached the shared queue or Python
    for layer in range(4):
        with attention.recv(microbatch=layer % 2, timeout=10) as message:
            assert message.layer == layer and message.tensors[0][0] == layer


def test_a_channel_group_sends_and_collects_a_layer_in_one_call_each(contexts):
    """One model worker, two attention workers: q/k/v out to both, both replies back."""
    with open_pairs(contexts, 2, piggyback=True) as pairs:
        group = lc_channel.ChannelGroup([model for model, _ in pairs])
        for layer in range(6):
            mb = layer % 2
            seqs = group.send([[np.full(8, 10 * i + layer, np.float32)] for i in range(2)], layer=layer,
                              microbatch=mb)
            assert seqs == [layer // 2, layer // 2]
            for i, (_, attention) in enumerate(pairs):
                with attention.recv(microbatch=mb, timeout=10) as request:
                    assert request.layer == layer and request.tensors[0][0] == 10 * i + layer
                    out = attention.send_buffers(mb, [(4,)], "float32")
                    out[0][:] = -request.tensors[0][0]
                attention.send(out, layer=layer, microbatch=mb)
            replies = group.recv(microbatch=mb, timeout=10)
            assert [r.layer for r in replies] == [layer, layer]
            assert [float(r.tensors[0][0]) for r in replies] == [-(10 * i + layer) for i in range(2)]
            for reply in replies:
                reply.release()
        with pytest.raises(lc.TimeoutError, match="no message for micro-batch 0 from model-ep"):
            group.recv(microbatch=0, timeout=0.05)  # nothing in flight: a timeout takes nothing


def test_view_caches_stay_bounded_when_shapes_keep_changing(pair):
    """Views are kept per layout (same shapes every layer); a peer varying shapes cannot grow them."""
    model, attention = pair
    for n in range(1, 301):
        (buf,) = model.send_buffers(0, [(n,)], "uint8")
        buf[:] = n % 251
        model.send([buf], layer=n, microbatch=0)
        with attention.recv(microbatch=0, timeout=10) as message:
            assert message.tensors[0].shape == (n,) and int(message.tensors[0][-1]) == n % 251
    assert len(attention._recv_views) <= _VIEW_CACHE_MAX
    assert len(model._send_views) <= _VIEW_CACHE_MAX
    # The same layout again is the same views, described once.
    first = model.send_buffers(1, [(4, 8)], "float32")
    model.send(first, layer=0, microbatch=1)
    with attention.recv(microbatch=1, timeout=10):
        pass
    model.send(model.send_buffers(1, [(4, 8)], "float32"), layer=1, microbatch=1)
    with attention.recv(microbatch=1, timeout=10):
        pass
    again = model.send_buffers(1, [(4, 8)], "float32")  # slot 0 of micro-batch 1 again
    assert again[0] is first[0] and again[0]._lamina_info.address == first[0].ctypes.data


def test_send_buffers_with_one_dtype_per_tensor(pair):
    model, attention = pair
    out, stamp = model.send_buffers(0, [(2, 3), (1,)], ["float16", "int64"])
    out[:] = np.arange(6, dtype=np.float16).reshape(2, 3)
    stamp[0] = 1 << 40
    model.send([out, stamp], layer=5, microbatch=0)
    with attention.recv(microbatch=0, timeout=10) as message:
        assert message.dtype_names == ["float16", "int64"]
        assert np.array_equal(message.tensors[0], np.arange(6, dtype=np.float16).reshape(2, 3))
        assert int(message.tensors[1][0]) == 1 << 40
    assert model.metrics.staged_bytes == 0 and model.metrics.slot_messages == 1
    with pytest.raises(lc.InvalidArgumentError, match="2 dtypes for 1 shapes"):
        model.send_buffers(0, [(4,)], ["float16", "int64"])


def test_asyncio_waits_write_out_held_credits(contexts):
    """A receiver that only awaits arecv must still hand its slots back when credits
    ride on its (never coming) next message: the sender's asend would wait forever."""
    model_ctx, attention_ctx = contexts
    model, attention = open_pair(model_ctx, attention_ctx, piggyback=True)

    async def send_all() -> None:
        for layer in range(6):  # three times the two slots of micro-batch 0
            await model.asend([np.full(4, layer, np.float32)], layer=layer, microbatch=0, timeout=10)

    async def receive_all() -> list[int]:
        layers = []
        for _ in range(6):
            message = await attention.arecv(microbatch=0, timeout=10)
            layers.append(message.layer)
            message.release()
        return layers

    async def both() -> list[int]:
        _, layers = await asyncio.gather(send_all(), receive_all())
        return layers

    try:
        assert asyncio.run(both()) == list(range(6))
    finally:
        model.close()
        attention.close()


def test_a_channel_group_error_names_the_channel_it_came_from(contexts):
    with open_pairs(contexts, 3) as pairs:
        group = lc_channel.ChannelGroup([model for model, _ in pairs])
        pairs[1][1].close()  # worker 1 goes away
        with pytest.raises((lc.PeerLostError, lc.TimeoutError)) as failed:
            group.send([[np.zeros(4, np.float32)]] * 3, layer=0, microbatch=0)
            group.recv(microbatch=0, timeout=10)
        assert failed.value.channel_index == 1
        assert pairs[1][0].name in str(failed.value)


def test_a_send_buffers_view_reshaped_in_place_is_described_again(pair):
    model, attention = pair
    (view,) = model.send_buffers(0, [(4, 8)], "float32")
    view[:] = np.arange(32, dtype=np.float32).reshape(4, 8)
    view.shape = (8, 4)  # numpy allows this on a contiguous view
    model.send([view], layer=0, microbatch=0)
    with attention.recv(microbatch=0, timeout=10) as message:
        assert message.tensors[0].shape == (8, 4)
        assert np.array_equal(message.tensors[0], np.arange(32, dtype=np.float32).reshape(8, 4))


def test_close_from_another_thread_wakes_the_waiter(pair):
    """A receive blocked in native code (GIL released) when another thread closes the
    channel ends with ClosedError, promptly, and nothing is freed under it."""
    model, attention = pair
    outcome: dict[str, object] = {}

    def wait() -> None:
        started = time.monotonic()
        try:
            attention.recv(microbatch=0, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        outcome["waited"] = time.monotonic() - started

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)  # inside lm_chan_recv by now
    attention.close()
    waiter.join(10)
    assert not waiter.is_alive(), "the waiter was not woken by close()"
    assert isinstance(outcome.get("error"), lc.ClosedError), outcome
    assert outcome["waited"] < 5
    with pytest.raises(lc.ClosedError):
        attention.recv(microbatch=0, timeout=0)


def wait_until_pending(channel: Channel, count: int) -> None:
    """Drive progress until ``count`` messages are queued on the channel (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while lib.lm_chan_pending(channel._ch, -1) < count:
        assert time.monotonic() < deadline, f"{count} messages never arrived"
        lib.lm_chan_progress(channel._ch)
        time.sleep(0.001)


def test_recv_any_takes_the_oldest_arrival_over_several_senders(contexts):
    """One attention worker, several model nodes: requests come out in arrival order whichever
    channel carried them, with the index of that channel; a timeout takes nothing."""
    with open_pairs(contexts, 3) as pairs:
        group = lc_channel.ChannelGroup([attention for _, attention in pairs])
        order = [2, 0, 1, 0, 2]  # senders, in the order they send
        for n, sender in enumerate(order):
            model = pairs[sender][0]
            model.send([np.full(4, 100 * sender + n, np.float32)], layer=n, microbatch=n % 2)
            wait_until_pending(pairs[sender][1], order[:n + 1].count(sender))  # landed before the next goes
        got = []
        for _ in order:
            index, message = group.recv_any(timeout=WAIT_S)
            with message:
                got.append((index, message.layer, float(message.tensors[0][0])))
        assert got == [(s, n, 100 * s + n) for n, s in enumerate(order)]
        with pytest.raises(lc.TimeoutError, match="no message for any micro-batch on any of 3 channels"):
            group.recv_any(timeout=0.05)
        # One micro-batch only: the others stay queued.
        pairs[1][0].send([np.ones(4, np.float32)], layer=7, microbatch=1)
        pairs[0][0].send([np.ones(4, np.float32)], layer=8, microbatch=0)
        index, message = group.recv_any(microbatch=0, timeout=WAIT_S)
        assert (index, message.layer) == (0, 8)
        message.release()
        index, message = group.recv_any(timeout=WAIT_S)
        assert (index, message.layer) == (1, 7)
        message.release()


def test_recv_any_reports_the_channel_that_failed(contexts):
    with open_pairs(contexts, 2) as pairs:
        group = lc_channel.ChannelGroup([attention for _, attention in pairs])
        pairs[1][0].close()  # model node 1 goes away
        with pytest.raises((lc.PeerLostError, lc.ClosedError)) as failed:
            group.recv_any(timeout=WAIT_S)
        assert failed.value.channel_index == 1
        pairs[1][1].close()
        with pytest.raises(lc.ClosedError):
            group.recv_any(timeout=0.05)


def test_tensors_in_several_registered_regions_are_gathered_from_each(contexts, pair):
    """q, k, v registered as three regions (and one strided view among them): no staging copy; one gather
    write per region, the bytes as sent."""
    model, attention = pair
    q_mem = np.arange(4 * 4 * 16, dtype=np.float16).reshape(Q_SHAPE)
    fused_kv = np.arange(4 * 2 * 2 * 16, dtype=np.float16).reshape(4, 2, 2, 16) + 1000
    regions = [contexts[0].register(q_mem), contexts[0].register(fused_kv)]
    for region in regions:
        model.add_source_region(region)
    k, v = fused_kv[:, 0], fused_kv[:, 1]  # strided views of the second region
    model.send([q_mem, k, v], layer=4, microbatch=0, timeout=WAIT_S)
    assert model.metrics.staged_bytes == 0 and model.metrics.gather_messages == 1
    with attention.recv(0, timeout=WAIT_S) as msg:
        assert [same_bits(got, want) for got, want in zip(msg.tensors, (q_mem, k, v))] == [True] * 3
    # A tensor outside every registered region stages the message, as before.
    model.send([q_mem, np.ones(KV_SHAPE, np.float16)], layer=5, microbatch=0, timeout=WAIT_S)
    assert model.metrics.staged_messages == 1
    attention.recv(0, timeout=WAIT_S).release()


def test_a_tensor_in_its_own_send_slot_survives_staging(contexts, pair):
    """A message that must be copied (rows under 64 B) and also holds a view of the very send slot it
    goes in: the copies must not overwrite that view before it is read."""
    model, attention = pair
    backing = np.arange(4096, dtype=np.uint8)
    model.add_source_region(contexts[0].register(backing))
    short_rows = backing[:512].reshape(8, 64)[:, :32]  # 32-byte rows: staged
    in_slot = model.send_slot(0, WAIT_S)[:256]
    in_slot[:] = 200
    want = in_slot.copy()
    model.send([short_rows, in_slot], layer=1, microbatch=0, timeout=WAIT_S)
    with attention.recv(0, timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], short_rows) and same_bits(msg.tensors[1], want)


def test_an_empty_tensor_does_not_stage_a_multi_region_message(contexts, pair):
    model, attention = pair
    a, b = np.full(64, 1, np.float16), np.full(64, 2, np.float16)
    for memory in (a, b):
        model.add_source_region(contexts[0].register(memory))
    model.send([a, np.zeros(0, np.float16), b], layer=2, microbatch=1, timeout=WAIT_S)
    assert model.metrics.staged_bytes == 0 and model.metrics.gather_messages == 1
    with attention.recv(1, timeout=WAIT_S) as msg:
        assert same_bits(msg.tensors[0], a) and msg.tensors[1].size == 0 and same_bits(msg.tensors[2], b)


# ---- payloads apart from headers (payloads=: the GPUDirect receive layout, host memory here) -----------

def assert_ring_payloads_untouched(channel: Channel) -> None:
    """Only headers reached the channel's receive ring: every slot's payload area is still zero."""
    layout = channel._layout
    for index in range(layout.microbatches * layout.slots):
        start = index * layout.recv_stride + HEADER_BYTES
        assert not channel._buf[start:start + layout.recv_capacity].any()


def test_payloads_land_in_a_region_of_their_own_and_headers_in_the_ring(contexts):
    """Each side's received payloads land in the region it named (device memory in production, where the
    NIC writes and only headers are read by the CPU), for every send path; the ring carries headers."""
    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    into_attention = np.zeros(RingLayout.for_role(SPEC, "attention").payload_bytes, np.uint8)
    into_model = np.zeros(RingLayout.for_role(SPEC, "model").payload_bytes, np.uint8)
    rng = np.random.default_rng(9)
    model, attention = open_pair(a, b, attention_payloads=b.register(into_attention),
                                  model_payloads=a.register(into_model))
    try:
        fused = rng.standard_normal((4, 128)).astype(np.float16)
        model.add_source_region(a.register(fused))
        q, k = fused[:, :64].reshape(4, 4, 16), fused[:, 64:96].reshape(4, 2, 16)
        def from_slot():  # written where the message goes: the slot's payload is written apart
            buffers = model.send_buffers(0, [(4, 4, 16), (4, 2, 16)], "float16")
            buffers[0][...], buffers[1][...] = q, k
            model.send(buffers, layer=2, microbatch=0)

        sends = [lambda: model.send([q, k], layer=0, microbatch=0),                    # gathered from a region
                 lambda: model.send([q.copy(), k.copy()], layer=1, microbatch=1),      # copied into the slot
                 from_slot]
        for i, send in enumerate(sends):
            send()
            with attention.recv(timeout=WAIT_S) as got:
                assert got.layer == i
                for view in got.tensors:  # a view into the payload region, not the ring
                    assert np.shares_memory(view, into_attention)
                assert np.array_equal(got.tensors[0], q) and np.array_equal(got.tensors[1], k)
        reply = rng.standard_normal((4, 4, 16)).astype(np.float16)
        attention.send(reply, layer=7, microbatch=1)
        with model.recv(1, timeout=WAIT_S) as got:
            assert np.shares_memory(got.tensors[0], into_model) and np.array_equal(got.tensors[0], reply)
        assert_ring_payloads_untouched(attention)
    finally:
        model.close()
        attention.close()


def test_a_payload_region_is_checked_before_the_handshake(contexts):
    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    need = RingLayout.for_role(SPEC, "model").payload_bytes
    with pytest.raises(lc.InvalidArgumentError, match="payload region has 64 B"):
        Channel.connect(a, "127.0.0.1:1", SPEC, payloads=a.register(np.zeros(64, np.uint8)))
    with pytest.raises(lc.InvalidArgumentError, match="another Context"):
        Channel.connect(a, "127.0.0.1:1", SPEC, payloads=b.register(np.zeros(need, np.uint8)))


def test_a_peers_payload_descriptor_is_untrusted_input():
    from lamina_comm.channel.handshake import _peer_payloads
    assert _peer_payloads(SPEC, {}) == (None, 0)
    good = {"key": 1, "addr": 4096, "length": 1 << 20, "rkey": 7, "access": 3}
    region, split = _peer_payloads(SPEC, {"payloads": good})
    assert region.length == 1 << 20 and split == SPEC.microbatches  # an older peer splits them all
    assert _peer_payloads(SPEC, {"payloads": good, "payload_microbatches": 1})[1] == 1
    for bad in (None, [], "x", {**good, "length": -1}, {**good, "addr": 1 << 64}, {"key": 1}):
        with pytest.raises(lc.ProtocolError):
            _peer_payloads(SPEC, {"payloads": bad})
    for count in (0, -1, SPEC.microbatches + 1, 1.0, "1", True, None):
        with pytest.raises(lc.ProtocolError, match="payload_microbatches"):
            _peer_payloads(SPEC, {"payloads": good, "payload_microbatches": count})


def test_payloads_of_the_first_microbatches_only(contexts):
    """payload_microbatches=1: micro-batch 0's payloads land in the region (a GPU's, in production), the
    last micro-batch's stay after their headers in the ring, host-readable (an engine's control
    micro-batch); the region needs room for the split micro-batches only."""
    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    layout = RingLayout.for_role(SPEC, "attention")
    assert layout.payload_bytes_of(1) * SPEC.microbatches == layout.payload_bytes
    landing = np.zeros(layout.payload_bytes_of(1), np.uint8)
    region = b.register(landing)
    with pytest.raises(lc.InvalidArgumentError, match="needs"):  # too small for every micro-batch
        Channel.connect(b, "127.0.0.1:1", SPEC, role="attention", payloads=region)
    for bad in (0, SPEC.microbatches + 1):
        with pytest.raises(lc.InvalidArgumentError, match="payload_microbatches"):
            Channel.connect(b, "127.0.0.1:1", SPEC, role="attention", payloads=region, payload_microbatches=bad)
    with pytest.raises(lc.InvalidArgumentError, match="needs a payload region"):
        Channel.connect(b, "127.0.0.1:1", SPEC, payload_microbatches=1)
    listener = ChannelListener(b, "127.0.0.1:0", SPEC, timeout=WAIT_S)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("ch", listener.accept(
        WAIT_S, payloads=region, payload_microbatches=1)))
    thread.start()
    model = Channel.connect(a, listener.address, SPEC, timeout=WAIT_S)
    thread.join(WAIT_S)
    listener.close()
    attention = box["ch"]
    try:
        assert attention.payload_microbatches == 1 and model.payload_microbatches == 0
        last = SPEC.microbatches - 1
        for round_ in range(3):  # the views are cached per layout: each micro-batch keeps its own
            for mb, fill in ((0, 3 + round_), (last, 9 + round_)):
                model.send(np.full((4, 4, 16), fill, np.float16), layer=round_, microbatch=mb)
                with attention.recv(mb, timeout=WAIT_S) as got:
                    view = got.tensors[0]
                    assert np.shares_memory(view, landing) == (mb == 0)
                    assert np.shares_memory(view, attention._buf) == (mb != 0)
                    assert (view == fill).all()
    finally:
        model.close()
        attention.close()


def test_a_partial_split_is_asked_only_of_a_peer_that_understands_it(contexts, monkeypatch):
    """A peer without 'payload-microbatches' would write every micro-batch's payloads into the region:
    a side splitting only some refuses it at setup; splitting all still works with it."""
    from lamina_comm.channel import handshake
    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    monkeypatch.setattr(handshake, "_CAPS", ["payloads"])  # both ends speak as the previous version
    region = b.register(np.zeros(RingLayout.for_role(SPEC, "attention").payload_bytes, np.uint8))
    listener = ChannelListener(b, "127.0.0.1:0", SPEC, timeout=WAIT_S)
    box: dict = {}

    def accept():
        try:
            box["ch"] = listener.accept(WAIT_S, payloads=region, payload_microbatches=1)
        except lc.LaminaError as exc:
            box["error"] = exc

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        model = Channel.connect(a, listener.address, SPEC, timeout=WAIT_S)
        model.close()
    except lc.LaminaError:
        pass  # the attention side may have closed first
    thread.join(WAIT_S)
    listener.close()
    assert "payload-microbatches" in str(box.get("error")), box
    model, attention = open_pair(a, b, attention_payloads=region)  # all of them: understood
    model.close()
    attention.close()


def test_a_peer_that_sends_at_once_finds_the_split_in_place(contexts, monkeypatch):
    """The model sends right after connecting, while the attention side is still setting its channel up:
    the message waits, queued, and is opened as split (its payload in the region)."""
    import time

    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    landing = np.zeros(RingLayout.for_role(SPEC, "attention").payload_bytes, np.uint8)
    split = Channel._split

    def slow_split(self, *args):
        time.sleep(0.3)  # the model's first message arrives meanwhile
        split(self, *args)

    monkeypatch.setattr(Channel, "_split", slow_split)
    listener = ChannelListener(b, "127.0.0.1:0", SPEC, timeout=WAIT_S)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("ch", listener.accept(WAIT_S, payloads=b.register(
        landing))))
    thread.start()
    model = Channel.connect(a, listener.address, SPEC, timeout=WAIT_S)
    q = np.full((4, 4, 16), 3, np.float16)
    model.send(q, layer=1, microbatch=0)
    thread.join(WAIT_S)
    listener.close()
    attention = box["ch"]
    try:
        with attention.recv(0, timeout=WAIT_S) as got:
            assert np.shares_memory(got.tensors[0], landing) and (got.tensors[0] == 3).all()
    finally:
        model.close()
        attention.close()


def test_payloads_are_asked_only_of_a_peer_that_understands_them(contexts, monkeypatch):
    """An older peer (no 'payloads' capability in its hello) would keep writing payloads into the ring: a
    side asking for payloads= refuses it at setup instead of reading a region nobody writes."""
    from lamina_comm.channel import handshake
    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    assert handshake._peer_caps({}) == set() and handshake._peer_caps({"caps": ["payloads"]}) == {"payloads"}
    for bad in ("payloads", [1], {"a": 1}):
        with pytest.raises(lc.ProtocolError):
            handshake._peer_caps({"caps": bad})
    monkeypatch.setattr(handshake, "_CAPS", [])  # both ends here speak as an older peer would
    region = b.register(np.zeros(RingLayout.for_role(SPEC, "attention").payload_bytes, np.uint8))
    with pytest.raises(lc.ProtocolError, match="does not write payloads apart"):
        model, attention = open_pair(a, b, attention_payloads=region)


def test_views_of_a_payload_region_outlive_its_close(contexts):
    """A received view keeps the payload memory alive: closing the region (and dropping the array) leaves
    it readable, never dangling."""
    import gc

    from lamina_comm.channel.spec import RingLayout
    a, b = contexts
    landing = np.zeros(RingLayout.for_role(SPEC, "attention").payload_bytes, np.uint8)
    region = b.register(landing)
    model, attention = open_pair(a, b, attention_payloads=region)
    try:
        model.send(np.full((4, 4, 16), 5, np.float16), layer=1, microbatch=0)
        message = attention.recv(0, timeout=WAIT_S)
        view = message.tensors[0]
        message.release()
    finally:
        model.close()
        attention.close()
    region.close()
    del landing, region, message
    gc.collect()
    assert (view == 5).all()
