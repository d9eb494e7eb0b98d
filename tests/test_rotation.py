"""Rotational staggered pipelining: R model replicas, n micro-batches, residuals handed round a ring.

The threaded harness gives every replica its own copy of the model state and
moves a micro-batch's residual to the next replica through a queue, as a
transport would: a schedule that ran a unit on the wrong replica, or out of
order, would compute on a stale residual and the bit-for-bit comparison with
the sequential reference would fail.
"""
from __future__ import annotations

import itertools
import queue
import threading
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from lamina_comm.pipeline import (
    Rotation,
    execute,
    rotation_schedule,
    run_replica,
    run_sequential,
    serve_attention,
    step_schedule,
)

from .test_pipeline import DEADLOCK_TIMEOUT_S, NumpyModel, direct_stage

CONFIGS = [(1, 2), (2, 3), (3, 4), (2, 2), (2, 5), (3, 2)]  # (replicas, micro-batches)


@pytest.mark.parametrize("num_layers", [1, 2, 5])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4])
def test_one_replica_one_step_is_the_ping_pong_schedule(num_layers: int, microbatches: int) -> None:
    assert list(rotation_schedule(num_layers, Rotation(1, microbatches), 0)) == \
        list(step_schedule(num_layers, microbatches))


@pytest.mark.parametrize(("replicas", "microbatches"), CONFIGS)
@pytest.mark.parametrize("steps", [1, 3])
def test_every_unit_runs_once_on_the_replica_the_rotation_names(replicas: int, microbatches: int,
                                                                steps: int) -> None:
    num_layers = 4
    rotation = Rotation(replicas, microbatches)
    # Count across replicas: each (step-layer, mb) started and finished exactly once.
    for kind in ("start", "finish"):
        counts = defaultdict(int)
        for replica in range(replicas):
            for op in rotation_schedule(num_layers, rotation, replica, steps):
                if op.kind == kind:
                    counts[(op.layer, op.mb)] += 1
        assert counts == {(layer, mb): steps for layer in range(num_layers) for mb in range(microbatches)}


@pytest.mark.parametrize(("replicas", "microbatches"), CONFIGS)
def test_residuals_travel_round_a_ring(replicas: int, microbatches: int) -> None:
    rotation = Rotation(replicas, microbatches)
    for g, mb in itertools.product(range(12), range(microbatches)):
        here, there = rotation.replica_of(g, mb), rotation.replica_of(g + 1, mb)
        assert rotation.successor(here) == there
        assert rotation.predecessor(there) == here
    assert rotation.rotates == (replicas > 1 and microbatches % replicas != 0)


def test_two_replicas_three_microbatches_rotate_layer_by_layer() -> None:
    rotation = Rotation(2, 3)
    # mb 0 alternates replicas every layer; each replica takes every other unit.
    assert [rotation.replica_of(g, 0) for g in range(4)] == [0, 1, 0, 1]
    assert [tuple(op) for op in rotation_schedule(2, rotation, 0)] == [
        ("begin", None, 0), ("start", 0, 0),   # k = 0
        ("begin", None, 2), ("start", 0, 2),   # k = 2
        ("finish", 0, 1), ("start", 1, 1),     # k = 4
        ("finish", 1, 0), ("end", None, 0),    # k = 6
        ("finish", 1, 2), ("end", None, 2),    # k = 8
    ]


