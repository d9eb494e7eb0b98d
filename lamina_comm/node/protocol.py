"""What the model node and an attention node say to each other.

Two activation channels (``lamina_comm.channel``) join a model node to each
attention node, both accepted on the attention node's one listening address:

* the **control channel** (fixed :data:`CONTROL_SPEC`, one micro-batch) carries
  JSON request/response pairs: ``setup`` (config fingerprint, head share,
  data-channel spec), ``reserve`` / ``rebuild`` / ``free`` (KV reservations of
  new, rebuilt and finished requests) and ``status``;
* the **data channel** (spec from :func:`data_channel_spec`, agreed at setup)
  carries per layer and micro-batch ``[q, k, v]`` to the attention node and
  ``[out, attention_ns]`` back. The layer-0 message of a micro-batch also
  carries the step metadata (request ids and positions of its tokens,
  :func:`encode_step_meta`), so the batch description travels in order with
  the activations and needs no extra round trip.

A request is reserved (control) before its first step and freed (control)
after its last step completed, so ordering between the two channels follows
from causality. See docs/node.md for the full protocol.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lamina_comm.channel import Channel, ChannelSpec, Message
from lamina_comm.errors import LaminaError, ProtocolError
from lamina_comm.node.kvcache import HeadRange
from lamina_comm.node.model import LlamaConfig

PROTOCOL_VERSION = 1

# Control messages are JSON in one uint8 tensor; 256 KiB holds reservations of
# several thousand requests in one message.
CONTROL_MAX_BYTES = 256 * 1024
CONTROL_SPEC = ChannelSpec(
    max_tokens=1, hidden=1, heads=1, kv_heads=1, head_dim=1, dtype="uint8",
    microbatches=1, slots_per_microbatch=2, extra_bytes=CONTROL_MAX_BYTES,
)

# A data-channel reply with this layer number carries an error text instead of
# an attention output (the worker could not serve the message).
ERROR_LAYER = 0xFFFF_FFFF
# Step metadata rows: request id and position of every token (int64 [2, T]).
_META_ROWS = 2
_META_BYTES_PER_TOKEN = _META_ROWS * 8
_TIMING_BYTES = 64


class ControlError(LaminaError):
    """The peer answered a control request with an error.

    ``code`` says which kind: ``config_mismatch``, ``bad_request``, ``state``.
    """

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------
# Channel specs


def data_channel_spec(
    config: LlamaConfig, kv_heads: HeadRange, microbatches: int, max_tokens: int
) -> ChannelSpec:
    """Spec of the data channel to the worker owning ``kv_heads``.

    ``max_tokens`` is the token budget of one micro-batch; slots are sized for
    that many tokens of q/k/v plus the step metadata.
    """
    local_kv = kv_heads[1] - kv_heads[0]
    local_q = local_kv * config.group_size
    return ChannelSpec(
        max_tokens=max_tokens,
        hidden=local_q * config.head_dim,
        heads=local_q,
        kv_heads=local_kv,
        head_dim=config.head_dim,
        dtype=config.dtype,
        microbatches=microbatches,
        slots_per_microbatch=2,
        extra_bytes=_META_BYTES_PER_TOKEN * max_tokens + _TIMING_BYTES,
    )


# --------------------------------------------------------------------------
# Config exchange


def config_to_wire(config: LlamaConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_wire(fields: Mapping[str, Any], declared_fingerprint: str) -> LlamaConfig:
    """Rebuild the sender's config; refuse it if it does not hash to what the sender declared."""
    try:
        config = LlamaConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ControlError(f"setup carries an invalid model config: {exc}", "bad_request") from exc
    if config.fingerprint() != declared_fingerprint:
        raise ControlError(
            f"model config fingerprint {config.fingerprint()} does not match the declared "
            f"{declared_fingerprint} (incompatible lamina-comm versions?)", "config_mismatch")
    return config


def check_same_config(ours: LlamaConfig, theirs: LlamaConfig, our_role: str = "attention node") -> None:
    """Raise ControlError naming every differing field when the two configs differ."""
    if ours.fingerprint() == theirs.fingerprint():
        return
    mine, other = config_to_wire(ours), config_to_wire(theirs)
    differences = ", ".join(
        f"{key}: model node {other.get(key)!r} vs {our_role} {mine.get(key)!r}"
        for key in sorted(set(mine) | set(other)) if mine.get(key) != other.get(key)
    )
    raise ControlError(
        f"model config mismatch: model node runs {theirs.fingerprint()}, {our_role} was started with "
        f"{ours.fingerprint()} ({differences})", "config_mismatch")


def setup_message(
    config: LlamaConfig, worker: int, num_workers: int, kv_heads: HeadRange, spec: ChannelSpec
) -> dict[str, Any]:
    return {
        "type": "setup",
        "protocol": PROTOCOL_VERSION,
        "config": config_to_wire(config),
        "fingerprint": config.fingerprint(),
        "worker": worker,
        "num_workers": num_workers,
        "kv_heads": list(kv_heads),
        "data_spec": spec.to_dict(),
    }


