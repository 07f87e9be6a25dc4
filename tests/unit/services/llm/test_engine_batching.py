"""Continuous batching: requests decode together, join and leave between steps, and each gets
exactly what it gets alone (greedy and seeded sampling), on every kind of request the engine
serves (plain, E.T. Chat time tokens, NExT-GPT signal spans, several adapter versions)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.errors import CancelledError
from services.common.presets import Preset
from services.llm.batching import BatchCache
from services.llm.domain import GenerationEvent, GenerationRequest
from services.llm.engine import Engine
from services.llm.sampling import SamplingParams
from services.models.lm.loading import LoadedModel


def image(seed: int) -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))  # (16, 64)


def chat(question: str, image_seed: int, max_tokens: int, **sampling: Any) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, **sampling})
    return GenerationRequest(
        turns=[Turn("user", [MediaPart(MediaFeatures("image", image(image_seed))), TextPart(question)])],
        sampling=params,
    )


# prompts of different lengths, budgets and sampling, so rows join, pad and leave at different steps
REQUESTS = [
    chat("What is this?", 0, 20),
    chat("Describe the picture in as much detail as you can, please", 1, 7),
    chat("colour?", 2, 15, temperature=0.9, seed=5),
    chat("Tell me a story about it", 3, 24, top_k=5, temperature=0.7, seed=1),
    chat("?", 4, 3),
    chat("Count the objects you see in the image", 5, 11, stop=("e",)),
]


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationEvent]:
    return [e async for e in engine.generate(request)]


def summary(events: list[GenerationEvent]) -> tuple[list[int], str, Any, Any]:
    return (
        [t for e in events for t in e.token_ids],
        "".join(e.text for e in events),
        events[-1].finish_reason,
        events[-1].usage,
    )


@contextlib.contextmanager
def batch_sizes(engine: Engine) -> Iterator[list[tuple[int, int]]]:
    """(batch size, positions fed) of every forward of the LM while inside."""
    sizes: list[tuple[int, int]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids")
        sizes.append((int(x.shape[0]), int(x.shape[1])))

    handle = engine.loaded.model.lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


async def alone_and_together(
    engine: Engine, requests: list[GenerationRequest]
) -> tuple[list[Any], list[Any], list[tuple[int, int]]]:
    alone = [summary(await collect(engine, r)) for r in requests]
    with batch_sizes(engine) as sizes:
        together = [summary(e) for e in await asyncio.gather(*(collect(engine, r) for r in requests))]
    return alone, together, sizes


async def test_requests_decoded_together_equal_the_same_requests_alone(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    try:
        alone, together, sizes = await alone_and_together(engine, REQUESTS)
    finally:
        engine.close()
    assert together == alone
    assert max(b for b, _ in sizes) >= 2  # they really shared forwards
    assert len(set(s[1] for s in alone)) == len(REQUESTS)  # and the cases differ from each other


async def test_max_batch_size_bounds_the_batch_and_the_rest_wait_their_turn(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_batch_size=2)
    try:
        alone, together, sizes = await alone_and_together(engine, REQUESTS)
    finally:
        engine.close()
    assert together == alone
    assert max(b for b, _ in sizes) == 2


async def test_a_small_prefill_budget_admits_one_request_per_step(loaded: LoadedModel) -> None:
    engine = Engine(loaded, max_prefill_tokens=1)  # every prompt is over it: one prefill per iteration
    try:
        alone, together, sizes = await alone_and_together(engine, REQUESTS[:3])
    finally:
        engine.close()
    assert together == alone
    prefills = [i for i, (_, n) in enumerate(sizes) if n > 1]
    assert len(prefills) == 3 and all(b - a > 1 for a, b in itertools.pairwise(prefills))
    assert max(b for b, _ in sizes) >= 2


@contextlib.contextmanager
def never_ends(engine: Engine) -> Iterator[None]:
    eos = next(iter(engine.loaded.eos_ids))
    lm_head = engine.loaded.model.lm.lm_head
    original = lm_head.bias
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features), requires_grad=False)
    lm_head.bias.data[eos] = -1e4
    try:
        yield
    finally:
        lm_head.bias = original


async def test_a_late_request_streams_and_ends_while_an_early_long_one_decodes(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    try:
        with never_ends(engine):
            long_events: list[GenerationEvent] = []

            async def long() -> None:
                async for e in engine.generate(chat("What is this?", 0, 400)):
                    long_events.append(e)

            task = asyncio.create_task(long())
            while not long_events:
                await asyncio.sleep(0.001)
            short = await collect(engine, chat("colour?", 1, 4))
            progress = sum(len(e.token_ids) for e in long_events)
            assert not task.done() and progress < 400  # the long one is still decoding
            assert short[-1].finish_reason is not None and short[-1].usage is not None
            assert short[-1].usage.completion_tokens == 4
            await task
        assert sum(len(e.token_ids) for e in long_events) == 400
    finally:
        engine.close()


async def test_a_cancelled_row_leaves_and_the_others_are_unaffected(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    try:
        expected = [summary(await collect(engine, r)) for r in REQUESTS[:2]]
        with never_ends(engine):
            doomed = engine.generate(chat("Tell me a story", 9, 300))
            first = await anext(doomed)
            assert first.finish_reason is None
        others = asyncio.gather(*(collect(engine, r) for r in REQUESTS[:2]))
        await asyncio.sleep(0)
        await doomed.aclose()  # the client goes away mid-batch
        assert [summary(e) for e in await others] == expected
    finally:
        engine.close()


async def test_a_row_that_fails_fails_only_its_request(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampler that raises for one request: that request gets the error, the batch goes on."""
    from services.llm import runner as runner_module

    real = runner_module.Sampler

    class Flaky:
        def __init__(self, params: SamplingParams) -> None:
            self.inner, self.calls, self.bad = real(params), 0, params.seed == 666

        def __call__(self, logits: torch.Tensor) -> int:
            self.calls += 1
            if self.bad and self.calls == 3:
                raise RuntimeError("sampler broke")
            return self.inner(logits)

    engine = Engine(loaded)
    try:
        expected = [summary(await collect(engine, r)) for r in REQUESTS[:3]]
        monkeypatch.setattr(runner_module, "Sampler", Flaky)
        bad = chat("What is this?", 7, 10, seed=666)
        results = await asyncio.gather(
            *(collect(engine, r) for r in [*REQUESTS[:3], bad]), return_exceptions=True
        )
        assert isinstance(results[3], RuntimeError) and "sampler broke" in str(results[3])
        assert [summary(e) for e in results[:3]] == expected  # type: ignore[arg-type]
    finally:
        engine.close()


