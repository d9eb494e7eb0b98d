"""One step of the model node: its micro-batches (``plan_microbatches``) and the pipeline stage running them.

``PipelinedStep`` is the ``pipeline.PipelineStage`` that ``pipeline.run_step``
drives: the model tier computes here, the attention runs on the peers, reached
through the public engine API (``RemoteAttention``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from lamina_comm.engine import AttentionRankError, LayerBuffers, RemoteAttention
from lamina_comm.errors import InvalidArgumentError, LaminaError, UnsupportedError
from lamina_comm.gpu.cuda import CudaError
from lamina_comm.model import HeadOutputs, ModelTier, StepInputs
from lamina_comm.node.cluster import AttentionPeer, AttentionStepError, WorkerLost
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

_Result = TypeVar("_Result")


class PipelinedStep:
    """The ``pipeline.PipelineStage`` of one step: model tier here, attention on the peers.

    ``remote`` is the engine API over ``peers``' data channels (rank i is
    ``peers[i]``). Its errors become the node's: a rank's error reply an
    ``AttentionStepError`` (the step fails, the worker stays), any other
    failure that names a rank a ``WorkerLost`` (the worker is replaced).
    """

    def __init__(self, tier: ModelTier, remote: RemoteAttention, peers: Sequence[AttentionPeer],
                 plan: list[list[StepEntry]], metrics: NodeMetrics):
        self.tier = tier
        self.remote = remote
        self.peers = list(peers)
        self.metrics = metrics
        self.inputs = [StepInputs.from_batch([entry.as_batch_entry() for entry in entries],
                                             tier.config.vocab_size, tier.device) for entries in plan]
        self.hidden: list[Optional[torch.Tensor]] = [None] * len(plan)
        self.logits: list[Optional[torch.Tensor]] = [None] * len(plan)
        # Each micro-batch's attention output [T, H, D], filled by recv_into layer after layer.
        self._out: list[Optional[torch.Tensor]] = [None] * len(plan)
        self._sent_ns = [0] * len(plan)
        # Slots are host memory: a CPU tier computes into them.
        self._zero_copy = tier.device.type == "cpu"
        # A CUDA tier's q/k/v (each worker's heads: strided rows) go stream-ordered: the copy engine
        # moves them into the slots on the compute stream and native code posts the writes once the
        # copies are done, so the host goes on to the other micro-batch without waiting for the device;
        # the outputs come back into device memory the same way.
        self._stream = torch.cuda.current_stream(tier.device) if tier.device.type == "cuda" else None

    def begin(self, mb: int) -> None:
        self.hidden[mb] = self.tier.embed(self.inputs[mb].token_ids)
        inputs = self.inputs[mb]
        # The batch description goes ahead of layer 0, on the control micro-batch; the workers keep it
        # for every layer of this micro-batch.
        self._outgoing(lambda: self.remote.send_metadata(mb, inputs.request_ids, inputs.positions.cpu()))

    def pre(self, layer: int, mb: int) -> Any:
        """The layer's q, k, v: in the workers' send slots where the slots live where the tier computes
        (host memory for a CPU tier: nothing is staged), else full-head tensors that ``send`` moves."""
        inputs = self.inputs[mb]
        hidden = self.hidden[mb]
        if not self._zero_copy:
            return self.tier.pre_attention(layer, hidden, inputs.positions)
        buffers = self._outgoing(lambda: self.remote.buffers(mb, hidden.shape[0]))
        self.tier.pre_attention_into(layer, hidden, inputs.positions,
                                     [HeadOutputs(peer.kv_heads, q, k, v)
                                      for peer, q, k, v in zip(self.peers, buffers.q, buffers.k, buffers.v)])
        return buffers

    def send(self, layer: int, mb: int, message: Any) -> None:
        self._sent_ns[mb] = time.perf_counter_ns()
        if isinstance(message, LayerBuffers):
            self._outgoing(lambda: self.remote.send(message, layer=layer, microbatch=mb))
        else:
            self._outgoing(lambda: self.remote.send(*message, layer=layer, microbatch=mb, stream=self._stream))

    def recv(self, layer: int, mb: int) -> torch.Tensor:
        out = self._out[mb]
        if out is None:
            config = self.tier.config
            out = self._out[mb] = torch.empty((self.hidden[mb].shape[0], config.num_heads, config.head_dim),
                                              dtype=config.torch_dtype, device=self.tier.device)
        self._incoming(lambda: self.remote.recv_into(out, layer=layer, microbatch=mb, stream=self._stream))
        for peer, reply in zip(self.peers, self.remote.replies):
            self._observe_transfer(peer, layer, mb, reply.compute_ns or 0, reply.arrived_ns)
        return out

    def post(self, layer: int, mb: int, out: torch.Tensor) -> None:
        self.hidden[mb] = self.tier.post_attention(layer, self.hidden[mb], out)

    def end(self, mb: int) -> None:
        hidden = self.hidden[mb]
        self.logits[mb] = self.tier.logits(hidden.index_select(0, self.inputs[mb].last_token_index))
        self.hidden[mb] = None

    # -- the engine's errors, as the node's -------------------------------------------
    def _outgoing(self, call: Callable[[], _Result]) -> _Result:
        try:
            return call()
        except (InvalidArgumentError, UnsupportedError, CudaError):
            raise  # ours (e.g. the device path here), not the worker's: the step fails, the worker stays
        except LaminaError as exc:
            raise self._worker_lost(exc) from exc

    def _incoming(self, call: Callable[[], _Result]) -> _Result:
        try:
            return call()
        except AttentionRankError as exc:
            peer = self.peers[exc.rank]
            raise AttentionStepError(f"attention worker {peer.index} at {peer.address}: {exc.reason}") from exc
        except CudaError:
            raise
        except LaminaError as exc:
            raise self._worker_lost(exc) from exc

    def _worker_lost(self, exc: LaminaError) -> BaseException:
        """The loss of the worker ``exc`` names; ``exc`` itself when it names none."""
        rank = getattr(exc, "channel_index", None)
        if rank is None:
            return exc
        peer = self.peers[rank]
        return WorkerLost(peer.index, peer.address, exc)

    def _observe_transfer(self, peer: AttentionPeer, layer: int, mb: int, attention_ns: int,
                          arrived_ns: int) -> None:
        # The wire round trip ends when the reply arrived (the native channel stamps
        # it, CLOCK_MONOTONIC like perf_counter_ns), not when this thread got to it:
        # with two micro-batches the reply often waits for the other's compute.
        collected_ns = time.perf_counter_ns()
        arrived_ns = min(arrived_ns or collected_ns, collected_ns)
        round_trip = max(0, arrived_ns - self._sent_ns[mb]) / 1e9
        self.metrics.layer_round_trip.observe(round_trip, peer=peer.address, layer=layer)
        self.metrics.layer_transfer.observe(max(0.0, round_trip - attention_ns / 1e9), peer=peer.address,
                                            layer=layer)
        self.metrics.layer_collect_wait.observe((collected_ns - arrived_ns) / 1e9, peer=peer.address,
                                                layer=layer)
        self.metrics.attention_compute.observe(attention_ns / 1e9, peer=peer.address)
