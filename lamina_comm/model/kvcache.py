"""Attention tier: paged KV cache and causal attention over a share of KV heads.

An attention worker owns KV heads ``[kv_head_start, kv_head_end)`` and thus
the query heads ``[start * G, end * G)`` (G = num_heads / num_kv_heads, the
GQA group size).  Attention is independent per KV head, so workers owning
disjoint head ranges together compute exactly what one worker owning all
heads computes; the per-head arithmetic here is laid out so that this holds
bit for bit (see ``_grouped_causal_attention``).

Two attention kernels (``attention=``): ``exact``, a float32 matmul-softmax
laid out so that the result is bit-identical whatever the head split (the
parity tests rest on it), and ``sdpa``, torch's fused
``scaled_dot_product_attention`` in the cache's dtype (flash / memory-efficient
kernels on CUDA where torch has them), close to ``exact`` but not bit for bit.
``auto`` takes ``sdpa`` on CUDA and ``exact`` elsewhere.

The tokens of one step form a ragged batch: ``request_ids[i]`` and
``positions[i]`` describe token i.  A prefill contributes many consecutive
positions of one request, a decode one position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

from lamina_comm.errors import LaminaError
from lamina_comm.model.config import LlamaConfig

RequestId = Hashable
HeadRange = tuple[int, int]

ATTENTION_KERNELS = ("auto", "exact", "sdpa")


def resolve_attention_kernel(kernel: str, device: torch.device | str) -> str:
    """``exact`` or ``sdpa`` for a requested kernel (``auto``: sdpa on CUDA, exact elsewhere)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, not {kernel!r}")
    if kernel == "auto":
        return "sdpa" if torch.device(device).type == "cuda" else "exact"
    return kernel


class KVCacheFull(LaminaError):
    """Not enough free blocks to admit a request; raised by ``reserve`` only,
    so a request is refused before it starts, never in the middle of a step."""


def split_kv_heads(num_kv_heads: int, num_workers: int) -> list[HeadRange]:
    """Split KV heads into equal contiguous ranges, one per attention worker."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_kv_heads % num_workers != 0:
        raise ValueError(
            f"cannot split {num_kv_heads} KV heads evenly across {num_workers} attention workers; "
            f"use a worker count that divides {num_kv_heads}"
        )
    per_worker = num_kv_heads // num_workers
    return [(w * per_worker, (w + 1) * per_worker) for w in range(num_workers)]


def slice_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: HeadRange, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q/k/v head slices (dim 1) that the worker owning ``kv_heads`` needs."""
    start, end = kv_heads
    return q[:, start * group_size : end * group_size], k[:, start:end], v[:, start:end]


@dataclass
class _Reservation:
    blocks: list[int]
    capacity: int  # positions reserved: 0 .. capacity-1
    filled: list[int]  # per layer: positions 0 .. filled-1 hold valid K/V


@dataclass(frozen=True)
class _Group:
    """The tokens of one request within a step (consecutive positions)."""

    request_id: RequestId
    token_index: list[int]
    first_position: int
    last_position: int


@dataclass(frozen=True)
class _AttentionBatch:
    """Groups with the same token count, computed with one batched matmul."""

    token_index: torch.Tensor  # [B * Tq], group-major
    query_positions: torch.Tensor  # [B, Tq]
    block_table: torch.Tensor  # [B, blocks covering context_len]
    context_len: int  # longest context in the batch; shorter ones are masked


@dataclass(frozen=True)
class _StepPlan:
    """Everything about a step that does not depend on the layer."""

    request_ids: list[RequestId]
    positions: list[int]
    generation: int
    groups: list[_Group]
    slots: torch.Tensor  # [T] flat pool slot each token's K/V is written to
    batches: list[_AttentionBatch]


