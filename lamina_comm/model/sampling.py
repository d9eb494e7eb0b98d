"""Token selection: greedy, temperature and nucleus (top-p) sampling.

Sampling is reproducible per request: each request with a seed owns a
``torch.Generator`` seeded from it, so its draws do not depend on which other
requests share the batch.

Any finite temperature > 0 is well defined, however small: the logits are
shifted by their maximum and scaled in float64, so every exponent is <= 0 and
a tiny temperature drives the distribution towards argmax (never NaN/inf). A
row that still cannot be sampled (non-finite logits) raises ``SamplingError``
for that row only (``sample_each``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from lamina_comm.errors import LaminaError

_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts [0, 2**64)


class SamplingError(LaminaError):
    """One row of logits could not be sampled (e.g. the model produced NaN)."""


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
    # Log-probabilities to return per generated token: None for none, k >= 0 for the
    # chosen token's and the k most likely ones' (of the model's distribution, before
    # temperature and top-p, as vLLM returns them by default).
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        # Accept any iterable of ids (lists from JSON) but store a tuple so the
        # params stay immutable and hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()
        # Validated as finite, so the conversion cannot overflow; floats from here on.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        temperature = _finite_number("temperature", self.temperature)
        if temperature is None or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {_shown(self.temperature)}")
        top_p = _finite_number("top_p", self.top_p)
        if top_p is None or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {_shown(self.top_p)}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {_shown(self.max_tokens)}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {_shown(self.seed)}")
        for token in self.stop_token_ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids must be integers >= 0, got {_shown(token)}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {_shown(self.logprobs)}")


MAX_LOGPROBS = 20


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under one row of logits [vocab], and the ``top`` most likely
    tokens with theirs (float32 log-softmax of the raw logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, min(top, logp.shape[-1])) if top > 0 else None
    alternatives = [] if best is None else [(int(i), float(v)) for v, i in zip(best.values.tolist(),
                                                                               best.indices.tolist())]
    return float(logp[token]), alternatives


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object, limit: int = 40) -> str:
    """repr cut to ``limit`` characters: error messages echo hostile values, not megabytes of digits."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _finite_number(name: str, value: object) -> Optional[float]:
    """``value`` as a float, None when it is not finite; ValueError when it is not a number.

    An int too large for a float (JSON allows 1000-digit integers) is not finite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


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

    Row i uses ``params[i]`` and ``generators[i]`` (None: global RNG). Raises
    the first row's SamplingError; ``sample_each`` keeps the other rows.
    """
    outcomes = sample_each(logits, params, generators)
    for outcome in outcomes:
        if isinstance(outcome, SamplingError):
            raise outcome
    return torch.tensor(outcomes, dtype=torch.long, device=logits.device)


def sample_each(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
) -> list[int | SamplingError]:
    """One token id per row of ``logits [N, vocab]``, or that row's SamplingError.

    A row that cannot be sampled does not affect the others: a batch serves
    many requests, and one request's failure must stay its own.
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
    # Greedy rows are answered in one vectorised argmax and one finiteness
    # check; only sampled rows need the per-row loop (each has its own generator).
    greedy_tokens = torch.argmax(logits, dim=-1).tolist()
    usable = _usable_rows(logits).tolist()
    outcomes: list[int | SamplingError] = []
    for row, row_params in enumerate(params):
        if not usable[row]:
            outcomes.append(SamplingError(f"logits row {row} is not finite (NaN or +inf, or all -inf)"))
        elif row_params.greedy:
            outcomes.append(int(greedy_tokens[row]))
        else:
            outcomes.append(_sample_row_safely(logits[row], row_params, generators[row]))
    return outcomes


def _usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows with no NaN and a finite maximum (-inf entries alone are fine: masked tokens)."""
    return ~torch.isnan(logits).any(dim=-1) & torch.isfinite(logits.max(dim=-1).values)


def _sample_row_safely(logits: torch.Tensor, params: SamplingParams,
                       generator: Optional[torch.Generator]) -> int | SamplingError:
    try:
        return int(_sample_row(logits, params, generator))
    except Exception as exc:  # noqa: BLE001 - torch refused the distribution, or a bug: this row's failure only
        return SamplingError(f"sampling failed (temperature {params.temperature}, top_p {params.top_p}): {exc}")


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    # Shift by the maximum before scaling: every exponent is <= 0 and the
    # maximum's is exactly 0, so no temperature > 0 can produce inf - inf or
    # 0 / 0. float64 keeps temperatures down to 5e-324 from rounding to zero.
    shifted = logits.double() - logits.max()
    probs = torch.softmax(shifted / params.temperature, dim=-1)
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