@dataclasses.dataclass(frozen=True)
class Setup:
    """A parsed and checked ``setup`` request."""

    config: LlamaConfig
    worker: int
    num_workers: int
    kv_heads: HeadRange
    data_spec: ChannelSpec

    @classmethod
    def parse(cls, message: Mapping[str, Any]) -> "Setup":
        if message.get("protocol") != PROTOCOL_VERSION:
            raise ControlError(
                f"node protocol version {message.get('protocol')} is not supported (this node speaks "
                f"{PROTOCOL_VERSION})", "bad_request")
        try:
            config = config_from_wire(message["config"], message["fingerprint"])
            kv_heads = (int(message["kv_heads"][0]), int(message["kv_heads"][1]))
            spec = ChannelSpec(**message["data_spec"])
            worker, num_workers = int(message["worker"]), int(message["num_workers"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ControlError(f"malformed setup message: {exc!r}", "bad_request") from exc
        if config.num_kv_heads % num_workers != 0:
            raise ControlError(
                f"{num_workers} attention workers cannot split {config.num_kv_heads} KV heads evenly; "
                f"use a worker count that divides {config.num_kv_heads}", "bad_request")
        if not 0 <= kv_heads[0] < kv_heads[1] <= config.num_kv_heads:
            raise ControlError(f"KV head range {kv_heads} is outside [0, {config.num_kv_heads})", "bad_request")
        expected = data_channel_spec(config, kv_heads, spec.microbatches, spec.max_tokens)
        if spec != expected:
            raise ControlError(f"data channel spec {spec} does not fit KV heads {kv_heads}", "bad_request")
        return cls(config, worker, num_workers, kv_heads, spec)


# --------------------------------------------------------------------------
# Control framing: JSON request/response over the control channel


def _encode_json(message: Mapping[str, Any]) -> np.ndarray:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > CONTROL_MAX_BYTES:
        raise ProtocolError(f"control message of {len(data)} B exceeds {CONTROL_MAX_BYTES} B")
    return np.frombuffer(data, dtype=np.uint8)


def _decode_json(payload: np.ndarray) -> dict[str, Any]:
    try:
        message = json.loads(np.asarray(payload).tobytes())
    except ValueError as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("control message is not a JSON object")
    return message


class ControlLink:
    """Strict request/response over a control channel (one outstanding request).

    The request number travels in the message's layer field; a reply must
    carry the number of its request.
    """

    def __init__(self, channel: Channel, timeout: float):
        self.channel = channel
        self.timeout = timeout
        self._next_call = 0

    def call(self, message: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send a request, return the reply; raise ControlError when the peer reports one."""
        number = self._next_call
        self._next_call = (self._next_call + 1) % ERROR_LAYER
        self.channel.send([_encode_json(message)], layer=number, microbatch=0)
        with self.channel.recv(microbatch=0, timeout=self.timeout if timeout is None else timeout) as reply:
            if reply.layer != number:
                raise ProtocolError(f"control reply to request {reply.layer}, expected {number}")
            answer = _decode_json(reply.tensors[0])
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error", "unknown error")), str(answer.get("code", "error")))
        return answer

    def receive(self, timeout: float) -> tuple[int, dict[str, Any]]:
        """The next request and its number (attention side); raises TimeoutError_ when none came."""
        with self.channel.recv(microbatch=0, timeout=timeout) as request:
            return request.layer, _decode_json(request.tensors[0])

    def reply(self, number: int, answer: Mapping[str, Any]) -> None:
        self.channel.send([_encode_json(answer)], layer=number, microbatch=0)


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(message: str, code: str = "error") -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


# --------------------------------------------------------------------------
# Reservations


def reservation_list(requests: Sequence[tuple[int, int]]) -> list[list[int]]:
    """``[(request_id, max_tokens)]`` as it travels in reserve/rebuild messages."""
    return [[int(request_id), int(max_tokens)] for request_id, max_tokens in requests]


def parse_reservations(message: Mapping[str, Any]) -> list[tuple[int, int]]:
    try:
        return [(int(request_id), int(max_tokens)) for request_id, max_tokens in message["requests"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ControlError(f"malformed request list: {exc!r}", "bad_request") from exc


def parse_request_ids(message: Mapping[str, Any]) -> list[int]:
    try:
        return [int(request_id) for request_id in message["requests"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ControlError(f"malformed request list: {exc!r}", "bad_request") from exc


# --------------------------------------------------------------------------
# Data channel payloads


def encode_step_meta(request_ids: Sequence[int], positions: torch.Tensor) -> torch.Tensor:
    """int64 [2, T]: the owner request and position of every token of a micro-batch."""
    meta = torch.empty((_META_ROWS, len(request_ids)), dtype=torch.int64)
    meta[0] = torch.as_tensor(list(request_ids), dtype=torch.int64)
    meta[1] = positions.to(device="cpu", dtype=torch.int64)
    return meta


def decode_step_meta(meta: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(request ids, positions) of a micro-batch; copies out of the slot memory."""
    if meta.dim() != 2 or meta.shape[0] != _META_ROWS or meta.dtype != torch.int64:
        raise ProtocolError(f"step metadata must be int64 [2, T], got {meta.dtype} {tuple(meta.shape)}")
    return meta[0].tolist(), meta[1].clone()


# Error texts are cut to fit the smallest reply slot.
_MAX_ERROR_BYTES = 512


def encode_error(message: str) -> np.ndarray:
    return np.frombuffer(message.encode()[:_MAX_ERROR_BYTES], dtype=np.uint8)


def decode_error(message: Message) -> str:
    return np.asarray(message.tensors[0]).tobytes().decode(errors="replace")