class PagedKVCache:
    """Block-paged K/V storage plus attention for KV heads [start, end).

    Pools are ``[num_layers, num_blocks, block_size, n_local_kv, head_dim]``.
    A request reserves all blocks for its whole life up front (``reserve``);
    ``attend`` then never allocates, so a step cannot fail half way for lack
    of memory.
    """

    def __init__(
        self,
        config: LlamaConfig,
        kv_head_start: int,
        kv_head_end: int,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: Optional[torch.dtype] = None,
        attention: str = "auto",
    ) -> None:
        if not 0 <= kv_head_start < kv_head_end <= config.num_kv_heads:
            raise ValueError(
                f"KV head range [{kv_head_start}, {kv_head_end}) is not a non-empty "
                f"sub-range of [0, {config.num_kv_heads})"
            )
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.config = config
        self.kv_heads: HeadRange = (kv_head_start, kv_head_end)
        self.group_size = config.num_heads // config.num_kv_heads
        self.n_local_kv_heads = kv_head_end - kv_head_start
        self.n_local_q_heads = self.n_local_kv_heads * self.group_size
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else config.torch_dtype
        self.attention = resolve_attention_kernel(attention, self.device)
        pool_shape = (config.num_layers, num_blocks, block_size, self.n_local_kv_heads, config.head_dim)
        # Zero-initialised so masked-out padding slots never hold inf/NaN.
        self.k_pool = torch.zeros(pool_shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(pool_shape, dtype=self.dtype, device=self.device)
        # Pop from the end; reversed so the lowest block ids are handed out first.
        self._free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self._requests: dict[RequestId, _Reservation] = {}
        self._generation = 0  # bumped on reserve/free; invalidates the cached step plan
        self._last_plan: Optional[_StepPlan] = None

    # ----------------------------------------------------------------- blocks

    @property
    def blocks_total(self) -> int:
        return self.k_pool.shape[1]

    @property
    def blocks_used(self) -> int:
        return self.blocks_total - len(self._free_blocks)

    @property
    def blocks_free(self) -> int:
        return len(self._free_blocks)

    def blocks_needed(self, max_tokens: int) -> int:
        return -(-max_tokens // self.block_size)

    def can_fit(self, max_tokens: int) -> bool:
        return self.blocks_needed(max_tokens) <= self.blocks_free

    def has_request(self, request_id: RequestId) -> bool:
        return request_id in self._requests

    def reserve(self, request_id: RequestId, max_tokens: int) -> None:
        """Reserve blocks for positions 0 .. max_tokens-1 of a new request."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already has a KV reservation")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        needed = self.blocks_needed(max_tokens)
        if needed > self.blocks_free:
            raise KVCacheFull(
                f"KV cache full: request {request_id!r} needs {needed} blocks ({max_tokens} tokens at "
                f"block_size {self.block_size}) but only {self.blocks_free} of {self.blocks_total} are free"
            )
        blocks = [self._free_blocks.pop() for _ in range(needed)]
        self._requests[request_id] = _Reservation(blocks, max_tokens, [0] * self.config.num_layers)
        self._generation += 1

    def free(self, request_id: RequestId) -> None:
        """Return a request's blocks to the pool."""
        reservation = self._requests.pop(request_id, None)
        if reservation is None:
            raise KeyError(f"request {request_id!r} has no KV reservation")
        self._free_blocks.extend(reversed(reservation.blocks))
        self._generation += 1

    # -------------------------------------------------------------- attention

    @torch.inference_mode()
    def attend(
        self,
        layer: int,
        request_ids: Sequence[RequestId],
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Store this step's K/V of ``layer`` and return causal attention output.

        q: [T, n_local_q_heads, head_dim]; k, v: [T, n_local_kv_heads, head_dim];
        returns [T, n_local_q_heads, head_dim] in q's dtype.  Every K/V of the
        step is written before any attention, so a prefill's tokens see each other.
        ``out`` (q's shape, dtype and device): filled and returned instead of a
        new tensor, e.g. a channel's reply slot, so the output needs no copy.
        """
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.config.num_layers})")
        plan = self._plan_for(request_ids, positions)
        self._check_shapes(len(plan.positions), q, k, v)
        self._check_no_gaps(layer, plan.groups)
        self._write(layer, plan.slots, k, v)
        for group in plan.groups:
            reservation = self._requests[group.request_id]
            reservation.filled[layer] = max(reservation.filled[layer], group.last_position + 1)
        if out is None:
            out = torch.empty_like(q)
        elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype} on {out.device}, q is {tuple(q.shape)} "
                             f"{q.dtype} on {q.device}")
        for batch in plan.batches:
            out.index_copy_(0, batch.token_index, self._attend_batch(layer, batch, q))
        return out

    def _check_shapes(self, num_tokens: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        head_dim = self.config.head_dim
        expected = {
            "q": (num_tokens, self.n_local_q_heads, head_dim),
            "k": (num_tokens, self.n_local_kv_heads, head_dim),
            "v": (num_tokens, self.n_local_kv_heads, head_dim),
        }
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} "
                    f"for KV heads [{self.kv_heads[0]}, {self.kv_heads[1]})"
                )

    def _check_no_gaps(self, layer: int, groups: list[_Group]) -> None:
        for group in groups:
            filled = self._requests[group.request_id].filled[layer]
            if group.first_position > filled:
                raise ValueError(
                    f"request {group.request_id!r} layer {layer}: step starts at position "
                    f"{group.first_position} but only positions < {filled} are cached"
                )

    def _write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        flat_shape = (-1, self.n_local_kv_heads, self.config.head_dim)
        self.k_pool[layer].view(flat_shape).index_copy_(0, slots, k.to(self.dtype))
        self.v_pool[layer].view(flat_shape).index_copy_(0, slots, v.to(self.dtype))

    def _attend_batch(self, layer: int, batch: _AttentionBatch, q: torch.Tensor) -> torch.Tensor:
        num_groups, tokens_per_group = batch.query_positions.shape
        q_batch = q.index_select(0, batch.token_index).view(
            num_groups, tokens_per_group, self.n_local_q_heads, self.config.head_dim
        )
        k_context = self._gather(self.k_pool[layer], batch)
        v_context = self._gather(self.v_pool[layer], batch)
        # Slots past a group's last position (padding, or stale data of a freed
        # request) get probability 0, but 0 * NaN is NaN: zero them so one
        # request's overflow cannot poison another's output.
        key_positions = torch.arange(batch.context_len, device=self.device)
        stale = key_positions[None, :] > batch.query_positions[:, -1:]
        v_context = v_context.masked_fill(stale[:, :, None, None], 0)
        if self.attention == "sdpa":
            # SDPA adds its mask to the scores, and NaN + -inf is NaN: stale keys go too.
            k_context = k_context.masked_fill(stale[:, :, None, None], 0)
            out = _sdpa_causal_attention(q_batch, k_context, v_context, batch.query_positions,
                                         self.config.sliding_window)
        else:
            out = _grouped_causal_attention(q_batch, k_context, v_context, batch.query_positions,
                                            self.config.sliding_window)
        return out.reshape(num_groups * tokens_per_group, self.n_local_q_heads, self.config.head_dim).to(q.dtype)

    def _gather(self, pool: torch.Tensor, batch: _AttentionBatch) -> torch.Tensor:
        """[B, context_len, n_local_kv, head_dim] from the blocks of each group."""
        blocks = pool[batch.block_table]  # [B, nb, block_size, kv, d]
        num_groups, num_blocks = batch.block_table.shape
        flat = blocks.reshape(num_groups, num_blocks * self.block_size, self.n_local_kv_heads, self.config.head_dim)
        return flat[:, : batch.context_len]

    # ------------------------------------------------------------------ plans

    def _plan_for(self, request_ids: Sequence[RequestId], positions: torch.Tensor) -> _StepPlan:
        """The step plan, reused across the layers of one step."""
        position_list = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
        ids = list(request_ids)
        last = self._last_plan
        if (
            last is not None
            and last.generation == self._generation
            and last.positions == position_list
            and last.request_ids == ids
        ):
            return last
        plan = self._build_plan(ids, position_list)
        self._last_plan = plan
        return plan

    def _build_plan(self, request_ids: list[RequestId], positions: list[int]) -> _StepPlan:
        if len(request_ids) != len(positions):
            raise ValueError(f"{len(request_ids)} request ids but {len(positions)} positions")
        if not positions:
            raise ValueError("a step needs at least one token")
        groups = self._group_tokens(request_ids, positions)
        slots = [self._slot(request_ids[i], positions[i]) for i in range(len(positions))]
        by_size: dict[int, list[_Group]] = {}
        for group in groups:
            by_size.setdefault(len(group.token_index), []).append(group)
        return _StepPlan(
            request_ids=request_ids,
            positions=positions,
            generation=self._generation,
            groups=groups,
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            batches=[self._batch(same_size, positions) for same_size in by_size.values()],
        )

    def _group_tokens(self, request_ids: list[RequestId], positions: list[int]) -> list[_Group]:
        token_index: dict[RequestId, list[int]] = {}
        for i, request_id in enumerate(request_ids):
            token_index.setdefault(request_id, []).append(i)
        groups = []
        for request_id, indices in token_index.items():
            reservation = self._requests.get(request_id)
            if reservation is None:
                raise KeyError(f"request {request_id!r} has no KV reservation; call reserve() first")
            first, last = positions[indices[0]], positions[indices[-1]]
            if [positions[i] for i in indices] != list(range(first, last + 1)) or first < 0:
                raise ValueError(f"positions of request {request_id!r} in a step must be consecutive, ascending, >= 0")
            if last >= reservation.capacity:
                raise ValueError(
                    f"request {request_id!r} position {last} exceeds its reservation of {reservation.capacity} tokens"
                )
            groups.append(_Group(request_id, indices, first, last))
        return groups

    def _slot(self, request_id: RequestId, position: int) -> int:
        block = self._requests[request_id].blocks[position // self.block_size]
        return block * self.block_size + position % self.block_size

    def _batch(self, groups: list[_Group], positions: list[int]) -> _AttentionBatch:
        context_len = max(group.last_position for group in groups) + 1
        blocks_per_group = self.blocks_needed(context_len)
        # Shorter requests are padded with block 0: its keys sit at positions past
        # the request's own tokens, so the causal mask hides them.
        table = [self._padded_blocks(group.request_id, blocks_per_group) for group in groups]
        token_index = [i for group in groups for i in group.token_index]
        query_positions = [[positions[i] for i in group.token_index] for group in groups]
        return _AttentionBatch(
            token_index=torch.tensor(token_index, dtype=torch.long, device=self.device),
            query_positions=torch.tensor(query_positions, dtype=torch.long, device=self.device),
            block_table=torch.tensor(table, dtype=torch.long, device=self.device),
            context_len=context_len,
        )

    def _padded_blocks(self, request_id: RequestId, length: int) -> list[int]:
        blocks = self._requests[request_id].blocks[:length]
        return blocks + [0] * (length - len(blocks))


def _fold_groups(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Tq, n_kv * G, d] -> [B, n_kv, Tq * G, d]: each KV head's query rows together.

    Query heads are KV-head-major (q head h uses KV head h // G, as HF repeat_kv).
    """
    batch, num_queries, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    return (q.view(batch, num_queries, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
            .reshape(batch, num_kv_heads, num_queries * group, head_dim))


def _unfold_groups(out: torch.Tensor, num_queries: int) -> torch.Tensor:
    """The inverse of _fold_groups."""
    batch, num_kv_heads, rows, head_dim = out.shape
    group = rows // num_queries
    return out.view(batch, num_kv_heads, num_queries, group, head_dim).permute(0, 2, 1, 3, 4).reshape(
        batch, num_queries, num_kv_heads * group, head_dim
    )


def _allowed_keys(query_positions: torch.Tensor, group: int, context_len: int,
                  sliding_window: Optional[int]) -> torch.Tensor:
    """[B, Tq * G, C] bool: which keys each folded query row attends to (causal, sliding window)."""
    key_positions = torch.arange(context_len, device=query_positions.device)
    row_positions = query_positions.repeat_interleave(group, dim=1)[:, :, None]  # [B, Tq*G, 1]
    allowed = key_positions <= row_positions
    if sliding_window is not None:
        allowed &= key_positions > row_positions - sliding_window
    return allowed


def _grouped_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    sliding_window: Optional[int],
) -> torch.Tensor:
    """Causal GQA attention in float32 without materialising repeated K/V.

    q: [B, Tq, n_kv * G, d]; k, v: [B, C, n_kv, d] where key j sits at position
    j; query_positions: [B, Tq].  Returns [B, Tq, n_kv * G, d] float32.

    Each KV head is one independent [Tq*G, d] x [d, C] matmul in a batch of
    B * n_kv, and softmax is per row, so the result for a head does not depend
    on how many other heads are computed alongside it (head-split exactness).
    """
    num_queries, num_q_heads, head_dim = q.shape[1:]
    context_len, num_kv_heads = k.shape[1], k.shape[2]
    q_grouped = _fold_groups(q.float(), num_kv_heads)
    k_heads = k.float().permute(0, 2, 1, 3).contiguous()  # [B, kv, C, d]
    v_heads = v.float().permute(0, 2, 1, 3).contiguous()
    scores = torch.matmul(q_grouped, k_heads.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    allowed = _allowed_keys(query_positions, num_q_heads // num_kv_heads, context_len, sliding_window)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return _unfold_groups(torch.matmul(probs, v_heads), num_queries)  # from [B, kv, Tq*G, d]


def _sdpa_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    sliding_window: Optional[int],
) -> torch.Tensor:
    """The same attention as ``_grouped_causal_attention`` through torch's fused SDPA, in k's dtype.

    A group's query heads are folded into the query axis ([B, kv, Tq*G, d] against [B, kv, C, d]),
    so no kernel needs GQA support and K/V are never repeated; the boolean mask (True: attend)
    carries causality, the sliding window and the ragged context lengths.
    """
    num_queries, num_q_heads = q.shape[1], q.shape[2]
    context_len, num_kv_heads = k.shape[1], k.shape[2]
    allowed = _allowed_keys(query_positions, num_q_heads // num_kv_heads, context_len, sliding_window)
    out = F.scaled_dot_product_attention(_fold_groups(q.to(k.dtype), num_kv_heads), k.permute(0, 2, 1, 3),
                                         v.permute(0, 2, 1, 3), attn_mask=allowed[:, None])
    return _unfold_groups(out, num_queries)
