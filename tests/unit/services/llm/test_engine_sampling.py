"""The engine's sampling side: the preset's `generation:` defaults under a request's values,
penalties (alone, against Hugging Face's generate and a reference loop, and per row of a
continuous batch), stop token ids and the preset's text rules (stop text kept, last tokens
dropped, the reply decoded alone, stripped)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from services.common.content import MediaFeatures, MediaPart, TextPart, TimePart, Turn
from services.common.errors import InvalidArgumentError
from services.common.presets import GenerationSpec
from services.llm.domain import FinishReason, GenerationEvent, GenerationRequest
from services.llm.engine import Engine
from services.llm.sampling import SamplingParams
from services.models.lm.loading import LoadedModel


def with_generation(loaded: LoadedModel, **fields: Any) -> LoadedModel:
    """The shared tiny model served under a preset whose `generation:` section is `fields`."""
    spec = GenerationSpec.model_validate(fields)
    return dataclasses.replace(loaded, preset=loaded.preset.model_copy(update={"generation": spec}))


@contextlib.contextmanager
def serving(loaded: LoadedModel, **options: Any) -> Iterator[Engine]:
    engine = Engine(loaded, **options)
    try:
        yield engine
    finally:
        engine.close()


@contextlib.contextmanager
def never_ends(loaded: LoadedModel) -> Iterator[None]:
    """Push the EOS logit far down, so replies run to their budget or stop."""
    lm_head = loaded.model.lm.lm_head
    original = lm_head.bias
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features), requires_grad=False)
    for eos in loaded.eos_ids:
        lm_head.bias.data[eos] = -1e4
    try:
        yield
    finally:
        lm_head.bias = original


def text_request(question: str = "Tell me about the sea", **sampling: Any) -> GenerationRequest:
    return GenerationRequest(turns=[Turn("user", [TextPart(question)])], sampling=SamplingParams(**sampling))


def image_request(question: str = "What is this?", **sampling: Any) -> GenerationRequest:
    features = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))  # (16, 64)
    return GenerationRequest(
        turns=[Turn("user", [MediaPart(MediaFeatures("image", features)), TextPart(question)])],
        sampling=SamplingParams(**sampling),
    )


async def run(engine: Engine, request: GenerationRequest) -> list[GenerationEvent]:
    return [e async for e in engine.generate(request)]


def ids_of(events: list[GenerationEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events)


# -- the preset's defaults ---------------------------------------------------------------------


async def test_unset_fields_take_the_presets_generation_values_and_a_requests_own_win(
    loaded: LoadedModel,
) -> None:
    preset_loaded = with_generation(loaded, max_tokens=5, temperature=0.0, top_k=3)
    with never_ends(loaded), serving(preset_loaded) as engine, serving(loaded) as plain:
        defaults = engine.info().sampling_defaults
        assert defaults is not None
        assert (defaults.max_tokens, defaults.temperature, defaults.top_p, defaults.top_k) == (5, 0.0, 1.0, 3)
        by_preset = await run(engine, image_request())
        explicit = await run(plain, image_request(max_tokens=5, temperature=0.0))
        assert ids_of(by_preset) == ids_of(explicit) and len(ids_of(by_preset)) == 5
        assert len(ids_of(await run(engine, image_request(max_tokens=2)))) == 2  # the request's own wins
        job = engine.prepare(image_request(temperature=0.7, top_k=0))
        assert (job.request.sampling.temperature, job.request.sampling.top_k) == (0.7, 0)  # 0 is a value
        assert job.budget == 5


async def test_without_a_preset_value_max_tokens_is_the_services_default(loaded: LoadedModel) -> None:
    with never_ends(loaded), serving(loaded, default_max_tokens=3) as engine:
        events = await run(engine, image_request(temperature=0.0))
        assert len(ids_of(events)) == 3 and events[-1].finish_reason is FinishReason.LENGTH
        neutral = engine.info().sampling_defaults
        assert neutral == SamplingParams(
            max_tokens=3,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )


# -- stop token ids and the text rules ---------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_reply(loaded: LoadedModel) -> list[int]:
    """12 greedy tokens of `image_request()` that never stop on their own."""
    with never_ends(loaded), serving(loaded) as engine:
        return ids_of(asyncio.run(run(engine, image_request(max_tokens=12, temperature=0.0))))


def first_new(ids: list[int], start: int) -> int:
    """The first position at or after `start` whose id did not occur before it."""
    return next(k for k in range(start, len(ids)) if ids[k] not in ids[:k])


async def greedy_text(
    loaded: LoadedModel, max_tokens: int, eos_ids: frozenset[int] | None = None, **generation: Any
) -> str:
    """The greedy reply's text under a `generation:` section (`eos_ids`: other end-of-sequence ids)."""
    served = with_generation(loaded, **generation)
    if eos_ids is not None:
        served = dataclasses.replace(served, eos_ids=eos_ids)
    with never_ends(loaded), serving(served) as engine:
        return text_of(await run(engine, image_request(max_tokens=max_tokens, temperature=0.0)))