async def test_close_ends_every_row_and_every_waiting_request(loaded: LoadedModel) -> None:
    from services.common.errors import UnavailableError

    engine = Engine(loaded, max_batch_size=1)
    with never_ends(engine):
        running = engine.generate(chat("What is this?", 0, 300))
        assert (await anext(running)).finish_reason is None
        waiting = asyncio.create_task(collect(engine, chat("colour?", 1, 300)))  # no room: it waits
        await asyncio.sleep(0.05)
        await asyncio.to_thread(engine.close)
        with pytest.raises(UnavailableError):
            async for _ in running:
                pass
        with pytest.raises((UnavailableError, CancelledError)):
            await asyncio.wait_for(waiting, 5)


async def test_two_adapter_versions_decode_in_turn_and_each_keeps_its_own_weights(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    from services.models.checkpoints.bundle import base_fingerprint, write_bundle
    from services.models.lm.tiny import initial_connectors

    preset: Preset = loaded.preset
    path = write_bundle(
        tmp_path / "2",
        name=preset.adapter.name,
        version="2",
        preset=preset.name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint),
        connectors={
            k: dict(v)
            for k, v in initial_connectors(preset, loaded.model.lm.config.hidden_size, seed=202).items()
        },
    )
    engine = Engine(loaded)
    try:
        version = await asyncio.to_thread(engine.adapters.load, path)
        pinned = [GenerationRequest(r.turns, r.sampling, adapter=version.ref) for r in REQUESTS[:3]]
        requests = [*REQUESTS[:3], *pinned]
        alone, together, sizes = await alone_and_together(engine, requests)
    finally:
        engine.close()
    assert together == alone
    assert [a[0] for a in alone[:3]] != [a[0] for a in alone[3:]]  # the versions answer differently
    assert max(b for b, _ in sizes) == 3  # one batch per version


def test_batch_cache_pads_left_selects_rows_and_cuts_shared_padding() -> None:
    from transformers.cache_utils import DynamicCache

    def one(length: int, fill: float) -> DynamicCache:
        k = torch.full((1, 2, length, 4), fill)
        return DynamicCache(ddp_cache_data=[(k, k + 100), (k + 1, k + 101)])

    kv = BatchCache()
    kv.add(one(3, 1.0))
    kv.add(one(5, 2.0))
    kv.add(one(2, 3.0))
    assert kv.mask is not None and kv.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert kv.lengths == [3, 5, 2]
    row = kv.row_cache(0).layers[1]
    assert (
        row.keys.shape == (1, 2, 3, 4) and bool((row.keys == 2.0).all()) and bool((row.values == 102.0).all())
    )
    kv.keep([2, 0])  # the 5-long row leaves: the two shared padding columns go
    assert kv.mask is not None and kv.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert kv.cache is not None and kv.cache.layers[0].keys.shape == (2, 2, 3, 4)
    assert (
        bool((kv.row_cache(0).layers[0].keys == 3.0).all()) and kv.row_cache(0).layers[0].keys.shape[2] == 2
    )
    _, mask, positions = kv.step_inputs()
    assert mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and positions.tolist() == [[2], [3]]
    kv.keep([])
    assert kv.size == 0 and kv.cache is None


def test_the_batch_cache_grows_in_place_and_holds_what_concatenation_would() -> None:
    """Steps append a column into spare room; past it the buffers grow, and the cache always
    reads as the concatenation of everything written."""
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    first = torch.randn(1, 2, 5, 4)
    kv = BatchCache()
    kv.add(DynamicCache(ddp_cache_data=[(first, -first)]))
    expected = first
    for _ in range(150):  # past the 64 columns of spare room, twice
        column = torch.randn(1, 2, 1, 4)
        cache, _, _ = kv.step_inputs()
        keys, values = cache.layers[0].update(column, -column)
        kv.stepped()
        expected = torch.cat([expected, column], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert kv.lengths == [155] and kv.columns == 155
    assert torch.equal(kv.row_cache(0).layers[0].keys, expected)
