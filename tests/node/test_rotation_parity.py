"""The rotational schedule on the real model: 2 replicas, 3 micro-batches, greedy decode.

Each replica thread has its own ModelTier (same weights); a micro-batch's
state (residual stream, batch and generated tokens) travels to the next
replica after every layer, as ``rotation_schedule`` hands it round the ring;
one attention thread serves every request in arrival order from a head-split
KV cache (two PagedKVCache shares, like two workers) and answers the
successor replica. The logits of every micro-batch of every step must be
bit-equal to the monolithic model's, and the tokens those of each request
generated alone.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch

from lamina_comm.model import ModelTier, PagedKVCache, StepInputs, split_kv_heads
from lamina_comm.pipeline import Rotation, run_replica, serve_attention
from tests.node.test_disaggregated import (CONFIG, Record, greedy, prompt_of, reference_tokens, replay_on_monolithic,
                                           tiny_weights)
from tests.test_rotation import run_threaded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT_S = 30.0  # a deadlock fails the test instead of hanging it


@dataclass
class MicroBatch:
    """What travels with a micro-batch from replica to replica."""

    prompts: dict[int, list[int]]
    max_tokens: int
    generated: dict[int, list[int]] = field(default_factory=dict)
    inputs: Optional[StepInputs] = None
    entries: list[tuple[int, list[int], int]] = field(default_factory=list)
    hidden: Optional[torch.Tensor] = None
    step: int = 0

    def next_entries(self) -> list[tuple[int, list[int], int]]:
        if not self.generated:
            return [(rid, prompt, 0) for rid, prompt in self.prompts.items()]
        return [(rid, [tokens[-1]], len(self.prompts[rid]) + len(tokens) - 1)
                for rid, tokens in self.generated.items() if len(tokens) < self.max_tokens]


class RotatingCluster:
    def __init__(self, rotation: Rotation, microbatches: list[MicroBatch], steps: int):
        self.rotation, self.steps = rotation, steps
        weights = tiny_weights()
        self.tiers = [ModelTier(CONFIG, weights) for _ in range(rotation.replicas)]
        self.caches = [PagedKVCache(CONFIG, start, end, 64, 16) for start, end in split_kv_heads(CONFIG.num_kv_heads, 2)]
        for mb in microbatches:
            for rid, prompt in mb.prompts.items():
                for cache in self.caches:
                    cache.reserve(rid, len(prompt) + mb.max_tokens - 1)
        # Micro-batch mb starts on the replica that runs its first unit.
        self.held: list[dict[int, MicroBatch]] = [{} for _ in range(rotation.replicas)]
        for index, mb in enumerate(microbatches):
            self.held[rotation.replica_of(0, index)][index] = mb
        self.requests: queue.Queue = queue.Queue()
        self.replies = [queue.Queue() for _ in range(rotation.replicas)]
        self.handed = [queue.Queue() for _ in range(rotation.replicas)]
        self.records: list[Record] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def stage(self, replica: int) -> Any:
        cluster, tier, held = self, self.tiers[replica], self.held[replica]
        successor = self.rotation.successor(replica)

        class Stage:
            def begin(self, mb: int) -> None:
                state = held[mb]
                state.entries = state.next_entries()
                state.inputs = StepInputs.from_batch(state.entries, CONFIG.vocab_size)
                state.hidden = tier.embed(state.inputs.token_ids)

            def pre(self, layer: int, mb: int) -> Any:
                state = held[mb]
                return tier.pre_attention(layer, state.hidden, state.inputs.positions), state.inputs

            def send(self, layer: int, mb: int, payload: Any) -> None:
                cluster.handed[successor].put((layer, mb, held.pop(mb)))  # the residual moves on
                cluster.requests.put((replica, layer, mb, payload))

            def recv(self, layer: int, mb: int) -> Any:
                got_layer, got_mb, state = cluster.handed[replica].get(timeout=TIMEOUT_S)
                assert (got_layer, got_mb) == (layer, mb), f"replica {replica}: state of {(got_layer, got_mb)}"
                held[mb] = state
                got_layer, got_mb, out = cluster.replies[replica].get(timeout=TIMEOUT_S)
                assert (got_layer, got_mb) == (layer, mb), f"replica {replica}: reply of {(got_layer, got_mb)}"
                return out

            def post(self, layer: int, mb: int, out: torch.Tensor) -> None:
                state = held[mb]
                state.hidden = tier.post_attention(layer, state.hidden, out)

            def end(self, mb: int) -> None:
                state = held[mb]
                logits = tier.logits(state.hidden.index_select(0, state.inputs.last_token_index))
                cluster.records.append((state.step, mb, state.entries, logits.clone()))
                for (rid, _, _), token in zip(state.entries, logits.argmax(-1).tolist()):
                    state.generated.setdefault(rid, []).append(int(token))
                state.step += 1

        return Stage()

    def _attention(self) -> None:
        group = CONFIG.group_size

        def recv_any() -> Optional[tuple[int, int, Any]]:
            try:
                replica, layer, mb, payload = self.requests.get(timeout=0.01)
            except queue.Empty:
                return None
            return layer, mb, (replica, payload)

        def compute(layer: int, mb: int, request: Any) -> Any:
            replica, ((q, k, v), inputs) = request
            parts = [cache.attend(layer, inputs.request_ids, inputs.positions, q[:, s * group:e * group], k[:, s:e],
                                  v[:, s:e]) for cache, (s, e) in zip(self.caches, (c.kv_heads for c in self.caches))]
            return replica, torch.cat(parts, dim=1)

        def send(layer: int, mb: int, result: Any) -> None:
            self.replies[self.rotation.successor(result[0])].put((layer, mb, result[1]))

        serve_attention(recv_any, compute, send, self.stop.is_set)

    def _replica(self, replica: int) -> None:
        try:
            with torch.inference_mode():
                run_replica(CONFIG.num_layers, self.rotation, replica, self.stage(replica), self.steps)
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self.errors.append(exc)

    def run(self) -> None:
        run_threaded(self, TIMEOUT_S)


@pytest.mark.parametrize(("replicas", "microbatches"), [(2, 3), (2, 2), (1, 2)])
def test_rotating_replicas_decode_exactly_like_the_monolithic_model(replicas: int, microbatches: int) -> None:
    steps = 6
    prompts = {rid: prompt_of(3 + 5 * rid, rid) for rid in range(2 * microbatches)}
    batches = [MicroBatch({rid: prompts[rid] for rid in (2 * mb, 2 * mb + 1)}, steps) for mb in range(microbatches)]
    cluster = RotatingCluster(Rotation(replicas, microbatches), batches, steps)
    cluster.run()

    if replicas > 1 and microbatches % replicas:
        # The rotation really moved micro-batches: each one's first two layers ran on different replicas.
        rotation = Rotation(replicas, microbatches)
        assert rotation.rotates and rotation.replica_of(0, 0) != rotation.replica_of(1, 0)
    expected = reference_tokens(list(prompts.values()), [greedy(steps)] * len(prompts))
    got = {rid: tokens for mb in batches for rid, tokens in mb.generated.items()}
    assert [got[rid] for rid in prompts] == expected
    records = sorted(cluster.records, key=lambda record: (record[0], record[1]))
    assert len(records) == steps * microbatches
    replay_on_monolithic(records, {rid: len(p) + steps - 1 for rid, p in prompts.items()})
