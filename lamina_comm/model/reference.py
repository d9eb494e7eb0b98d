"""``MonolithicModel``: the model tier and one local cache holding all KV heads, in one process.

It runs the same functions in the same order as the disaggregated runtime
(``ModelTier.forward_step`` with ``PagedKVCache.attend`` as the attention),
so it is the parity reference for it.
"""

from __future__ import annotations

import itertools
from typing import Sequence, Union

import torch

from lamina_comm.model.config import LlamaConfig
from lamina_comm.model.kvcache import PagedKVCache, RequestId
from lamina_comm.model.model_tier import BatchEntry, ModelTier, StepInputs
from lamina_comm.model.sampling import SamplingParams, make_generator, sample
from lamina_comm.model.weights import LlamaWeights


class MonolithicModel:
    """Model tier + one local cache holding all KV heads: the parity reference."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: LlamaWeights,
        device: Union[torch.device, str] = "cpu",
        num_blocks: int = 256,
        block_size: int = 16,
        attention: str = "auto",
    ) -> None:
        self.config = config
        self.tier = ModelTier(config, weights, device)
        self.device = self.tier.device
        self.cache = PagedKVCache(config, 0, config.num_kv_heads, num_blocks, block_size, self.device,
                                  attention=attention)
        self._generate_ids = itertools.count()

    def add_request(self, request_id: RequestId, max_tokens: int) -> None:
        """Reserve KV space for positions 0 .. max_tokens-1 (raises KVCacheFull)."""
        self.cache.reserve(request_id, max_tokens)

    def finish_request(self, request_id: RequestId) -> None:
        self.cache.free(request_id)

    def step(self, batch: Sequence[BatchEntry]) -> torch.Tensor:
        """One ragged step of (request_id, token_ids, start_position) entries.

        Returns float32 logits [len(batch), vocab] of each entry's last token.
        """
        step = StepInputs.from_batch(batch, self.config.vocab_size, self.device)
        return self.tier.forward_step(step, self.cache.attend)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
    ) -> list[list[int]]:
        """Generate for all prompts together (one prefill step, then batched decodes).

        ``params`` (one for all, or one per prompt; default greedy, 16 tokens)
        carries max_tokens, temperature, top_p, seed and stop tokens.  Returns
        the generated token ids per prompt, a stop token included.
        """
        per_prompt = _params_per_prompt(params, len(prompts))
        request_ids = [("generate", next(self._generate_ids)) for _ in prompts]
        self._reserve_all(request_ids, prompts, per_prompt)
        try:
            return self._generate_reserved(request_ids, prompts, per_prompt)
        finally:
            for request_id in request_ids:
                self.cache.free(request_id)

    def _reserve_all(
        self, request_ids: list[RequestId], prompts: Sequence[Sequence[int]], params: list[SamplingParams]
    ) -> None:
        """Admit every prompt or none, before any compute."""
        reserved: list[RequestId] = []
        try:
            for request_id, prompt, prompt_params in zip(request_ids, prompts, params):
                if not prompt:
                    raise ValueError("prompts must not be empty")
                # The last generated token is never fed back, hence the - 1.
                self.cache.reserve(request_id, len(prompt) + prompt_params.max_tokens - 1)
                reserved.append(request_id)
        except BaseException:
            for request_id in reserved:
                self.cache.free(request_id)
            raise

    def _generate_reserved(
        self, request_ids: list[RequestId], prompts: Sequence[Sequence[int]], params: list[SamplingParams]
    ) -> list[list[int]]:
        generators = [make_generator(p, self.device) for p in params]
        outputs: list[list[int]] = [[] for _ in prompts]
        index_of = {request_id: i for i, request_id in enumerate(request_ids)}
        batch: list[BatchEntry] = [(rid, list(prompt), 0) for rid, prompt in zip(request_ids, prompts)]
        while batch:
            rows = [index_of[entry[0]] for entry in batch]
            logits = self.step(batch)
            tokens = sample(logits, [params[i] for i in rows], [generators[i] for i in rows]).tolist()
            next_batch: list[BatchEntry] = []
            for i, token in zip(rows, tokens):
                outputs[i].append(token)
                finished = len(outputs[i]) >= params[i].max_tokens or token in params[i].stop_token_ids
                if not finished:
                    next_batch.append((request_ids[i], [token], len(prompts[i]) + len(outputs[i]) - 1))
            batch = next_batch
        return outputs


def _params_per_prompt(
    params: Union[SamplingParams, Sequence[SamplingParams], None], num_prompts: int
) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams(temperature=0.0)
    if isinstance(params, SamplingParams):
        return [params] * num_prompts
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts")
    return list(params)
