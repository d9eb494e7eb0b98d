"""Ping-pong scheduler: same results as the sequential reference, no deadlock, order."""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from lamina_comm.pipeline import (
    CallableStage,
    ScheduledOp,
    run_sequential,
    run_step,
    sequential_schedule,
    serve_attention,
    step_schedule,
)
from lamina_comm.timeline import Timeline

HIDDEN = 16
LAYERS = 5
MICROBATCH_COUNTS = [1, 2, 3, 4]
# Generous: only a real deadlock gets near it, and then the test fails instead of hanging.
DEADLOCK_TIMEOUT_S = 10.0


class NumpyModel:
    """Deterministic per-micro-batch numpy state with uneven, randomized call times.

    The sleeps change the interleaving between threads, never the arithmetic:
    each micro-batch's state only ever sees its own operations, in layer order.
    """

    def __init__(self, num_layers: int, num_microbatches: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.state = [rng.standard_normal(HIDDEN) for _ in range(num_microbatches)]
        self.pre_weight = rng.standard_normal((num_layers, HIDDEN))
        self.post_weight = rng.uniform(0.5, 1.5, (num_layers, HIDDEN))
        self.attention_scale = rng.uniform(0.1, 2.0, num_layers)
        self.final = [None] * num_microbatches
        self._sleep_rng = random.Random(seed)
        self._sleep_lock = threading.Lock()

    def jitter(self) -> None:
        with self._sleep_lock:
            delay = self._sleep_rng.uniform(0.0, 0.0005)
        time.sleep(delay)

    def begin(self, mb: int) -> None:
        self.state[mb] = self.state[mb] * 0.5  # stands in for the embedding

    def pre(self, layer: int, mb: int) -> np.ndarray:
        self.jitter()
        return np.tanh(self.state[mb] * self.pre_weight[layer]) + layer

    def attention(self, layer: int, mb: int, q: np.ndarray) -> np.ndarray:
        self.jitter()
        return np.cumsum(q) * self.attention_scale[layer] / (1.0 + np.abs(q).sum()) + mb

    def post(self, layer: int, mb: int, result: np.ndarray) -> None:
        self.jitter()
        self.state[mb] = self.state[mb] * self.post_weight[layer] + result

    def end(self, mb: int) -> None:
        self.final[mb] = self.state[mb].copy()  # stands in for the LM head


def direct_stage(model: NumpyModel) -> CallableStage:
    """Attention computed in-process at recv time; recv of an unsent pair fails loudly."""
    inbox: dict[tuple[int, int], np.ndarray] = {}

    def send(layer: int, mb: int, payload: np.ndarray) -> None:
        assert (layer, mb) not in inbox, f"second send of {(layer, mb)}"
        inbox[(layer, mb)] = payload

    def recv(layer: int, mb: int) -> np.ndarray:
        assert (layer, mb) in inbox, f"recv{(layer, mb)} before its send: would block forever"
        return model.attention(layer, mb, inbox.pop((layer, mb)))

    return CallableStage(model.pre, send, recv, model.post, model.begin, model.end)


class ThreadedAttention:
    """A fake attention tier in a thread, connected by queues like a transport.

    Requests go through one FIFO (arrival order); each micro-batch has its own
    reply queue, and the model tier's recv waits on it with a timeout.
    """

    def __init__(self, model: NumpyModel, recv_timeout_s: float = DEADLOCK_TIMEOUT_S) -> None:
        self.model = model
        self.recv_timeout_s = recv_timeout_s
        self.requests: queue.Queue[tuple[int, int, Any]] = queue.Queue()
        self.replies: defaultdict[int, queue.Queue[tuple[int, Any]]] = defaultdict(queue.Queue)
        self.stop_event = threading.Event()
        self.timeline = Timeline("attention")
        self.served: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.served.append(serve_attention(
            self._recv_any, self.model.attention, self._reply, self.stop_event.is_set,
            self.timeline,
        ))

    def _recv_any(self) -> tuple[int, int, Any] | None:
        try:
            return self.requests.get(timeout=0.01)
        except queue.Empty:
            return None

    def _reply(self, layer: int, mb: int, result: Any) -> None:
        self.replies[mb].put((layer, result))

    def send(self, layer: int, mb: int, payload: Any) -> None:
        self.requests.put((layer, mb, payload))

    def recv(self, layer: int, mb: int) -> Any:
        got_layer, result = self.replies[mb].get(timeout=self.recv_timeout_s)
        assert got_layer == layer, f"mb {mb}: expected layer {layer}, got {got_layer}"
        return result

    def stage(self) -> CallableStage:
        m = self.model
        return CallableStage(m.pre, self.send, self.recv, m.post, m.begin, m.end)

    def __enter__(self) -> ThreadedAttention:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=DEADLOCK_TIMEOUT_S)
        assert not self.thread.is_alive(), "attention thread did not stop"


