"""Sampling: parameter validation, top-k / top-p filtering, greedy, seed reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgumentError
from services.llm.sampling import Sampler, SamplingParams, apply_top_k, apply_top_p


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "sampling.max_tokens: expected > 0, got 0"),
        ({"temperature": -1.0}, "sampling.temperature: expected in [0, 2], got -1"),
        ({"temperature": 2.5}, "sampling.temperature: expected in [0, 2], got 2.5"),
        ({"temperature": math.nan}, "sampling.temperature: expected in [0, 2], got nan"),
        ({"top_p": 0.0}, "sampling.top_p: expected in (0, 1], got 0"),
        ({"top_p": 1.5}, "sampling.top_p: expected in (0, 1], got 1.5"),
        ({"top_k": -1}, "sampling.top_k: expected >= 0"),
        ({"stop": ("ok", "")}, "sampling.stop[1]: must not be empty"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**{"max_tokens": 4, **kwargs})
    assert e.value.message.startswith(message)


def test_bounds_are_accepted() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0)
    SamplingParams(max_tokens=1, temperature=2.0, top_p=1e-6, top_k=1)


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits)).flatten().tolist()


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    assert kept(apply_top_k(logits, 2)) == [1, 3]
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 10), logits)


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.1, [2]), (0.5, [2]), (0.50001, [0, 2]), (0.8, [0, 2]), (0.81, [0, 2, 3]), (0.96, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_minimal_nucleus(p: float, expected: list[int]) -> None:
    probs = torch.tensor([0.3, 0.05, 0.5, 0.15])
    assert kept(apply_top_p(probs.log(), p)) == expected


def test_top_p_batched_rows_are_independent() -> None:
    probs = torch.tensor([[0.3, 0.05, 0.5, 0.15], [0.7, 0.1, 0.1, 0.1]])
    out = apply_top_p(probs.log(), 0.6)
    assert kept(out[0]) == [0, 2]
    assert kept(out[1]) == [0]


def test_greedy_is_argmax() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(max_tokens=1, temperature=0.0))(logits) == int(logits.argmax())


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature: float) -> None:
    """Found by tests/reliability/test_fuzz_rest.py: temperature 1e-45 made the logits infinite,
    the softmax NaN and torch.multinomial raise (a 500)."""
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 30
    params = SamplingParams(max_tokens=1, temperature=temperature, seed=1)
    assert params.greedy
    assert Sampler(params)(logits) == int(logits.argmax())


def test_top_k_one_equals_greedy() -> None:
    gen = torch.Generator().manual_seed(1)
    for seed in range(20):
        logits = torch.randn(512, generator=gen)
        sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.5, top_k=1, seed=seed))
        assert sampler(logits) == int(logits.argmax())


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = torch.zeros(512)  # uniform: every draw is up to the generator

    def draw(seed: int | None) -> list[int]:
        sampler = Sampler(SamplingParams(max_tokens=1, seed=seed))
        return [sampler(logits) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(None) != draw(None)


def test_sampling_respects_the_filters() -> None:
    logits = torch.tensor([2.0, 1.9, -5.0, 1.8, -5.0])
    sampler = Sampler(SamplingParams(max_tokens=1, top_k=3, top_p=0.5, seed=0))
    draws = {sampler(logits) for _ in range(200)}
    assert draws == {0, 1}
