"""Model tier of a Llama-family decoder, split around attention.

Per layer the model tier computes ``pre_attention`` (RMSNorm, Q/K/V
projections, rotary embedding) and ``post_attention`` (output projection,
residual, RMSNorm, SwiGLU FFN, residual); the attention tier
(``kvcache.PagedKVCache.attend``) sits in between and holds no weights.
``ModelTier.forward_step`` takes the attention as a callable, so a remote
attention tier plugs in without changing any shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence, Union

import torch
import torch.nn.functional as F

from lamina_comm.model.config import LlamaConfig
from lamina_comm.model.kvcache import HeadRange, RequestId
from lamina_comm.model.layers import apply_rotary, rms_norm, rope_inv_freq
from lamina_comm.model.weights import LayerWeights, LlamaWeights


@dataclass(frozen=True)
class HeadOutputs:
    """Where ``ModelTier.pre_attention_into`` writes one attention worker's heads.

    q [T, local q heads, head_dim], k and v [T, local kv heads, head_dim]:
    typically views of that worker's send slot, so nothing is copied to send.
    """

    kv_heads: HeadRange
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


# attend(layer, request_ids, positions, q, k, v) -> attention output [T, num_heads, head_dim]
AttendFn = Callable[[int, Sequence[RequestId], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
BatchEntry = tuple[RequestId, Sequence[int], int]  # (request_id, token_ids, start_position)


@dataclass(frozen=True)
class StepInputs:
    """One step's ragged batch flattened to per-token tensors.

    Both the monolithic and the disaggregated runtime build it with
    ``from_batch``, so the same batch gives the same token order and shapes.
    """

    request_ids: list[RequestId]  # [T], owner of each token
    token_ids: torch.Tensor  # [T] on the model device
    positions: torch.Tensor  # [T] on CPU: the attention tier plans with it
    last_token_index: torch.Tensor  # [N] index of each entry's last token, model device

    @classmethod
    def from_batch(
        cls, batch: Sequence[BatchEntry], vocab_size: int, device: Union[torch.device, str] = "cpu"
    ) -> "StepInputs":
        if not batch:
            raise ValueError("a step needs at least one batch entry")
        request_ids: list[RequestId] = []
        token_ids: list[int] = []
        positions: list[int] = []
        last_token_index: list[int] = []
        seen: set[Hashable] = set()
        for request_id, tokens, start in batch:
            _check_entry(request_id, tokens, start, vocab_size, seen)
            seen.add(request_id)
            request_ids.extend([request_id] * len(tokens))
            token_ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            last_token_index.append(len(token_ids) - 1)
        return cls(
            request_ids=request_ids,
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long),
            last_token_index=torch.tensor(last_token_index, dtype=torch.long, device=device),
        )


def _check_entry(request_id: RequestId, tokens: Sequence[int], start: int, vocab_size: int, seen: set) -> None:
    if request_id in seen:
        raise ValueError(f"request {request_id!r} appears twice in one step")
    if len(tokens) == 0:
        raise ValueError(f"request {request_id!r} has no tokens in this step")
    if start < 0:
        raise ValueError(f"request {request_id!r} start_position must be >= 0, got {start}")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"request {request_id!r} has token ids outside [0, {vocab_size}): {bad[:5]}")


class ModelTier:
    """The weight-holding half of each layer; see the module docstring."""

    def __init__(self, config: LlamaConfig, weights: LlamaWeights, device: Union[torch.device, str] = "cpu") -> None:
        if weights.config != config:
            raise ValueError(
                f"weights were built for config {weights.config.fingerprint()}, not {config.fingerprint()}"
            )
        self.config = config
        self.device = torch.device(device)
        self.weights = weights.to(self.device)
        self._inv_freq = rope_inv_freq(config).to(self.device)
        # Logits are computed in float32 (spec); keep the cast copy instead of
        # re-casting the [vocab, hidden] matrix every step.
        self._lm_head_f32 = self.weights.output_embedding.float()

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] -> hidden [T, hidden_size]."""
        return F.embedding(token_ids.to(self.device), self.weights.embed_tokens)

    @torch.inference_mode()
    def pre_attention(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input RMSNorm, Q/K/V projections and rotary embedding.

        Returns q [T, num_heads, head_dim], k and v [T, num_kv_heads, head_dim].
        """
        weights = self._layer(layer)
        num_tokens, head_dim = hidden.shape[0], self.config.head_dim
        normed = rms_norm(hidden, weights.input_norm, self.config.rms_norm_eps)
        q = F.linear(normed, weights.q_proj, weights.q_bias).view(num_tokens, self.config.num_heads, head_dim)
        k = F.linear(normed, weights.k_proj, weights.k_bias).view(num_tokens, self.config.num_kv_heads, head_dim)
        v = F.linear(normed, weights.v_proj, weights.v_bias).view(num_tokens, self.config.num_kv_heads, head_dim)
        cos, sin = self._rotary(positions, hidden.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    @torch.inference_mode()
    def pre_attention_into(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                           destinations: Sequence[HeadOutputs]) -> None:
        """``pre_attention`` with each worker's heads written straight into its buffers.

        Bit for bit what ``pre_attention`` and ``slice_heads`` give: q and k are
        projected whole and the rotary's last (elementwise) op writes each head
        slice into place; v, which has no rotary, is projected per destination
        from its weight rows with ``out=`` (each output element is the same dot
        product; tests/node check the parity on every run).
        """
        weights = self._layer(layer)
        config = self.config
        num_tokens, head_dim, group = hidden.shape[0], config.head_dim, config.group_size
        normed = rms_norm(hidden, weights.input_norm, config.rms_norm_eps)
        q = F.linear(normed, weights.q_proj, weights.q_bias).view(num_tokens, config.num_heads, head_dim)
        k = F.linear(normed, weights.k_proj, weights.k_bias).view(num_tokens, config.num_kv_heads, head_dim)
        cos, sin = self._rotary(positions, hidden.dtype)
        for dest in destinations:
            start, end = dest.kv_heads
            apply_rotary(q[:, start * group:end * group], cos, sin, out=dest.q)
            apply_rotary(k[:, start:end], cos, sin, out=dest.k)
            rows = slice(start * head_dim, end * head_dim)
            v_out = dest.v.view(num_tokens, (end - start) * head_dim)
            if weights.v_bias is None:
                torch.mm(normed, weights.v_proj[rows].t(), out=v_out)
            else:
                torch.addmm(weights.v_bias[rows], normed, weights.v_proj[rows].t(), out=v_out)

    @torch.inference_mode()
    def post_attention(self, layer: int, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Output projection + residual, post-attention RMSNorm, SwiGLU FFN + residual.

        ``hidden`` is the layer input (the residual stream), as in HF Llama.
        """
        weights = self._layer(layer)
        attn = F.linear(attn_out.reshape(hidden.shape[0], -1).to(hidden.dtype), weights.o_proj)
        residual = hidden + attn
        normed = rms_norm(residual, weights.post_attention_norm, self.config.rms_norm_eps)
        gated = F.silu(F.linear(normed, weights.gate_proj)) * F.linear(normed, weights.up_proj)
        return residual + F.linear(gated, weights.down_proj)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm + LM head, in float32: [T, hidden] -> [T, vocab]."""
        normed = rms_norm(hidden, self.weights.norm, self.config.rms_norm_eps)
        return F.linear(normed.float(), self._lm_head_f32)

    @torch.inference_mode()
    def forward_step(self, step: StepInputs, attend: AttendFn) -> torch.Tensor:
        """Run every layer of one step; returns float32 logits [N, vocab] of each entry's last token.

        ``attend`` receives all heads; a disaggregated runtime splits them
        across attention workers (``kvcache.slice_heads``) and concatenates.
        """
        hidden = self.embed(step.token_ids)
        for layer in range(self.config.num_layers):
            q, k, v = self.pre_attention(layer, hidden, step.positions)
            attn_out = attend(layer, step.request_ids, step.positions, q, k, v)
            hidden = self.post_attention(layer, hidden, attn_out)
        return self.logits(hidden.index_select(0, step.last_token_index))

    def _layer(self, layer: int) -> LayerWeights:
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.config.num_layers})")
        return self.weights.layers[layer]

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(self.device).float()[:, None] * self._inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
