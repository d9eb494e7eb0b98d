"""Greedy, temperature and top-p sampling; parameter validation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lamina_comm.model import SamplingParams, make_generator, sample  # noqa: E402


def random_logits(rows: int = 6, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits()
    tokens = sample(logits, [SamplingParams(temperature=0)] * 6)
    assert tokens.dtype == torch.long
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_ignores_generators_and_half_precision_logits():
    logits = random_logits().to(torch.bfloat16)
    tokens = sample(logits, [SamplingParams(temperature=0, seed=1)] * 6, [torch.Generator()] * 6)
    assert torch.equal(tokens, logits.float().argmax(dim=-1))


@pytest.mark.parametrize("seed", range(5))
def test_tiny_top_p_is_argmax(seed):
    logits = random_logits(seed=seed)
    params = [SamplingParams(temperature=1.0, top_p=1e-6, seed=seed)] * 6
    tokens = sample(logits, params, [make_generator(p) for p in params])
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_p_keeps_only_the_nucleus():
    # probabilities 0.4, 0.3, 0.2, 0.1: the smallest prefix reaching 0.5 is {0, 1}
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    generator = make_generator(params)
    seen = {int(sample(logits, [params], [generator])) for _ in range(200)}
    assert seen == {0, 1}


def test_full_top_p_samples_every_token_eventually():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    params = SamplingParams(temperature=1.0, top_p=1.0, seed=0)
    generator = make_generator(params)
    counts = torch.bincount(torch.stack([sample(logits, [params], [generator])[0] for _ in range(2000)]), minlength=4)
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)  # frequency follows probability
    assert (counts > 0).all()


def test_low_temperature_concentrates_on_argmax():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    params = SamplingParams(temperature=0.01, seed=3)
    generator = make_generator(params)
    assert all(int(sample(logits, [params], [generator])) == 0 for _ in range(50))


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates():
    logits = random_logits(rows=3)
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s) for s in (11, 12, 13)]

    def draw(rows: list[int], steps: int = 10) -> list[list[int]]:
        generators = [make_generator(params[r]) for r in rows]
        return [sample(logits[rows], [params[r] for r in rows], generators).tolist() for _ in range(steps)]

    together = draw([0, 1, 2])
    assert together == draw([0, 1, 2])
    alone = draw([1])
    assert [step[1] for step in together] == [step[0] for step in alone]
    assert len({tuple(step) for step in together}) > 1  # it is actually sampling


def test_unseeded_params_use_the_global_rng():
    assert make_generator(SamplingParams()) is None


def test_stop_token_ids_become_a_tuple():
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature must be finite and >= 0"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
        ({"seed": -1}, "seed must be None or an integer"),
        ({"seed": 2**64}, "seed must be None or an integer"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids must be integers >= 0"),
    ],
)
def test_invalid_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_validate_can_be_called_explicitly():
    SamplingParams(temperature=0.0, top_p=1.0, max_tokens=1, seed=0).validate()


def test_sample_checks_argument_lengths():
    logits = random_logits(rows=2)
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 logit rows"):
        sample(logits, [SamplingParams()])
    with pytest.raises(ValueError, match="got 1 generators for 2 logit rows"):
        sample(logits, [SamplingParams()] * 2, [None])
    with pytest.raises(ValueError, match=r"logits must be \[N, vocab\]"):
        sample(logits[0], [SamplingParams()])
