"""Sampling: parameter validation, top-k / top-p filtering, greedy, seed reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgumentError
from services.common.presets import GenerationSpec
from services.llm.sampling import (
    Penalties,
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    penalise_rows,
)


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
        (
            {"repetition_penalty": 0.0},
            "sampling.repetition_penalty: expected a number > 0 (1 disables it), got 0",
        ),
        ({"repetition_penalty": -1.0}, "sampling.repetition_penalty: expected a number > 0"),
        ({"repetition_penalty": math.inf}, "sampling.repetition_penalty: expected a number > 0"),
        ({"repetition_penalty": math.nan}, "sampling.repetition_penalty: expected a number > 0"),
        (
            {"presence_penalty": 2.01},
            "sampling.presence_penalty: expected in [-2, 2] (0 disables it), got 2.01",
        ),
        (
            {"frequency_penalty": -2.5},
            "sampling.frequency_penalty: expected in [-2, 2] (0 disables it), got -2.5",
        ),
        ({"frequency_penalty": math.nan}, "sampling.frequency_penalty: expected in [-2, 2]"),
        ({"stop_token_ids": (3, -1)}, "sampling.stop_token_ids[1]: expected a token id >= 0, got -1"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**{"max_tokens": 4, **kwargs})
    assert e.value.message.startswith(message)


def test_bounds_are_accepted() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0)
    SamplingParams(max_tokens=1, temperature=2.0, top_p=1e-6, top_k=1)
    SamplingParams(repetition_penalty=1e-3, presence_penalty=-2.0, frequency_penalty=2.0)


def test_resolve_takes_the_requests_value_then_the_presets_then_the_neutral_one() -> None:
    preset = GenerationSpec(temperature=0.2, top_p=0.9, max_tokens=150, repetition_penalty=1.2)
    request = SamplingParams(temperature=0.0, top_k=0, presence_penalty=0.5, seed=4, stop=("x",))
    resolved = request.resolve(preset, default_max_tokens=99)
    assert resolved == SamplingParams(
        max_tokens=150,
        temperature=0.0,  # the request's 0 is a value, not "unset"
        top_p=0.9,
        top_k=0,
        seed=4,
        stop=("x",),
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.0,
    )
    assert SamplingParams().resolve(GenerationSpec(), default_max_tokens=99) == SamplingParams(
        max_tokens=99,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
    )
    assert resolved.resolve(GenerationSpec(temperature=1.5)) == resolved  # idempotent
    assert resolved.penalised and not SamplingParams().resolve().penalised


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


# -- penalties ----------------------------------------------------------------------------------


def penalties(prompt: list[int], reply: list[int], **params: float) -> Penalties:
    memory = Penalties(SamplingParams(**params).resolve(), 6, prompt)
    for token in reply:
        memory.add(token)
    return memory


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_ids() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5, 0.0]])
    out = apply_penalties(logits, [penalties([1, 2, 2], [5], repetition_penalty=2.0)])
    assert out.tolist() == [[2.0, -2.0, 1.5, -4.0, 0.5, 0.0]]  # ids 1, 2 (prompt) and 5 (reply)
    assert logits.tolist() == [[2.0, -1.0, 3.0, -4.0, 0.5, 0.0]]  # the input is left alone
    out = apply_penalties(logits, [penalties([0, 3], [], repetition_penalty=0.5)])  # < 1 favours them
    assert out.tolist() == [[4.0, -1.0, 3.0, -2.0, 0.5, 0.0]]


def test_presence_and_frequency_penalties_count_the_reply_only() -> None:
    logits = torch.zeros(1, 6)
    out = apply_penalties(
        logits, [penalties([4, 4, 4], [1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)]
    )
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0, 0.0]]  # the prompt's id 4 is untouched
    out = apply_penalties(logits, [penalties([], [3, 3], presence_penalty=-1.0, frequency_penalty=-0.5)])
    assert out.tolist() == [[0.0, 0.0, 0.0, 2.0, 0.0, 0.0]]


def test_media_spans_and_skipped_ids_escape_the_repetition_penalty_only() -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0).resolve()
    memory = Penalties(params, 6, [1, 0, 0, 0, 2, 5], skip_spans=[(1, 3)], skip_ids=[5])
    assert memory.seen.tolist() == [False, True, True, False, False, False]  # ids 0 (media) and 5 left out
    memory.add(5)
    memory.add(0)
    out = apply_penalties(torch.full((1, 6), 4.0), [memory])
    assert out.tolist() == [[1.0, 2.0, 2.0, 4.0, 4.0, 3.0]]  # 5: presence only; 0: both (now in the reply)


def test_rows_of_a_batch_get_their_own_penalties() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen)  # (3, 50)
    rows = [
        Penalties(SamplingParams(repetition_penalty=1.3).resolve(), 50, [1, 2, 3, 4]),
        Penalties(SamplingParams(frequency_penalty=0.7, presence_penalty=-0.2).resolve(), 50, [5, 6]),
        Penalties(SamplingParams(repetition_penalty=0.9, presence_penalty=1.5).resolve(), 50, [7, 8, 9]),
    ]
    for i, row in enumerate(rows):
        for token in (10 + i, 10 + i, 20):
            row.add(token)
    together = apply_penalties(logits, rows)
    for i, row in enumerate(rows):
        assert torch.equal(together[i], apply_penalties(logits[i : i + 1], [row])[0])
    assert not torch.equal(together[0], logits[0]) and not torch.equal(together[1], logits[1])


def test_a_batch_step_penalises_only_its_penalised_rows() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1)).half()  # (3, 20)
    row = Penalties(SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5).resolve(), 20, [1, 2])
    row.add(3)
    out = penalise_rows(logits, [None, row, None])
    assert out.dtype == torch.float32
    assert torch.equal(out[1], apply_penalties(logits[1:2], [row])[0])
    assert torch.equal(out[[0, 2]], logits[[0, 2]].float())  # the others as they were
    assert penalise_rows(logits, [None, None, None]) is logits  # no row penalised: nothing done


def test_apply_penalties_works_in_float32_on_half_logits() -> None:
    logits = torch.tensor([[3.0, -3.0]], dtype=torch.float16)
    out = apply_penalties(logits, [Penalties(SamplingParams(repetition_penalty=3.0).resolve(), 2, [0, 1])])
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, -9.0]]