class LoggingStage:
    """Wraps a stage and logs every call as (op, layer, mb)."""

    def __init__(self, inner: CallableStage) -> None:
        self.inner = inner
        self.log: list[tuple[str, int | None, int]] = []

    def begin(self, mb: int) -> None:
        self.log.append(("begin", None, mb))
        self.inner.begin(mb)

    def pre(self, layer: int, mb: int) -> Any:
        self.log.append(("pre", layer, mb))
        return self.inner.pre(layer, mb)

    def send(self, layer: int, mb: int, payload: Any) -> None:
        self.log.append(("send", layer, mb))
        self.inner.send(layer, mb, payload)

    def recv(self, layer: int, mb: int) -> Any:
        self.log.append(("recv", layer, mb))
        return self.inner.recv(layer, mb)

    def post(self, layer: int, mb: int, result: Any) -> None:
        self.log.append(("post", layer, mb))
        self.inner.post(layer, mb, result)

    def end(self, mb: int) -> None:
        self.log.append(("end", None, mb))
        self.inner.end(mb)


def sequential_reference(num_layers: int, num_microbatches: int) -> list[np.ndarray]:
    model = NumpyModel(num_layers, num_microbatches)
    run_sequential(num_layers, num_microbatches, direct_stage(model))
    return model.final


