"""Token selection: greedy, temperature and nucleus (top-p) sampling.

Sampling is reproducible per request: each request with a seed owns a
``torch.Generator`` seeded from it, so its draws do not depend on which other
requests share the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; ``temperature == 0`` means greedy.

    ``stop_token_ids``: generation ends after one of these tokens is emitted
    (the stop token is part of the output).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Accept any iterable of ids (lists from JSON) but store a tuple so the
        # params stay immutable and hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        for token in self.stop_token_ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids must be integers >= 0, got {token!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> Optional[torch.Generator]:
    """A generator seeded from ``params.seed``, or None (global RNG) when unseeded.

    It must live on the device of the logits it will sample from.
    """
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits [N, vocab]``; returns LongTensor[N].

    Row i uses ``params[i]`` and ``generators[i]`` (None: global RNG).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, vocab], got shape {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    if len(params) != num_rows:
        raise ValueError(f"got {len(params)} SamplingParams for {num_rows} logit rows")
    if generators is None:
        generators = [None] * num_rows
    if len(generators) != num_rows:
        raise ValueError(f"got {len(generators)} generators for {num_rows} logit rows")

    logits = logits.float()
    # Greedy rows are answered in one vectorised argmax; only sampled rows
    # need the per-row loop (each has its own generator).
    tokens = torch.argmax(logits, dim=-1)
    for row, row_params in enumerate(params):
        if not row_params.greedy:
            tokens[row] = _sample_row(logits[row], row_params, generators[row])
    return tokens


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = _nucleus(probs, params.top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)[0]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest high-probability prefix whose mass reaches top_p.

    The most likely token is always kept, so a tiny top_p degenerates to
    argmax; the stable sort breaks ties towards the lower token id, as argmax.
    """
    sorted_probs, sorted_ids = torch.sort(probs, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(0, sorted_ids, keep_sorted)
    kept = probs * keep
    return kept / kept.sum()