async def test_a_presets_stop_token_id_ends_the_reply_without_its_text(
    loaded: LoadedModel, greedy_reply: list[int]
) -> None:
    k = first_new(greedy_reply, 4)
    stop = greedy_reply[k]
    with never_ends(loaded), serving(with_generation(loaded, stop_token_ids=[stop])) as engine:
        events = await run(engine, image_request(max_tokens=12, temperature=0.0))
        assert engine.info().sampling_defaults.stop_token_ids == (stop,)  # type: ignore[union-attr]
    assert ids_of(events) == greedy_reply[: k + 1]
    last = events[-1]
    assert (last.finish_reason, last.stop_token_id, last.stop_reason) == (FinishReason.STOP, stop, None)
    assert text_of(events) == await greedy_text(loaded, k)  # the stop token's text is left out


async def test_a_requests_stop_token_ids_join_the_presets(
    loaded: LoadedModel, greedy_reply: list[int]
) -> None:
    k = first_new(greedy_reply, 3)
    far = first_new(greedy_reply, k + 1)
    with never_ends(loaded), serving(with_generation(loaded, stop_token_ids=[greedy_reply[far]])) as engine:
        events = await run(
            engine, image_request(max_tokens=12, temperature=0.0, stop_token_ids=(greedy_reply[k],))
        )
    assert ids_of(events) == greedy_reply[: k + 1] and events[-1].stop_token_id == greedy_reply[k]


async def test_include_stop_str_in_output_keeps_the_stop_tokens_text(
    loaded: LoadedModel, greedy_reply: list[int]
) -> None:
    k = first_new(greedy_reply, 4)
    kept = await greedy_text(loaded, 12, stop_token_ids=[greedy_reply[k]], include_stop_str_in_output=True)
    assert kept == await greedy_text(loaded, k + 1)


@pytest.mark.parametrize("ending", ["stop token", "length", "end of sequence"])
async def test_drop_last_tokens_leaves_out_the_last_n_tokens_whatever_ended_the_reply(
    loaded: LoadedModel, greedy_reply: list[int], ending: str
) -> None:
    """PandaGPT's decode(outputs[0][:-2]): the stop token and the one before it, or the last two
    tokens of a reply cut by length, or the end-of-sequence token and the one before it."""
    k = first_new(greedy_reply, 5)
    if ending == "stop token":
        text = await greedy_text(loaded, 12, stop_token_ids=[greedy_reply[k]], drop_last_tokens=2)
    elif ending == "length":
        text = await greedy_text(loaded, k + 1, drop_last_tokens=2)
    else:  # the k-th token ends the reply as end-of-sequence
        text = await greedy_text(loaded, 12, eos_ids=frozenset({greedy_reply[k]}), drop_last_tokens=2)
    assert text == await greedy_text(loaded, k - 1)


async def test_decode_reply_alone_and_strip_give_what_decoding_the_reply_ids_gives(
    loaded: LoadedModel, greedy_reply: list[int]
) -> None:
    alone = await greedy_text(loaded, 12, decode_reply_alone=True)
    assert alone == loaded.tokenizer.decode(greedy_reply, skip_special_tokens=True)
    in_context = await greedy_text(loaded, 12)
    assert await greedy_text(loaded, 12, strip=True) == in_context.strip()
    assert await greedy_text(loaded, 12, strip=True, decode_reply_alone=True) == alone.strip()


async def test_strip_holds_trailing_whitespace_until_text_follows(loaded: LoadedModel) -> None:
    """Streamed: no event carries whitespace that a later event would have to take back."""
    with never_ends(loaded), serving(with_generation(loaded, strip=True)) as engine:
        events = await run(engine, image_request(max_tokens=24, temperature=0.0))
    full = text_of(events)
    assert full == full.strip()
    sent = ""
    for e in events:
        sent += e.text
        assert not sent or not sent[0].isspace()


# -- penalties ----------------------------------------------------------------------------------