def assert_bitwise_equal(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for mb, (a, b) in enumerate(zip(got, expected)):
        assert a is not None, f"mb {mb} never reached its end hook"
        assert a.tobytes() == b.tobytes(), f"mb {mb} differs"


# --------------------------------------------------------------------------
# Same results as the sequential reference


@pytest.mark.parametrize("num_microbatches", MICROBATCH_COUNTS)
def test_ping_pong_matches_sequential_bit_for_bit(num_microbatches: int) -> None:
    model = NumpyModel(LAYERS, num_microbatches)
    run_step(LAYERS, num_microbatches, direct_stage(model))
    assert_bitwise_equal(model.final, sequential_reference(LAYERS, num_microbatches))


@pytest.mark.parametrize("num_microbatches", MICROBATCH_COUNTS)
def test_threaded_attention_tier_matches_and_never_deadlocks(num_microbatches: int) -> None:
    model = NumpyModel(LAYERS, num_microbatches)
    with ThreadedAttention(model) as attention:
        run_step(LAYERS, num_microbatches, attention.stage())
    assert attention.served == [LAYERS * num_microbatches]
    assert_bitwise_equal(model.final, sequential_reference(LAYERS, num_microbatches))


def test_repeated_steps_reuse_the_same_attention_tier() -> None:
    model = NumpyModel(LAYERS, 3)
    with ThreadedAttention(model) as attention:
        for _ in range(3):
            run_step(LAYERS, 3, attention.stage())
    assert attention.served == [3 * LAYERS * 3]


def test_deadlock_harness_fails_instead_of_hanging() -> None:
    # Guards the no-deadlock test against being vacuous: a recv with no matching
    # send must raise within the timeout rather than block the test run.
    model = NumpyModel(LAYERS, 1)
    with ThreadedAttention(model, recv_timeout_s=0.05) as attention:
        with pytest.raises(queue.Empty):
            attention.recv(0, 0)


def test_exceptions_from_the_stage_propagate() -> None:
    def failing_pre(layer: int, mb: int) -> None:
        raise RuntimeError(f"pre failed at {layer}, {mb}")

    stage = CallableStage(failing_pre, lambda *a: None, lambda *a: None, lambda *a: None)
    with pytest.raises(RuntimeError, match="pre failed at 0, 0"):
        run_step(2, 2, stage)


# --------------------------------------------------------------------------
# Order invariants from the call log


def call_log(num_layers: int, num_microbatches: int) -> list[tuple[str, int | None, int]]:
    stage = LoggingStage(direct_stage(NumpyModel(num_layers, num_microbatches)))
    run_step(num_layers, num_microbatches, stage)
    return stage.log


@pytest.mark.parametrize("num_microbatches", MICROBATCH_COUNTS)
@pytest.mark.parametrize("num_layers", [1, 2, 4])
def test_each_microbatch_sees_its_sequential_order(num_layers: int, num_microbatches: int) -> None:
    log = call_log(num_layers, num_microbatches)
    expected_per_mb = (
        [("begin", None)]
        + [(op, layer) for layer in range(num_layers) for op in ("pre", "send", "recv", "post")]
        + [("end", None)]
    )
    for mb in range(num_microbatches):
        assert [(op, layer) for op, layer, m in log if m == mb] == expected_per_mb


@pytest.mark.parametrize("num_microbatches", MICROBATCH_COUNTS)
def test_every_recv_once_and_after_its_send(num_microbatches: int) -> None:
    log = call_log(LAYERS, num_microbatches)
    position = {}
    for index, (op, layer, mb) in enumerate(log):
        if op in ("send", "recv"):
            assert (op, layer, mb) not in position, f"{op}{(layer, mb)} twice"
            position[(op, layer, mb)] = index
    for layer in range(LAYERS):
        for mb in range(num_microbatches):
            assert position[("send", layer, mb)] < position[("recv", layer, mb)]


@pytest.mark.parametrize("num_microbatches", MICROBATCH_COUNTS)
def test_at_most_one_message_in_flight_per_microbatch(num_microbatches: int) -> None:
    in_flight: set[int] = set()
    for op, _, mb in call_log(LAYERS, num_microbatches):
        if op == "send":
            assert mb not in in_flight
            in_flight.add(mb)
        elif op == "recv":
            in_flight.remove(mb)
        assert len(in_flight) <= num_microbatches
    assert not in_flight


@pytest.mark.parametrize("num_microbatches", [2, 3, 4])
def test_all_microbatches_are_sent_before_the_first_wait_of_a_layer(num_microbatches: int) -> None:
    # This is the overlap: mb 0's attention runs while the others compute.
    log = call_log(LAYERS, num_microbatches)
    for layer in range(LAYERS):
        first_recv = log.index(("recv", layer, 0))
        for mb in range(num_microbatches):
            assert log.index(("send", layer, mb)) < first_recv


def test_schedule_is_round_robin() -> None:
    ops = [tuple(op) for op in step_schedule(2, 2)]
    assert ops == [
        ("begin", None, 0), ("start", 0, 0),
        ("begin", None, 1), ("start", 0, 1),
        ("finish", 0, 0), ("start", 1, 0),
        ("finish", 0, 1), ("start", 1, 1),
        ("finish", 1, 0), ("end", None, 0),
        ("finish", 1, 1), ("end", None, 1),
    ]


@pytest.mark.parametrize("num_layers", [1, 3])
def test_one_microbatch_degenerates_to_sequential(num_layers: int) -> None:
    assert list(step_schedule(num_layers, 1)) == list(sequential_schedule(num_layers, 1))


def test_sequential_schedule_runs_microbatches_one_after_another() -> None:
    mbs = [op.mb for op in sequential_schedule(2, 2)]
    assert mbs == [0] * 6 + [1] * 6


@pytest.mark.parametrize("sizes", [(0, 1), (1, 0), (-1, 2)])
def test_invalid_sizes_are_rejected(sizes: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        list(step_schedule(*sizes))
    with pytest.raises(ValueError):
        run_step(*sizes, CallableStage(*[lambda *a: None] * 4))


def test_hooks_are_optional() -> None:
    class BareStage:
        def __init__(self) -> None:
            self.outbox: dict[tuple[int, int], int] = {}
            self.total = 0

        def pre(self, layer: int, mb: int) -> int:
            return layer + 10 * mb

        def send(self, layer: int, mb: int, payload: int) -> None:
            self.outbox[(layer, mb)] = payload

        def recv(self, layer: int, mb: int) -> int:
            return self.outbox.pop((layer, mb))

        def post(self, layer: int, mb: int, result: int) -> None:
            self.total += result

    stage = BareStage()
    run_step(3, 2, stage)
    assert stage.total == sum(layer + 10 * mb for layer in range(3) for mb in range(2))
    assert not stage.outbox


def test_scheduled_op_fields() -> None:
    op = ScheduledOp("start", 3, 1)
    assert (op.kind, op.layer, op.mb) == ("start", 3, 1)


# --------------------------------------------------------------------------
# Timeline recording


def test_run_step_records_named_spans_per_microbatch_track() -> None:
    timeline = Timeline("model")
    run_step(LAYERS, 2, direct_stage(NumpyModel(LAYERS, 2)), timeline)
    counts: defaultdict[tuple[str, str, int | None, int], int] = defaultdict(int)
    for span in timeline.spans:
        assert span.track == span.mb
        counts[(span.name, span.category, span.layer, span.mb)] += 1
    for mb in range(2):
        assert counts[("compute", "begin", None, mb)] == 1
        assert counts[("compute", "end", None, mb)] == 1
        for layer in range(LAYERS):
            for name, category in [("compute", "pre"), ("send", "send"),
                                   ("wait", "recv"), ("compute", "post")]:
                assert counts[(name, category, layer, mb)] == 1
    assert sum(counts.values()) == 2 * (2 + 4 * LAYERS)


def test_attention_tier_records_attention_and_send_spans() -> None:
    model = NumpyModel(LAYERS, 2)
    with ThreadedAttention(model) as attention:
        run_step(LAYERS, 2, attention.stage())
    names = sorted((s.name, s.layer, s.mb) for s in attention.timeline.spans)
    expected = sorted((name, layer, mb) for name in ("attention", "send")
                      for layer in range(LAYERS) for mb in range(2))
    assert names == expected


def test_serve_attention_skips_empty_polls_and_stops() -> None:
    arrivals = iter([None, (0, 1, 5.0), None, (1, 0, 7.0)])
    replies: list[tuple[int, int, float]] = []
    polls = 0

    def recv_any() -> tuple[int, int, Any] | None:
        nonlocal polls
        polls += 1
        return next(arrivals)

    served = serve_attention(
        recv_any, lambda layer, mb, x: x * 2, lambda *reply: replies.append(reply),
        stop=lambda: polls == 4,
    )
    assert served == 2
    assert replies == [(0, 1, 10.0), (1, 0, 14.0)]
