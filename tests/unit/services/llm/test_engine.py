"""The engine: KV-cache decode parity, sampling, stops, limits, isolation and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.errors import InvalidArgumentError, NotFoundError, UnavailableError
from services.llm.domain import FinishReason, GenerationEvent, GenerationRequest
from services.llm.engine import Engine
from services.llm.sampling import SamplingParams
from services.models.lm.loading import LoadedModel
from services.models.prompt.builder import PromptBuilder


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    engine = Engine(loaded)
    yield engine
    engine.close()


def features(seed: int = 0) -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))  # (16, 64)


def request(question: str = "What is this?", image_seed: int = 0, **sampling: object) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(
        turns=[Turn("user", [MediaPart(MediaFeatures("image", features(image_seed))), TextPart(question)])],
        sampling=params,
    )


async def run(engine: Engine, req: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in engine.generate(req)]


def token_ids(events: list[GenerationEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def text(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events)


def reference_greedy(engine: Engine, req: GenerationRequest) -> list[int]:
    """Greedy decoding that re-runs the LM on the whole sequence each step, without a cache."""
    loaded = engine.loaded
    job = engine.prepare(req)
    table = loaded.model.lm.get_input_embeddings()
    out: list[int] = []
    with torch.inference_mode():
        prompt = loaded.model.embed(job.prompt.input_ids, job.prompt.media_spans, req.media)  # (1, L, D)
        for _ in range(job.budget):
            generated = table(torch.tensor([out], dtype=torch.long))  # (1, n, D)
            logits = loaded.model.lm(inputs_embeds=torch.cat([prompt, generated], 1)).logits  # (1, L+n, V)
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in loaded.eos_ids:
                break
    return out


async def test_greedy_matches_uncached_reference(engine: Engine) -> None:
    for seed, question in [(0, "What is this?"), (1, "Describe the picture"), (2, "colour?")]:
        req = request(question, image_seed=seed, max_tokens=40)
        events = await run(engine, req)
        assert token_ids(events) == reference_greedy(engine, req)
        assert token_ids(await run(engine, req)) == token_ids(events)  # deterministic


async def test_events_stream_text_and_end_with_usage(engine: Engine) -> None:
    req = request(max_tokens=30)
    events = await run(engine, req)
    assert events[0].adapter == "tiny@1"
    assert all(e.adapter is None for e in events[1:])
    assert all(e.finish_reason is None and e.usage is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason is not None and last.usage is not None
    prompt = engine.prepare(req).prompt
    assert last.usage.prompt_tokens == len(prompt.input_ids) == 57  # 16 of them for the image
    assert last.usage.completion_tokens == len(token_ids(events))
    decoded = engine.loaded.tokenizer.decode(token_ids(events), skip_special_tokens=True)
    assert text(events) == decoded


async def test_max_tokens_gives_length(engine: Engine) -> None:
    events = await run(engine, request(max_tokens=5))
    assert events[-1].finish_reason == FinishReason.LENGTH
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 5


async def test_context_limit_gives_length(loaded: LoadedModel) -> None:
    builder = PromptBuilder(loaded.tokenizer, loaded.prompt_builder.modalities, max_context_tokens=60)
    small = Engine(dataclasses.replace(loaded, prompt_builder=builder, max_context_tokens=60))
    try:
        events = await run(small, request(max_tokens=100))  # prompt: 57 tokens
        assert events[-1].finish_reason == FinishReason.LENGTH
        assert events[-1].usage is not None and events[-1].usage.completion_tokens == 3
    finally:
        small.close()


@contextlib.contextmanager
def eos_bias(engine: Engine, value: float) -> Iterator[int]:
    """Add `value` to the EOS logit (1e4: always end at once; -1e4: never end)."""
    eos = next(iter(engine.loaded.eos_ids))
    lm_head = engine.loaded.model.lm.lm_head
    original = lm_head.bias
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features), requires_grad=False)
    lm_head.bias.data[eos] = value
    try:
        yield eos
    finally:
        lm_head.bias = original


async def test_eos_gives_stop(engine: Engine) -> None:
    with eos_bias(engine, 1e4) as eos:
        events = await run(engine, request())
    assert token_ids(events) == [eos]
    assert (events[-1].finish_reason, events[-1].stop_reason, text(events)) == (FinishReason.STOP, None, "")


async def test_stop_string_cuts_before_it(engine: Engine) -> None:
    full = text(await run(engine, request(max_tokens=40)))
    stop = full[10:16]
    assert len(full) > 16 and stop.strip()
    events = await run(engine, request(max_tokens=40, stop=(stop, "never-there")))
    assert text(events) == full[: full.index(stop)]
    assert (events[-1].finish_reason, events[-1].stop_reason) == (FinishReason.STOP, stop)


async def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    def sampled(seed: int) -> GenerationRequest:
        return request(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed)

    first = token_ids(await run(engine, sampled(5)))
    assert token_ids(await run(engine, sampled(5))) == first
    assert token_ids(await run(engine, sampled(6))) != first


async def test_adapter_field(engine: Engine) -> None:
    for ref in ("", "tiny", "tiny@1"):
        req = dataclasses.replace(request(max_tokens=1), adapter=ref)
        assert (await run(engine, req))[0].adapter == "tiny@1"
    with pytest.raises(NotFoundError, match=r"adapter 'tiny@2' is not loaded; loaded: \['tiny@1'\]"):
        await run(engine, dataclasses.replace(request(), adapter="tiny@2"))


async def test_bad_request_then_good_request(engine: Engine) -> None:
    bad = GenerationRequest(
        turns=[Turn("user", [MediaPart(MediaFeatures("image", torch.zeros(15, 64))), TextPart("hi")])],
        sampling=SamplingParams(max_tokens=4),
    )
    with pytest.raises(
        InvalidArgumentError,
        match=r"image features: expected \(16, 64\) = 1 frame\(s\) x 16 rows, got \(15, 64\)",
    ):
        await run(engine, bad)
    assert (await run(engine, request(max_tokens=4)))[-1].usage is not None


async def test_worker_failure_fails_only_that_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = token_ids(await run(engine, request(max_tokens=6)))

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(engine.loaded.model, "embed", broken)
        with pytest.raises(RuntimeError, match="device lost"):
            await run(engine, request(max_tokens=6))
    assert token_ids(await run(engine, request(max_tokens=6))) == good


async def test_concurrent_requests_both_complete(engine: Engine) -> None:
    a, b = request(max_tokens=12, image_seed=1), request("Describe it", max_tokens=9, image_seed=2)
    expected = [token_ids(await run(engine, a)), token_ids(await run(engine, b))]
    got = await asyncio.gather(run(engine, a), run(engine, b))
    assert [token_ids(events) for events in got] == expected


async def test_closing_the_stream_stops_the_decode_loop(engine: Engine) -> None:
    steps = 0

    def count(*args: object) -> None:
        nonlocal steps
        steps += 1

    handle = engine.loaded.model.lm.register_forward_hook(count)
    try:
        with eos_bias(engine, -1e4):  # it would run all 900 tokens unless stopped
            stream = engine.generate(request(max_tokens=900))
            assert (await anext(stream)).finish_reason is None
            await stream.aclose()
            start = time.perf_counter()
            await run(engine, request(max_tokens=1))  # queued behind the cancelled one
            assert time.perf_counter() - start < 0.5
    finally:
        handle.remove()
    assert steps < 100


async def test_warmup_and_info(engine: Engine) -> None:
    await engine.warmup()
    info = engine.info()
    assert (info.preset, info.adapter, info.adapters, info.max_context_tokens) == (
        "tiny",
        "tiny@1",
        ("tiny@1",),
        1024,
    )
    (image,) = info.modalities
    assert (
        image.modality,
        image.max_per_prompt,
        image.feature_tokens,
        image.feature_dim,
        image.llm_tokens,
    ) == (
        "image",
        4,
        16,
        64,
        16,
    )


async def test_close_cancels_the_running_request_and_refuses_new_ones(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    with eos_bias(engine, -1e4):
        stream = engine.generate(request(max_tokens=900))
        assert (await anext(stream)).finish_reason is None
        start = time.perf_counter()
        await asyncio.to_thread(engine.close)
        assert time.perf_counter() - start < 0.5
        with pytest.raises(UnavailableError, match="shut down during this request"):
            async for _ in stream:
                pass
    with pytest.raises(UnavailableError, match="shutting down"):
        await run(engine, request())


def test_the_templates_end_of_turn_strings_join_the_requests_stops(engine: Engine, monkeypatch) -> None:
    from services.models.prompt.templates import TEMPLATES

    monkeypatch.setattr(engine, "template", TEMPLATES["vicuna_v0"])
    job = engine.prepare(request(stop=("END", "###")))
    assert job.stop == ("END", "###")  # the template's "###" is not repeated
    assert engine.prepare(request()).stop == ("###",)
    monkeypatch.setattr(engine, "template", TEMPLATES["vicuna_v1"])
    assert engine.prepare(request()).stop == ()


async def test_a_full_queue_refuses_at_once_and_frees_as_requests_end(loaded: LoadedModel) -> None:
    """max_queued 2: two long generations hold the engine; a third is refused at once with
    RESOURCE_EXHAUSTED (no waiting), and once one ends a new request is served."""
    from services.common.errors import ResourceExhaustedError

    engine = Engine(loaded, max_queued=2)
    try:
        first = engine.generate(request(max_tokens=200))
        assert isinstance(await anext(first), GenerationEvent)  # running
        second = engine.generate(request(max_tokens=200, image_seed=1))
        waiting = asyncio.create_task(anext(second))  # admitted, queued behind the first
        await asyncio.sleep(0.05)
        refused_at = time.perf_counter()
        with pytest.raises(ResourceExhaustedError, match=r"holds 2 requests.*MODALMESH_LLM_MAX_QUEUED=2"):
            await run(engine, request(max_tokens=2))
        assert time.perf_counter() - refused_at < 1.0
        await first.aclose()  # the client goes away: its place frees
        assert isinstance(await waiting, GenerationEvent)
        await second.aclose()
        events = await run(engine, request(max_tokens=2))
        assert events[-1].finish_reason is not None
    finally:
        engine.close()
