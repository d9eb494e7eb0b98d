"""One step of the model node: its micro-batches (``plan_microbatches``) and the pipeline stage running them.

``PipelinedStep`` is the ``pipeline.PipelineStage`` that ``pipeline.run_step``
drives: the model tier computes here, the attention runs on the peers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from lamina_comm.channel import Message
from lamina_comm.model import HeadOutputs, ModelTier, StepInputs, slice_heads
from lamina_comm.node import protocol
from lamina_comm.node.cluster import AttentionPeer
from lamina_comm.node.metrics import NodeMetrics
from lamina_comm.node.requests import RequestState


@dataclass(frozen=True)
class StepEntry:
    """One request's share of a step: ``tokens`` at positions ``start`` ..."""

    request: RequestState
    tokens: list[int]
    start: int
    completes: bool  # feeds the request's last pending token: its logits are sampled

    def as_batch_entry(self) -> tuple[int, list[int], int]:
        return self.request.id, self.tokens, self.start


def plan_microbatches(requests: Sequence[RequestState], num_microbatches: int,
                      token_budget: int) -> list[list[StepEntry]]:
    """Split the running requests into at most ``num_microbatches`` balanced micro-batches.

    Requests are taken in admission order, each into the micro-batch with the
    fewest tokens; a request gets all its pending tokens (a whole prompt, or
    one decode token) as far as the budget allows, the rest in later steps.
    """
    count = min(num_microbatches, len(requests))
    bins: list[list[StepEntry]] = [[] for _ in range(count)]
    loads = [0] * count
    for request in requests:
        target = min(range(count), key=lambda i: loads[i])
        room = token_budget - loads[target]
        if room <= 0:
            break
        tokens = request.pending[:room]
        bins[target].append(StepEntry(request, tokens, request.cached, len(tokens) == len(request.pending)))
        loads[target] += len(tokens)
    return [entries for entries in bins if entries]


# ============================================================== one pipelined step


class PipelinedStep:
    """The ``pipeline.PipelineStage`` of one step: model tier here, attention on the peers."""

    def __init__(self, tier: ModelTier, peers: Sequence[AttentionPeer], plan: list[list[StepEntry]],
                 metrics: NodeMetrics):
        self.tier = tier
        self.peers = list(peers)
        self.metrics = metrics
        self.group_size = tier.config.group_size
        self.inputs = [StepInputs.from_batch([entry.as_batch_entry() for entry in entries],
                                             tier.config.vocab_size, tier.device) for entries in plan]
        self.hidden: list[Optional[torch.Tensor]] = [None] * len(plan)
        self.logits: list[Optional[torch.Tensor]] = [None] * len(plan)
        self._sent_ns: dict[tuple[int, int], int] = {}
        # Slots are host memory: a CPU tier computes into them.
        self._zero_copy = tier.device.type == "cpu"
        # A CUDA tier's q/k/v (each worker's heads: strided rows) go stream-ordered: the copy engine
        # moves them into the slots on the compute stream and native code posts the writes once the
        # copies are done, so the host goes on to the other micro-batch without waiting for the device.
        self._stream = torch.cuda.current_stream(tier.device) if tier.device.type == "cuda" else None

    def begin(self, mb: int) -> None:
        self.hidden[mb] = self.tier.embed(self.inputs[mb].token_ids)

    def pre(self, layer: int, mb: int) -> list[list[torch.Tensor]]:
        """Each worker's message: q, k, v (and on layer 0 the step metadata).

        Computed straight into the workers' send slots where the slots live
        where the tier computes (host memory for a CPU tier): nothing is
        staged. A CUDA tier's tensors are copied into the slots by the copy
        engine, ordered on its stream (``send``).
        """
        inputs = self.inputs[mb]
        hidden = self.hidden[mb]
        num_tokens = hidden.shape[0]
        if not self._zero_copy:
            qkv = self.tier.pre_attention(layer, hidden, inputs.positions)
            meta = [protocol.encode_step_meta(inputs.request_ids, inputs.positions)] if layer == 0 else []
            return [[*slice_heads(*qkv, peer.kv_heads, self.group_size), *meta] for peer in self.peers]
        messages = [peer.send_buffers(mb, self._shapes(peer, num_tokens, with_meta=layer == 0))
                    for peer in self.peers]
        self.tier.pre_attention_into(layer, hidden, inputs.positions,
                                     [HeadOutputs(peer.kv_heads, *views[:3])
                                      for peer, views in zip(self.peers, messages)])
        if layer == 0:
            # The batch description rides with layer 0; workers keep it for the other layers.
            for views in messages:
                protocol.encode_step_meta(inputs.request_ids, inputs.positions, out=views[3])
        return messages

    def _shapes(self, peer: AttentionPeer, num_tokens: int, with_meta: bool) -> list[tuple[tuple[int, ...], Any]]:
        head_dim, dtype = self.tier.config.head_dim, self.tier.config.dtype
        local_kv = peer.kv_heads[1] - peer.kv_heads[0]
        shapes = [((num_tokens, local_kv * self.group_size, head_dim), dtype),
                  ((num_tokens, local_kv, head_dim), dtype), ((num_tokens, local_kv, head_dim), dtype)]
        if with_meta:
            shapes.append((protocol.step_meta_shape(num_tokens), "int64"))
        return shapes

    def send(self, layer: int, mb: int, messages: list[list[torch.Tensor]]) -> None:
        for peer, tensors in zip(self.peers, messages):
            self._sent_ns[(peer.index, mb)] = time.perf_counter_ns()
            peer.send(tensors, layer, mb, stream=self._stream)

    def recv(self, layer: int, mb: int) -> torch.Tensor:
        messages: list[Message] = []
        try:
            for peer in self.peers:
                message = peer.recv(layer, mb)
                messages.append(message)
                self._observe_transfer(peer, layer, mb, int(message.tensors[1][0]), message.arrived_ns)
            parts = [message.torch()[0] for message in messages]
            # Concatenating copies out of the slots, so they can be released.
            out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()
        finally:
            for message in messages:
                message.release()
        return out.to(self.tier.device)

    def post(self, layer: int, mb: int, out: torch.Tensor) -> None:
        self.hidden[mb] = self.tier.post_attention(layer, self.hidden[mb], out)

    def end(self, mb: int) -> None:
        hidden = self.hidden[mb]
        self.logits[mb] = self.tier.logits(hidden.index_select(0, self.inputs[mb].last_token_index))
        self.hidden[mb] = None

    def _observe_transfer(self, peer: AttentionPeer, layer: int, mb: int, attention_ns: int,
                          arrived_ns: int) -> None:
        # The wire round trip ends when the reply arrived (the native channel stamps
        # it, CLOCK_MONOTONIC like perf_counter_ns), not when this thread got to it:
        # with two micro-batches the reply often waits for the other's compute.
        collected_ns = time.perf_counter_ns()
        arrived_ns = min(arrived_ns or collected_ns, collected_ns)
        round_trip = max(0, arrived_ns - self._sent_ns[(peer.index, mb)]) / 1e9
        self.metrics.layer_round_trip.observe(round_trip, peer=peer.address, layer=layer)
        self.metrics.layer_transfer.observe(max(0.0, round_trip - attention_ns / 1e9), peer=peer.address,
                                            layer=layer)
        self.metrics.layer_collect_wait.observe((collected_ns - arrived_ns) / 1e9, peer=peer.address,
                                                layer=layer)
        self.metrics.attention_compute.observe(attention_ns / 1e9, peer=peer.address)