@pytest.mark.parametrize("bad", [dict(replicas=0, microbatches=2), dict(replicas=2, microbatches=0)])
def test_bad_rotations_are_rejected(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Rotation(**bad)


def test_bad_replica_or_steps_are_rejected() -> None:
    with pytest.raises(ValueError):
        list(rotation_schedule(2, Rotation(2, 3), replica=2))
    with pytest.raises(ValueError):
        list(rotation_schedule(2, Rotation(2, 3), replica=0, steps=0))


# --------------------------------------------------------------------------
# Replicas in threads, residuals through queues, attention in a thread


class ReplicaCluster:
    """R replica threads and one attention thread, joined by queues.

    Attention requests go into one FIFO (arrival order); the reply and the
    residual of a micro-batch go to the successor of the replica that sent
    it. Every blocking get has a timeout, so a deadlock fails the test.
    """

    def __init__(self, num_layers: int, rotation: Rotation, steps: int,
                 timeout_s: float = DEADLOCK_TIMEOUT_S) -> None:
        self.num_layers, self.rotation, self.steps = num_layers, rotation, steps
        self.timeout_s = timeout_s
        # Each replica owns a model copy: same weights, its own (stale unless handed over) state.
        self.models = [NumpyModel(num_layers, rotation.microbatches) for _ in range(rotation.replicas)]
        self.finals: list[list[np.ndarray]] = [[] for _ in range(rotation.microbatches)]
        self.requests: queue.Queue[tuple[int, int, int, Any]] = queue.Queue()
        self.replies = [queue.Queue() for _ in range(rotation.replicas)]
        self.residuals = [queue.Queue() for _ in range(rotation.replicas)]
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.served = 0

    def stage(self, replica: int) -> Any:
        model, successor = self.models[replica], self.rotation.successor(replica)
        cluster = self

        class Stage:
            def begin(self, mb: int) -> None:
                model.begin(mb)

            def pre(self, layer: int, mb: int) -> Any:
                return model.pre(layer, mb)

            def send(self, layer: int, mb: int, payload: Any) -> None:
                cluster.residuals[successor].put((layer, mb, model.state[mb].copy()))
                model.state[mb] = None  # this replica must not use it again before it comes back
                cluster.requests.put((replica, layer, mb, payload))

            def recv(self, layer: int, mb: int) -> Any:
                got = cluster.residuals[replica].get(timeout=cluster.timeout_s)
                assert got[:2] == (layer, mb), f"replica {replica} expected residual {(layer, mb)}, got {got[:2]}"
                model.state[mb] = got[2]
                reply = cluster.replies[replica].get(timeout=cluster.timeout_s)
                assert reply[:2] == (layer, mb), f"replica {replica} expected reply {(layer, mb)}, got {reply[:2]}"
                return reply[2]

            def post(self, layer: int, mb: int, result: Any) -> None:
                model.post(layer, mb, result)

            def end(self, mb: int) -> None:
                model.end(mb)
                cluster.finals[mb].append(model.final[mb])

        return Stage()

    def _attention(self) -> None:
        attention = self.models[0]  # attention() uses only the shared weights

        def recv_any() -> tuple[int, int, Any] | None:
            try:
                replica, layer, mb, q = self.requests.get(timeout=0.01)
            except queue.Empty:
                return None
            return layer, mb, (replica, q)

        def compute(layer: int, mb: int, request: tuple[int, Any]) -> tuple[int, Any]:
            return request[0], attention.attention(layer, mb, request[1])

        def send(layer: int, mb: int, result: tuple[int, Any]) -> None:
            self.replies[self.rotation.successor(result[0])].put((layer, mb, result[1]))

        self.served = serve_attention(recv_any, compute, send, self.stop.is_set)

    def _replica(self, replica: int) -> None:
        try:
            run_replica(self.num_layers, self.rotation, replica, self.stage(replica), self.steps)
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self.errors.append(exc)

    def run(self) -> None:
        run_threaded(self, DEADLOCK_TIMEOUT_S)


def run_threaded(cluster: Any, timeout_s: float) -> None:
    """Run a harness's ``_attention`` thread and one ``_replica(r)`` thread per replica; a replica that
    has not finished within 3 x ``timeout_s`` is a deadlock; the first error a replica hit is raised."""
    attention = threading.Thread(target=cluster._attention, daemon=True)
    replicas = [threading.Thread(target=cluster._replica, args=(r,), daemon=True)
                for r in range(cluster.rotation.replicas)]
    attention.start()
    for t in replicas:
        t.start()
    for t in replicas:
        t.join(timeout_s * 3)
    cluster.stop.set()
    attention.join(timeout_s)
    assert not any(t.is_alive() for t in replicas), "a replica never finished: deadlock"
    assert not attention.is_alive()
    if cluster.errors:
        raise cluster.errors[0]


def sequential_finals(num_layers: int, microbatches: int, steps: int) -> list[list[np.ndarray]]:
    model = NumpyModel(num_layers, microbatches)
    finals: list[list[np.ndarray]] = [[] for _ in range(microbatches)]
    for _ in range(steps):
        run_sequential(num_layers, microbatches, direct_stage(model))
        for mb in range(microbatches):
            finals[mb].append(model.final[mb])
    return finals


@pytest.mark.parametrize(("replicas", "microbatches"), CONFIGS)
def test_rotation_matches_sequential_bit_for_bit_over_several_steps(replicas: int, microbatches: int) -> None:
    num_layers, steps = 3, 3
    cluster = ReplicaCluster(num_layers, Rotation(replicas, microbatches), steps)
    cluster.run()
    assert cluster.served == num_layers * microbatches * steps
    expected = sequential_finals(num_layers, microbatches, steps)
    for mb in range(microbatches):
        assert [a.tobytes() for a in cluster.finals[mb]] == [b.tobytes() for b in expected[mb]], f"mb {mb}"


def test_a_replica_running_another_replicas_share_is_caught() -> None:
    # Guards the harness against being vacuous: replica 1 running replica 0's
    # ops waits for a residual that is never sent to it, and times out.
    cluster = ReplicaCluster(2, Rotation(2, 3), 1, timeout_s=0.05)
    with pytest.raises(queue.Empty):
        execute(rotation_schedule(2, cluster.rotation, replica=0), cluster.stage(1))