async def test_repetition_penalty_matches_hugging_faces_generate(loaded: LoadedModel) -> None:
    """A text-only prompt (no media positions): the engine's greedy reply with repetition_penalty
    is Hugging Face's `generate(..., repetition_penalty=...)` over the same prompt ids."""
    lm, replies = loaded.model.lm, []
    for penalty in (1.5, 0.7, 1.0):
        with serving(loaded) as engine:
            request = text_request(max_tokens=16, temperature=0.0, repetition_penalty=penalty)
            prompt = engine.prepare(request).prompt.input_ids
            ours = ids_of(await run(engine, request))
        replies.append(ours)
        with torch.inference_mode():
            out = lm.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=16,
                do_sample=False,
                repetition_penalty=penalty,
                eos_token_id=sorted(loaded.eos_ids),
                pad_token_id=sorted(loaded.eos_ids)[0],
            )
        assert ours == out[0, len(prompt) :].tolist()
    assert len({tuple(r) for r in replies}) == 3  # each penalty changed the reply


def reference_penalised(
    loaded: LoadedModel, prompt: list[int], n: int, presence: float, frequency: float
) -> list[int]:
    """Greedy decoding re-running the LM on the whole sequence, with OpenAI's penalties applied
    by a plain loop over the reply's tokens."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = loaded.model.lm(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()  # (V,)
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            out.append(int(logits.argmax()))
            if out[-1] in loaded.eos_ids:
                break
    return out


async def test_presence_and_frequency_penalties_match_a_reference_loop(loaded: LoadedModel) -> None:
    with serving(loaded) as engine:
        request = text_request(max_tokens=16, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.75)
        prompt = engine.prepare(request).prompt.input_ids
        ours = ids_of(await run(engine, request))
    assert ours == reference_penalised(loaded, prompt, 16, presence=1.5, frequency=0.75)


PENALISED = [
    {"repetition_penalty": 1.4},
    {"presence_penalty": 1.0, "frequency_penalty": 0.7},
    {},
    {"repetition_penalty": 0.8, "temperature": 0.9, "seed": 3},
    {"frequency_penalty": -0.5, "repetition_penalty": 1.2},
]


async def test_rows_with_different_penalties_decode_together_as_they_do_alone(loaded: LoadedModel) -> None:
    requests = [image_request(max_tokens=14, **{"temperature": 0.0, **p}) for p in PENALISED]
    with never_ends(loaded), serving(loaded) as engine:
        alone = [ids_of(await run(engine, r)) for r in requests]
        together = [ids_of(e) for e in await asyncio.gather(*(run(engine, r) for r in requests))]
    assert together == alone
    assert len({tuple(a) for a in alone}) == len(requests)  # each penalty changed the same prompt's reply


def test_the_repetition_penalty_skips_media_positions_and_the_timestamp_token(
    twin_model: Callable[[str], LoadedModel],
) -> None:
    """As E.T. Chat's processor leaves out -200 and <vid>: the placeholder ids of the expanded
    media span and the time token are never penalised, though both are in the prompt."""
    loaded = twin_model("tiny-etchat")
    time_token = loaded.time_token_id
    assert time_token is not None
    frames = torch.randn(3 * 4, 32, generator=torch.Generator().manual_seed(1))  # (3 frames x 4, 32)
    request = GenerationRequest(
        turns=[
            Turn(
                "user",
                [
                    MediaPart(MediaFeatures("video", frames, (0.0, 1.0, 2.0))),
                    TextPart("when does"),
                    TimePart(1.0),
                    TextPart("happen?"),
                ],
            )
        ],
        sampling=SamplingParams(max_tokens=4, repetition_penalty=1.3),
    )
    with serving(loaded) as engine:
        job = engine.prepare(request)
        ids = job.prompt.input_ids
        assert time_token in ids
        (start, length), *_ = job.prompt.media_spans
        placeholder = ids[start]
        assert placeholder not in ids[:start] + ids[start + length :]
        penalties = engine.runner.penalties(job, torch.zeros(1, 1, engine.vocab_size))
    assert penalties is not None
    assert not penalties.seen[placeholder] and not penalties.seen[time_token]
    assert penalties.seen[[i for i in ids if i not in (placeholder, time_token)]].all()
    penalties.add(time_token)
    assert not penalties.seen[time_token] and penalties.counts[time_token] == 1


# -- bad input ----------------------------------------------------------------------------------


def test_a_stop_token_id_outside_the_vocabulary_is_refused_by_name(loaded: LoadedModel) -> None:
    vocab = int(loaded.model.lm.config.vocab_size)
    with serving(loaded) as engine, pytest.raises(InvalidArgumentError) as e:
        engine.prepare(image_request(stop_token_ids=(5, vocab)))
    assert e.value.message == (
        f"sampling.stop_token_ids[1]: expected a token id in [0, {vocab}) (the LLM's vocabulary), got {vocab}"
    )
    with pytest.raises(InvalidArgumentError) as e:
        Engine(with_generation(loaded, stop_token_ids=[vocab + 7]))
    assert e.value.message.startswith(
        f"preset tiny: generation.stop_token_ids[0]: expected a token id in [0, {vocab})"
    )
