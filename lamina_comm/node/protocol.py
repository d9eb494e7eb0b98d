"""What the model node and an attention node say to each other.

A model node reaches an attention node on its one listening address twice:

* a short-lived **setup channel** (fixed :data:`CONTROL_SPEC`) carries one
  JSON request/response, ``setup`` (config and its fingerprint, the worker's
  head share, the data-channel spec); it is closed right after;
* the **data channel** (spec from :func:`data_channel_spec`) then carries
  everything else. Micro-batches ``0 .. n-1`` carry, per layer, ``[q, k, v]``
  to the worker and ``[out, attention_ns]`` back; the layer-0 message of a
  micro-batch also carries the step metadata (request ids and positions of its
  tokens, :func:`encode_step_meta`). The extra micro-batch index ``n``
  (:func:`control_microbatch`) carries JSON control requests and their
  replies: ``reserve`` / ``rebuild`` / ``free`` (KV reservations of new,
  rebuilt and finished requests) and ``status``.

One channel means one arrival order: the worker serves control and attention
messages strictly in the order they were sent, from one thread. See
docs/node.md for the full protocol.
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

# Control messages are JSON in one uint8 tensor; every slot has room for one
# (64 KiB: reservations of about 2000 requests; longer lists are split).
CONTROL_MAX_BYTES = 64 * 1024
CONTROL_BATCH = 1000  # request ids per reserve/free message
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

    ``microbatches`` pipeline micro-batches plus one for control; ``max_tokens``
    is the token budget of one micro-batch. Slots hold that many tokens of
    q/k/v plus the step metadata, or one control message.
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
        microbatches=microbatches + 1,
        slots_per_microbatch=2,
        extra_bytes=max(_META_BYTES_PER_TOKEN * max_tokens + _TIMING_BYTES, CONTROL_MAX_BYTES),
    )


def control_microbatch(spec: ChannelSpec) -> int:
    """The data channel's micro-batch index that carries control messages (the last one)."""
    return spec.microbatches - 1


def pipeline_microbatches(spec: ChannelSpec) -> int:
    return spec.microbatches - 1


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
        expected = data_channel_spec(config, kv_heads, pipeline_microbatches(spec), spec.max_tokens)
        if spec != expected:
            raise ControlError(f"data channel spec {spec} does not fit KV heads {kv_heads}", "bad_request")
        return cls(config, worker, num_workers, kv_heads, spec)


# --------------------------------------------------------------------------
# Control framing: JSON request/response over the control channel


def encode_json(message: Mapping[str, Any]) -> np.ndarray:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > CONTROL_MAX_BYTES:
        raise ProtocolError(f"control message of {len(data)} B exceeds {CONTROL_MAX_BYTES} B")
    return np.frombuffer(data, dtype=np.uint8)


def decode_json(message: Message) -> dict[str, Any]:
    """The JSON object in a control message."""
    if len(message.tensors) != 1:
        raise ProtocolError(f"a control message has one tensor, got {len(message.tensors)}")
    try:
        decoded = json.loads(np.asarray(message.tensors[0]).tobytes())
    except ValueError as exc:
        raise ProtocolError(f"control message is not JSON: {exc}") from exc
    if not isinstance(decoded, dict):
        raise ProtocolError("control message is not a JSON object")
    return decoded


class ControlLink:
    """Strict request/response on one micro-batch of a channel (one request outstanding).

    The request number travels in the message's layer field; a reply must
    carry the number of its request.
    """

    def __init__(self, channel: Channel, timeout: float, microbatch: int = 0):
        self.channel = channel
        self.timeout = timeout
        self.microbatch = microbatch
        self._next_call = 0

    def call(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send a request, return the reply; raise ControlError when the peer reports one."""
        number = self._next_call
        self._next_call = (self._next_call + 1) % ERROR_LAYER
        self.channel.send([encode_json(message)], layer=number, microbatch=self.microbatch)
        reply = self.channel.recv(microbatch=self.microbatch, timeout=self.timeout)
        try:
            if reply.layer != number:
                raise ProtocolError(f"control reply to request {reply.layer}, expected {number}")
            answer = decode_json(reply)
        except BaseException:
            reply.release()
            raise
        refusal = None if answer.get("ok") else ControlError(
            str(answer.get("error", "unknown error")), str(answer.get("code", "error")))
        try:
            reply.release()
        except LaminaError:
            # A peer that refused may hang up at once; its refusal is the news.
            if refusal is None:
                raise
        if refusal is not None:
            raise refusal
        return answer

    def receive(self, timeout: float) -> tuple[int, dict[str, Any]]:
        """The next request and its number (attention side); raises TimeoutError_ when none came."""
        with self.channel.recv(microbatch=self.microbatch, timeout=timeout) as request:
            return request.layer, decode_json(request)

    def reply(self, number: int, answer: Mapping[str, Any]) -> None:
        self.channel.send([encode_json(answer)], layer=number, microbatch=self.microbatch)


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
