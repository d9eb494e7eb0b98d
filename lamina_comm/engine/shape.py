"""``AttentionShape``: the attention a model exchanges with its attention ranks, and each rank's share."""
from __future__ import annotations

from dataclasses import dataclass

from lamina_comm.channel import ChannelSpec
from lamina_comm.model.kvcache import HeadRange, split_kv_heads


@dataclass(frozen=True)
class AttentionShape:
    """Heads of one layer's attention, the largest micro-batch, and the pipelining depth.

    Attention rank a of A serves KV heads ``kv_heads(a, A)`` (an even,
    contiguous split) and their query heads (``num_heads / num_kv_heads``
    per KV head).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_tokens: int
    dtype: str = "float16"
    microbatches: int = 2
    slots_per_microbatch: int = 2

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "max_tokens", "microbatches", "slots_per_microbatch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AttentionShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads do not group evenly over {self.num_kv_heads} KV heads")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_heads(self, rank: int, ranks: int) -> HeadRange:
        """KV heads of attention rank ``rank`` of ``ranks`` (ValueError when they do not split evenly)."""
        return split_kv_heads(self.num_kv_heads, ranks)[rank]

    def q_heads(self, rank: int, ranks: int) -> HeadRange:
        start, end = self.kv_heads(rank, ranks)
        return start * self.group_size, end * self.group_size

    @property
    def metadata_microbatch(self) -> int:
        """The channel micro-batch that carries per-step metadata (after the data micro-batches)."""
        return self.microbatches

    def channel_spec(self, rank: int, ranks: int) -> ChannelSpec:
        """The channel between a model rank and attention rank ``rank``: its share's q/k/v out, output back,
        and one more micro-batch for per-step metadata (request ids and positions, 16 B per token)."""
        return self.share_spec(self.kv_heads(rank, ranks))

    def payload_bytes(self, rank: int, ranks: int, role: str = "model") -> int:
        """Bytes of a region taking the payloads ``role``'s side of rank ``rank``'s channel receives on
        the data micro-batches (``payloads=``, GPUDirect receive; the control micro-batch stays in the
        ring): the model side's replies, or the attention side's requests."""
        return self.share_payload_bytes(self.kv_heads(rank, ranks), role)

    def share_payload_bytes(self, kv_heads: HeadRange, role: str = "model") -> int:
        """``payload_bytes`` of the channel of the attention rank serving ``kv_heads`` (``share_spec``)."""
        from lamina_comm.channel.spec import RingLayout
        return RingLayout.for_role(self.share_spec(kv_heads), role).payload_bytes_of(self.microbatches)

    def share_spec(self, kv_heads: HeadRange) -> ChannelSpec:
        """``channel_spec`` of the attention rank serving ``kv_heads`` (any contiguous range)."""
        start, end = kv_heads
        if not 0 <= start < end <= self.num_kv_heads:
            raise ValueError(f"KV heads [{start}, {end}) are not a share of {self.num_kv_heads}")
        local_kv = end - start
        return ChannelSpec(max_tokens=self.max_tokens, hidden=local_kv * self.group_size * self.head_dim,
                           heads=local_kv * self.group_size, kv_heads=local_kv, head_dim=self.head_dim,
                           dtype=self.dtype, microbatches=self.microbatches + 1,
                           slots_per_microbatch=self.slots_per_microbatch, extra_bytes=16 * self.max_tokens + 64)
