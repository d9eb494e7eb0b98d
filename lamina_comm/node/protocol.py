"""What the model node and an attention node say to each other.

A model node reaches an attention node on its one listening address twice:

* a short-lived **setup channel** (fixed :data:`CONTROL_SPEC`) carries one
  JSON request/response, ``setup`` (config and its fingerprint, the worker's
  head share, the data-channel spec); it is closed right after;
* the **data channel** (spec from :func:`data_channel_spec`) then carries
  everything else, laid out as the engine API's channels are
  (``lamina_comm.engine``: the model node drives it with ``RemoteAttention``,
  the worker serves it with ``AttentionService``). Micro-batches ``0 .. n-1``
  carry, per layer, ``[q, k, v]`` to the worker and ``[out, attention_ns]``
  back (or an error text, layer ``ERROR_LAYER``). The extra micro-batch index
  ``n`` (:func:`control_microbatch`) carries the step metadata (request ids and
  positions of a micro-batch's tokens, layer ``METADATA_LAYER``, sent ahead of
  its layer 0) and JSON control requests and their replies: ``reserve`` /
  ``rebuild`` / ``free`` (KV reservations of new, rebuilt and finished
  requests) and ``status`` (also the idle heartbeat). Control messages of any
  size up to :data:`CONTROL_MAX_MESSAGE_BYTES` travel as fragments of one slot
  each (:class:`ControlLink`), numbered below ``METADATA_LAYER``.

One channel means one arrival order: the worker serves control and attention
messages strictly in the order they were sent, from one thread. See
docs/node.md for the full protocol.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lamina_comm.channel import Channel, ChannelSpec, Message
from lamina_comm.engine.wire import METADATA_LAYER
from lamina_comm.errors import LaminaError, ProtocolError
from lamina_comm.model import HeadRange, LlamaConfig

# 2: control messages are fragmented (a fragment header tensor, then the bytes).
# 3: the data channel is the engine API's (step metadata on the control micro-batch).
PROTOCOL_VERSION = 3

# Control messages are JSON, cut into fragments of at most CONTROL_SLOT_BYTES
# that travel one per slot and are reassembled by the receiver, so a message
# (a reserve reply listing a thousand refusals, say) is never limited by the
# slot size. Every slot of both channels has room for one fragment.
CONTROL_SLOT_BYTES = 64 * 1024
# Hard bound on one whole control message (request or reply), 256 fragments.
# A sender refuses to send more (ControlMessageTooLarge); a receiver discards
# the fragments of a longer one and answers with a "too_large" error.
CONTROL_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CONTROL_BATCH = 1000  # request ids per reserve/free message (bounds the work of one message)
CONTROL_SPEC = ChannelSpec(
    max_tokens=1, hidden=1, heads=1, kv_heads=1, head_dim=1, dtype="uint8",
    microbatches=1, slots_per_microbatch=2, extra_bytes=CONTROL_SLOT_BYTES,
)

# A model node sends every worker a message (a "status" heartbeat when idle)
# at least this many times per the worker's takeover bound (its peer_timeout,
# announced in the setup reply as takeover_after_s), so a healthy model node
# is never taken for a hung one.
HEARTBEATS_PER_SILENCE = 3

# Step metadata: a micro-batch index, then the request id and position of every token (int64).
_META_BYTES_PER_TOKEN = 16
_META_HEADER_BYTES = 64


class ControlError(LaminaError):
    """The peer answered a control request with an error.

    ``code`` says which kind: ``config_mismatch``, ``bad_request``, ``state``,
    ``busy`` (the worker serves as many model nodes as it may), ``conflict``
    (it holds another head share or model for the model nodes it serves).
    ``details`` are further fields of the answer (``retry_after_s``).
    """

    def __init__(self, message: str, code: str = "error", **details: Any):
        super().__init__(message)
        self.code = code
        self.details = details


class ControlMessageTooLarge(ControlError):
    """A control message over CONTROL_MAX_MESSAGE_BYTES: refused, nothing of it is sent or kept."""

    def __init__(self, message: str):
        super().__init__(message, "too_large")


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
        extra_bytes=max(_META_BYTES_PER_TOKEN * max_tokens + _META_HEADER_BYTES, CONTROL_SLOT_BYTES),
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
    config: LlamaConfig, worker: int, num_workers: int, kv_heads: HeadRange, spec: ChannelSpec,
    replica: Optional[str] = None,
) -> dict[str, Any]:
    message = {
        "type": "setup",
        "protocol": PROTOCOL_VERSION,
        "config": config_to_wire(config),
        "fingerprint": config.fingerprint(),
        "worker": worker,
        "num_workers": num_workers,
        "kv_heads": list(kv_heads),
        "data_spec": spec.to_dict(),
    }
    if replica is not None:
        message["replica"] = replica
    return message


def data_address(worker_address: str, setup_reply: Mapping[str, Any]) -> str:
    """Where the data channel connects: the worker's host at the ``data_port`` its setup reply names."""
    port = setup_reply.get("data_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ProtocolError(f"setup reply names no data port (got {str(port)[:40]!r})")
    host = worker_address.rpartition(":")[0]
    return f"{host}:{port}"


# A replica's name is shown in logs, refusals and status: short, printable.
MAX_REPLICA_NAME = 64


def check_replica_name(name: Any) -> Optional[str]:
    """The replica name of a setup (None when absent); ControlError when it is not a short printable text."""
    if name is None:
        return None
    if not isinstance(name, str) or not 0 < len(name) <= MAX_REPLICA_NAME or not name.isprintable():
        raise ControlError(f"replica name must be 1 to {MAX_REPLICA_NAME} printable characters, got "
                           f"{str(name)[:MAX_REPLICA_NAME]!r}", "bad_request")
    return name


@dataclasses.dataclass(frozen=True)
class Setup:
    """A parsed and checked ``setup`` request."""

    config: LlamaConfig
    worker: int
    num_workers: int
    kv_heads: HeadRange
    data_spec: ChannelSpec
    replica: Optional[str] = None  # the model node's name (--name); None: it is named by its address

    @classmethod
    def parse(cls, message: Mapping[str, Any]) -> "Setup":
        """The checked setup; ControlError("bad_request") for anything malformed, whatever it holds."""
        try:
            return cls._parse(message)
        except ControlError:
            raise
        except Exception as exc:  # noqa: BLE001 - a peer's bytes: no value of theirs may crash the node
            raise ControlError(f"malformed setup message: {exc!r}"[:500], "bad_request") from exc

    @classmethod
    def _parse(cls, message: Mapping[str, Any]) -> "Setup":
        if message.get("protocol") != PROTOCOL_VERSION:
            raise ControlError(
                f"node protocol version {message.get('protocol')} is not supported (this node speaks "
                f"{PROTOCOL_VERSION})", "bad_request")
        config = config_from_wire(message["config"], message["fingerprint"])
        kv_heads = (int(message["kv_heads"][0]), int(message["kv_heads"][1]))
        spec = ChannelSpec(**message["data_spec"])
        worker, num_workers = int(message["worker"]), int(message["num_workers"])
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ControlError(f"worker {worker} of {num_workers} is not a worker index", "bad_request")
        if config.num_kv_heads % num_workers != 0:
            raise ControlError(
                f"{num_workers} attention workers cannot split {config.num_kv_heads} KV heads evenly; "
                f"use a worker count that divides {config.num_kv_heads}", "bad_request")
        if not 0 <= kv_heads[0] < kv_heads[1] <= config.num_kv_heads:
            raise ControlError(f"KV head range {kv_heads} is outside [0, {config.num_kv_heads})", "bad_request")
        if pipeline_microbatches(spec) < 1:
            raise ControlError(f"data channel spec {spec} has no pipeline micro-batch (only the control one)",
                               "bad_request")
        expected = data_channel_spec(config, kv_heads, pipeline_microbatches(spec), spec.max_tokens)
        if spec != expected:
            raise ControlError(f"data channel spec {spec} does not fit KV heads {kv_heads}", "bad_request")
        return cls(config, worker, num_workers, kv_heads, spec, check_replica_name(message.get("replica")))


# --------------------------------------------------------------------------
# Control framing: JSON request/response over one micro-batch, in fragments
#
# A control message is sent as fragment messages [int64 [index, count,
# total_bytes], uint8 bytes], every one carrying the message's number in the
# layer field. A fragment holds at most CONTROL_SLOT_BYTES; the receiver
# copies each out and releases its slot before it waits for the next, so a
# message of any size up to CONTROL_MAX_MESSAGE_BYTES flows through two slots.

_FRAGMENT_HEADER_FIELDS = 3  # index, count, total bytes


def fragment_count(total_bytes: int) -> int:
    """Fragments of a control message of ``total_bytes`` (at least one)."""
    return max(1, -(-total_bytes // CONTROL_SLOT_BYTES))


def encode_json(message: Mapping[str, Any]) -> bytes:
    """The message as JSON bytes; ControlMessageTooLarge when it is over the hard bound."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > CONTROL_MAX_MESSAGE_BYTES:
        raise ControlMessageTooLarge(
            f"control message {message.get('type', '(reply)')!s} of {len(data)} B exceeds the "
            f"{CONTROL_MAX_MESSAGE_BYTES} B bound")
    return data


def decode_json(data: bytes) -> dict[str, Any]:
    """The JSON object of a reassembled control message."""
    try:
        decoded = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's depth
        raise ProtocolError(f"control message is not JSON: {exc!r}"[:300]) from exc
    if not isinstance(decoded, dict):
        raise ProtocolError("control message is not a JSON object")
    return decoded


def encode_fragments(data: bytes) -> list[list[np.ndarray]]:
    """The fragment messages (tensor lists) that carry ``data``."""
    count = fragment_count(len(data))
    return [[np.array([index, count, len(data)], dtype=np.int64),
             np.frombuffer(data, dtype=np.uint8, count=_chunk_length(index, len(data)),
                           offset=index * CONTROL_SLOT_BYTES)]
            for index in range(count)]


def _chunk_length(index: int, total_bytes: int) -> int:
    return max(0, min(CONTROL_SLOT_BYTES, total_bytes - index * CONTROL_SLOT_BYTES))


def _parse_fragment(message: Message) -> tuple[int, int, int, np.ndarray]:
    """(index, count, total bytes, payload) of one fragment; ProtocolError when it is not one."""
    if len(message.tensors) != 2:
        raise ProtocolError(f"a control fragment has 2 tensors, got {len(message.tensors)}")
    header, payload = (np.asarray(tensor) for tensor in message.tensors)
    if header.dtype != np.int64 or header.shape != (_FRAGMENT_HEADER_FIELDS,):
        raise ProtocolError(f"control fragment header must be int64 [3], got {header.dtype} {list(header.shape)}")
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ProtocolError(f"control fragment payload must be uint8 [n], got {payload.dtype} {list(payload.shape)}")
    index, count, total = (int(field) for field in header)
    if total < 0 or count != fragment_count(total) or not 0 <= index < count:
        raise ProtocolError(f"control fragment {index} of {count} cannot belong to a message of {total} B")
    if payload.shape[0] != _chunk_length(index, total):
        raise ProtocolError(f"control fragment {index} of a {total} B message carries {payload.shape[0]} B")
    return index, count, total, payload


def _release_quietly(message: Message) -> None:
    # A peer that has answered may hang up at once; what it said is the news.
    try:
        message.release()
    except LaminaError:
        pass


def decode_control_request(data: bytes) -> dict[str, Any]:
    """A request's JSON object; ControlError("bad_request") when it is not one (answer it, the link is fine)."""
    try:
        return decode_json(data)
    except ProtocolError as exc:
        raise ControlError(str(exc), "bad_request") from exc


class FragmentAssembler:
    """Puts a control message together from its fragments as they arrive, one at a time.

    ``feed`` never waits, so a server that serves several peers on one thread
    is not held up by a peer that sends half a message and stops. Only the
    bound (CONTROL_MAX_MESSAGE_BYTES) is ever kept.
    """

    def __init__(self) -> None:
        self._number: Optional[int] = None
        self._expected = self._count = self._total = 0
        self._parts: list[bytes] = []
        self._keep = True

    @property
    def partial(self) -> bool:
        """A message has begun and not ended."""
        return self._number is not None

    def feed(self, message: Message) -> Optional[tuple[int, bytes]]:
        """Take one fragment (released here); (number, bytes) once the message is whole, else None.

        ControlError("bad_request") when a message does not start with its
        first fragment (answer it, the link is fine); ControlMessageTooLarge
        after the last fragment of a message over the bound; ProtocolError
        when a fragment does not continue the message begun (out of step).
        """
        try:
            index, count, total, payload = _parse_fragment(message)
            if self._number is None:
                if index != 0:
                    raise ControlError(f"malformed control message: a control message starts with fragment "
                                       f"{index} of {count}", "bad_request")
                self._number, self._expected, self._count, self._total = message.layer, 0, count, total
                self._keep, self._parts = total <= CONTROL_MAX_MESSAGE_BYTES, []
            elif (message.layer, index, count, total) != (self._number, self._expected, self._count, self._total):
                raise ProtocolError(
                    f"control message {self._number}: expected fragment {self._expected} of {self._count} "
                    f"({self._total} B), got message {message.layer} fragment {index} of {count} ({total} B)")
            if self._keep:
                self._parts.append(payload.tobytes())
        except ProtocolError as exc:
            if self._number is None:
                raise ControlError(f"malformed control message: {exc}", "bad_request") from exc
            raise
        finally:
            _release_quietly(message)
        self._expected += 1
        if self._expected < self._count:
            return None
        number, data, keep = self._number, b"".join(self._parts), self._keep
        self._number, self._parts = None, []
        if not keep:
            raise ControlMessageTooLarge(
                f"control message {number} of {self._total} B exceeds the {CONTROL_MAX_MESSAGE_BYTES} B bound")
        return number, data


def read_fragments(first: Message, next_fragment: Callable[[], Message]) -> tuple[int, bytes]:
    """(number, bytes) of the control message starting with ``first``; every fragment is released.

    ``next_fragment()`` receives the next message of the same micro-batch.
    Raises as ``FragmentAssembler.feed``: ControlError("bad_request") when
    ``first`` does not start a message (nothing more is read),
    ControlMessageTooLarge after reading and dropping the fragments of a
    message over the bound, ProtocolError when a later fragment does not
    continue the message (the link is out of step).
    """
    assembler = FragmentAssembler()
    whole = assembler.feed(first)
    while whole is None:
        whole = assembler.feed(next_fragment())
    return whole


class ControlLink:
    """Strict request/response on one micro-batch of a channel (one request outstanding).

    The request number travels in the layer field of every fragment; a reply
    must carry the number of its request.
    """

    def __init__(self, channel: Channel, timeout: float, microbatch: int = 0):
        self.channel = channel
        self.timeout = timeout
        self.microbatch = microbatch
        self._next_call = 0

    def call(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send a request, return the reply; raise ControlError when the peer reports one.

        ControlMessageTooLarge (a ControlError) when the request or the reply
        is over the bound: the link stays usable. Any other LaminaError means
        the link failed or is out of step.
        """
        data = encode_json(message)  # refused before anything is sent
        number = self._next_call
        self._next_call = (self._next_call + 1) % METADATA_LAYER  # the layers above are the engine's
        self._send(number, data)
        first = self._recv()
        if first.layer != number:
            _release_quietly(first)
            raise ProtocolError(f"control reply to request {first.layer}, expected {number}")
        try:
            _, reply = read_fragments(first, self._recv)
        except ControlMessageTooLarge:
            raise
        except ControlError as exc:  # the peer's reply is not framed as one: it speaks something else
            raise ProtocolError(f"control reply to request {number}: {exc}") from exc
        answer = decode_json(reply)
        if not answer.get("ok"):
            raise ControlError(str(answer.get("error", "unknown error")), str(answer.get("code", "error")))
        return answer

    def receive(self, timeout: float) -> tuple[int, dict[str, Any]]:
        """The next request and its number (attention side); raises TimeoutError_ when none came."""
        first = self.channel.recv(microbatch=self.microbatch, timeout=timeout)
        return self.read_request(first)

    def read_request(self, first: Message) -> tuple[int, dict[str, Any]]:
        """The request starting with the already received ``first`` fragment, and its number.

        ControlError (answer it with an error reply) for a malformed or
        oversized request; ProtocolError when the link is out of step.
        """
        number, data = read_fragments(first, self._recv)
        return number, decode_control_request(data)

    def reply(self, number: int, answer: Mapping[str, Any]) -> None:
        """Send ``answer``; one over the bound is replaced by a ``too_large`` error reply."""
        try:
            data = encode_json(answer)
        except ControlMessageTooLarge as exc:
            data = encode_json(error(f"the reply does not fit: {exc}", exc.code))
        self._send(number, data)

    def _send(self, number: int, data: bytes) -> None:
        # Each fragment is encoded straight into its send slot (the channel stages nothing).
        for header, chunk in encode_fragments(data):
            views = self.channel.send_buffers(self.microbatch, [header.shape, chunk.shape],
                                              [header.dtype, chunk.dtype], timeout=self.timeout)
            views[0][...] = header
            views[1][...] = chunk
            self.channel.send(views, layer=number, microbatch=self.microbatch, timeout=self.timeout)

    def _recv(self) -> Message:
        return self.channel.recv(microbatch=self.microbatch, timeout=self.timeout)


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(message: str, code: str = "error", **fields: Any) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code, **fields}


# --------------------------------------------------------------------------
# Reservations


def reservation_list(requests: Sequence[tuple[int, int]]) -> list[list[int]]:
    """``[(request_id, max_tokens)]`` as it travels in reserve/rebuild messages."""
    return [[int(request_id), int(max_tokens)] for request_id, max_tokens in requests]


def parse_reservations(message: Mapping[str, Any]) -> list[tuple[int, int]]:
    try:
        return [(int(request_id), int(max_tokens)) for request_id, max_tokens in message["requests"]]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ControlError(f"malformed request list: {exc!r}", "bad_request") from exc


def parse_request_ids(message: Mapping[str, Any]) -> list[int]:
    try:
        return [int(request_id) for request_id in message["requests"]]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ControlError(f"malformed request list: {exc!r}", "bad_request") from exc

