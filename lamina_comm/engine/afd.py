"""``LaminaAFDConnector``: vLLM's attention-FFN disaggregation (AFD) connector contract over lamina-comm.

vLLM's AFD plugin cuts a layer between attention and FFN (ours cuts between
the model and attention; per layer and micro-batch the contract has the same
shape). The plugin's runner builds a connector with ``(rank, local_rank,
vllm_config, afd_config, role_rank)`` and calls:

- attention ranks: ``send_attn_output(hidden_states, context)`` then
  ``recv_ffn_output(ref_tensor, ubatch_idx)`` (lands in ``ref_tensor``);
- FFN ranks: ``recv_attn_output(ubatch_idx)`` -> ``.hidden_states`` (its
  attention ranks' rows concatenated in rank order), ``.context``,
  ``.router_logits`` (None); then ``send_ffn_output(ffn_output, context)``
  scatters the rows back by ``context.metadata.seq_lens``.

``afd_config``: ``.role`` ("attention" | "ffn"), ``.host`` and ``.port`` (the
rendezvous; FFN rank 0 serves it), ``.num_attention_ranks``,
``.num_ffn_ranks``. FFN rank f serves the attention ranks a with
a % num_ffn_ranks == f. Connector options come from
``vllm_config.additional_config["afd"]["connector_extra_config"]`` (a
mapping or a JSON text; ``vllm_config`` may be that mapping itself, or
None), see ``ExtraConfig``. ``context`` is duck-typed as the plugin's
``AFDTransferContext``: ``.metadata.layer_idx``, ``.metadata.stage_idx``
(the micro-batch), ``.metadata.seq_lens``, ``.states``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from lamina_comm.channel import Channel, ChannelSpec
from lamina_comm.transport import Context

from .rendezvous import RendezvousServer, rendezvous

_HELLO_LAYER = 0xFFFF0000  # the first message on a channel: the attention rank's number


@dataclass(frozen=True)
class ExtraConfig:
    """``connector_extra_config``: what the transport needs to size its slots."""

    hidden_size: int
    max_num_tokens: int = 8192      # rows one attention rank sends per micro-batch, at most
    dtype: str = "bfloat16"
    num_ubatches: int = 2           # micro-batches in flight (ubatch_idx < num_ubatches)
    transport: str = "auto"
    secret: Optional[str] = None
    timeout_s: float = 60.0
    listen_host: str = "127.0.0.1"  # where an FFN rank listens for its attention ranks


@dataclass
class AFDMetadata:
    layer_idx: int
    stage_idx: int
    seq_lens: list[int]


@dataclass
class AFDTransferContext:
    """What an FFN rank's ``recv_attn_output`` gives back (duck-types the plugin's context)."""

    metadata: AFDMetadata
    states: dict[str, Any] = field(default_factory=dict)


@dataclass
class AFDRecvOutput:
    hidden_states: torch.Tensor
    context: AFDTransferContext
    router_logits: Optional[torch.Tensor] = None


def _extra_from_vllm_config(vllm_config: Any) -> Any:
    if vllm_config is None:
        return None
    additional = vllm_config.get("additional_config") if isinstance(vllm_config, Mapping) else \
        getattr(vllm_config, "additional_config", None)
    if additional is None:
        return None
    afd = additional.get("afd", {}) if isinstance(additional, Mapping) else getattr(additional, "afd", {})
    return afd.get("connector_extra_config") if isinstance(afd, Mapping) else None


class LaminaAFDConnector:
    """One rank's end of the attention-FFN cut, over lamina-comm channels."""

    def __init__(self, rank: int, local_rank: int, vllm_config: Any, afd_config: Any, role_rank: int):
        self.rank, self.local_rank, self.role_rank = rank, local_rank, role_rank
        self.role = str(afd_config.role)
        if self.role not in ("attention", "ffn"):
            raise ValueError(f"afd_config.role must be 'attention' or 'ffn', got {self.role!r}")
        self.host, self.port = str(afd_config.host), int(afd_config.port)
        self.num_attention_ranks = int(afd_config.num_attention_ranks)
        self.num_ffn_ranks = int(afd_config.num_ffn_ranks)
        if self.num_attention_ranks < 1 or self.num_ffn_ranks < 1:
            raise ValueError("num_attention_ranks and num_ffn_ranks must be >= 1")
        ranks = self.num_attention_ranks if self.role == "attention" else self.num_ffn_ranks
        if not 0 <= role_rank < ranks:
            raise ValueError(f"{self.role} role_rank {role_rank} is not in [0, {ranks})")
        self.config = self.parse_extra_config(_extra_from_vllm_config(vllm_config))
        self._context: Optional[Context] = None
        self._server: Optional[RendezvousServer] = None
        self._channels: list[Channel] = []  # attention: [its FFN rank]; FFN: its attention ranks in rank order
        self._peers: list[int] = []
        self._initialized = False  # an FFN rank may serve no attention rank (more FFN than attention ranks)

    # -- configuration ------------------------------------------------------------------
    @classmethod
    def parse_extra_config(cls, raw: Any) -> ExtraConfig:
        """``connector_extra_config`` (a mapping, a JSON text or None) checked; ValueError names the problem."""
        if raw is None:
            raw = {}
        if isinstance(raw, (str, bytes)):
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"connector_extra_config is not JSON: {exc}") from None
        if not isinstance(raw, Mapping):
            raise ValueError(f"connector_extra_config must be a mapping, got {type(raw).__name__}")
        known = {f.name: f for f in dataclasses.fields(ExtraConfig)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"connector_extra_config: unknown option(s) {unknown}; known: {sorted(known)}")
        if "hidden_size" not in raw:
            raise ValueError("connector_extra_config needs hidden_size")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            kind = known[name].type
            try:
                values[name] = value if value is None else (int(value) if kind == "int" else float(value)
                                                            if kind == "float" else str(value))
            except (TypeError, ValueError):
                raise ValueError(f"connector_extra_config.{name}: {value!r} is not of type {kind}") from None
        config = ExtraConfig(**values)
        for name in ("hidden_size", "max_num_tokens", "num_ubatches"):
            if getattr(config, name) < 1:
                raise ValueError(f"connector_extra_config.{name} must be >= 1, got {getattr(config, name)}")
        try:
            getattr(torch, config.dtype)
            ChannelSpec(max_tokens=1, hidden=1, heads=1, kv_heads=1, head_dim=1, dtype=config.dtype)
        except Exception:  # noqa: BLE001 - any unknown dtype name
            raise ValueError(f"connector_extra_config.dtype: {config.dtype!r} is not a supported dtype") from None
        return config

    def _spec(self) -> ChannelSpec:
        c = self.config
        itemsize = torch.empty((), dtype=getattr(torch, c.dtype)).element_size()
        # Rows of hidden_size each way (the shape fields are minimal; the room is extra_bytes).
        return ChannelSpec(max_tokens=1, hidden=1, heads=1, kv_heads=1, head_dim=1, dtype=c.dtype,
                           microbatches=c.num_ubatches, slots_per_microbatch=2,
                           extra_bytes=c.max_num_tokens * c.hidden_size * itemsize + 64)

    # -- life cycle -------------------------------------------------------------------------
    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def init_afd_connector(self) -> None:
        """Rendezvous with every rank and connect this rank's channels (FFN rank 0 serves the rendezvous)."""
        if self._initialized:
            return
        self.close()  # what a failed earlier attempt left
        c = self.config
        address = f"{self.host}:{self.port}"
        world = (self.num_attention_ranks, self.num_ffn_ranks)
        self._context = Context(c.transport, secret=c.secret)
        try:
            if self.role == "ffn":
                self._init_ffn(address, world)
            else:
                self._init_attention(address, world)
        except BaseException:
            self.close()
            raise
        self._initialized = True

    def _init_ffn(self, address: str, world: tuple[int, int]) -> None:
        c = self.config
        if self.role_rank == 0:
            self._server = RendezvousServer(address, *world, secret=c.secret)
        assert self._context is not None
        with self._context.listen((c.listen_host, 0)) as listener:
            host, port = listener.address
            # Our rendezvous calls the side that dials "model" and the side that listens "attention".
            rendezvous(address, role="attention", rank=self.role_rank, world=world, advertise=f"{host}:{port}",
                       secret=c.secret, timeout=c.timeout_s)
            mine = [a for a in range(self.num_attention_ranks) if a % self.num_ffn_ranks == self.role_rank]
            accepted: dict[int, Channel] = {}
            for _ in mine:
                channel = Channel.accept(listener, self._spec(), role="attention", accept_timeout=c.timeout_s,
                                         timeout=c.timeout_s, piggyback_credits=True)
                with channel.recv(microbatch=0, timeout=c.timeout_s) as hello:
                    ok = hello.layer == _HELLO_LAYER and len(hello.tensors) == 1 and hello.tensors[0].size == 1 \
                        and hello.tensors[0].dtype_name == "int64"
                    rank = int(hello.tensors[0][0]) if ok else -1
                if rank not in mine or rank in accepted:
                    channel.close()
                    for other in accepted.values():
                        other.close()
                    raise ValueError(f"FFN rank {self.role_rank}: a peer introduced itself as attention rank {rank}, "
                                     f"expected one of {mine}")
                channel.name = f"attention-{rank}"
                accepted[rank] = channel
        self._peers = sorted(accepted)
        self._channels = [accepted[rank] for rank in self._peers]

    def _init_attention(self, address: str, world: tuple[int, int]) -> None:
        c = self.config
        found = rendezvous(address, role="model", rank=self.role_rank, world=world,
                           advertise=f"attention-{self.role_rank}", secret=c.secret, timeout=c.timeout_s)
        assert self._context is not None
        ffn_rank = self.role_rank % self.num_ffn_ranks
        channel = Channel.connect(self._context, found.attention[ffn_rank], self._spec(), role="model",
                                  name=f"ffn-{ffn_rank}", connect_timeout=c.timeout_s, timeout=c.timeout_s,
                                  piggyback_credits=True)
        (hello,) = channel.send_buffers(0, [(1,)], "int64")
        hello[0] = self.role_rank
        channel.send([hello], layer=_HELLO_LAYER, microbatch=0)
        self._channels, self._peers = [channel], [ffn_rank]

    def close(self) -> None:
        self._initialized = False
        for channel in self._channels:
            channel.close()
        self._channels = []
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._context is not None:
            self._context.close()
            self._context = None

    # -- attention side ---------------------------------------------------------------------
    def send_attn_output(self, hidden_states: torch.Tensor, context: Any) -> None:
        """Send this rank's rows [T, hidden] of (context.metadata.layer_idx, .stage_idx) to its FFN rank."""
        self._require("attention", "send_attn_output")
        layer, ubatch = self._where(context)
        self._check_rows(hidden_states, "hidden_states")
        self._send(self._channels[0], hidden_states, layer, ubatch)

    def recv_ffn_output(self, ref_tensor: torch.Tensor, ubatch_idx: int = 0) -> torch.Tensor:
        """The FFN output of this rank's rows of micro-batch ``ubatch_idx``, landed in ``ref_tensor``."""
        self._require("attention", "recv_ffn_output")
        self._check_ubatch(ubatch_idx)
        with self._channels[0].recv(microbatch=ubatch_idx) as message:
            rows = message.torch()[0]
            if tuple(rows.shape) != tuple(ref_tensor.shape):
                raise ValueError(f"FFN output of shape {list(rows.shape)} does not fit ref_tensor "
                                 f"{list(ref_tensor.shape)}")
            ref_tensor.copy_(rows)
        return ref_tensor

    # -- FFN side -----------------------------------------------------------------------------
    def recv_attn_output(self, ubatch_idx: int = 0) -> AFDRecvOutput:
        """Every one of this FFN rank's attention ranks' rows of micro-batch ``ubatch_idx``, in rank order."""
        self._require("ffn", "recv_attn_output")
        self._check_ubatch(ubatch_idx)
        parts, seq_lens, layers = [], [], set()
        for channel in self._channels:
            with channel.recv(microbatch=ubatch_idx) as message:
                rows = message.torch()[0]
                parts.append(rows.clone())
                seq_lens.append(rows.shape[0])
                layers.add(message.layer)
        if len(layers) != 1:
            raise ValueError(f"attention ranks {self._peers} sent different layers {sorted(layers)} for micro-batch "
                             f"{ubatch_idx}")
        hidden = torch.cat(parts) if len(parts) > 1 else parts[0]
        return AFDRecvOutput(hidden, AFDTransferContext(AFDMetadata(layers.pop(), ubatch_idx, seq_lens)))

    def send_ffn_output(self, ffn_output: torch.Tensor, context: Any) -> None:
        """Scatter ``ffn_output`` back to the attention ranks, ``context.metadata.seq_lens`` rows each."""
        self._require("ffn", "send_ffn_output")
        layer, ubatch = self._where(context)
        seq_lens = [int(n) for n in context.metadata.seq_lens]
        if len(seq_lens) != len(self._channels) or sum(seq_lens) != ffn_output.shape[0]:
            raise ValueError(f"ffn_output has {ffn_output.shape[0]} rows; seq_lens {seq_lens} name "
                             f"{len(seq_lens)} peers (this FFN rank serves {len(self._channels)})")
        self._check_rows(ffn_output, "ffn_output", limit=None)
        start = 0
        for channel, rows in zip(self._channels, seq_lens):
            self._send(channel, ffn_output[start:start + rows], layer, ubatch)
            start += rows

    # -- shared -----------------------------------------------------------------------------
    def _send(self, channel: Channel, rows: torch.Tensor, layer: int, ubatch: int) -> None:
        (slot,) = channel.send_buffers(ubatch, [tuple(rows.shape)], self.config.dtype, as_torch=True)
        slot.copy_(rows)  # device tensors and strided rows land in the slot; the write then goes as is
        channel.send([slot], layer=layer, microbatch=ubatch)

    def _require(self, role: str, what: str) -> None:
        if not self._initialized:
            raise RuntimeError(f"{what} before init_afd_connector()")
        if self.role != role:
            raise RuntimeError(f"{what} is for {role} ranks; this is a {self.role} rank")

    def _where(self, context: Any) -> tuple[int, int]:
        metadata = context.metadata
        layer, ubatch = int(metadata.layer_idx), int(metadata.stage_idx)
        if not 0 <= layer < _HELLO_LAYER:
            raise ValueError(f"layer_idx {layer} is out of range")
        self._check_ubatch(ubatch)
        return layer, ubatch

    def _check_ubatch(self, ubatch: int) -> None:
        if not 0 <= ubatch < self.config.num_ubatches:
            raise ValueError(f"ubatch {ubatch} is not in [0, {self.config.num_ubatches}) (num_ubatches)")

    def _check_rows(self, rows: torch.Tensor, what: str, limit: Optional[int] = -1) -> None:
        c = self.config
        if rows.dim() != 2 or rows.shape[1] != c.hidden_size:
            raise ValueError(f"{what} must be [tokens, {c.hidden_size}], got {list(rows.shape)}")
        if limit is not None and rows.shape[0] > c.max_num_tokens:
            raise ValueError(f"{what} has {rows.shape[0]} rows, over max_num_tokens {c.max_num_tokens}")
