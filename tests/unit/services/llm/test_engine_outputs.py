"""NExT-GPT output signals at inference on the tiny-nextgpt twin: spans the model emits, spans
appended because the request asked for them, the at/before hidden-state position checked
against an uncached forward of the whole sequence (as training computes it), and the requests
that must be refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import pytest
import torch

from services.common.content import TextPart, Turn
from services.common.errors import InvalidArgumentError
from services.llm import runner as runner_module
from services.llm.domain import GenerationEvent, GenerationRequest, OutputSignal
from services.llm.engine import Engine
from services.llm.sampling import SamplingParams
from services.llm.signals import output_signal_ids
from services.models.checkpoints.bundle import base_fingerprint, write_bundle
from services.models.lm.loading import LoadedModel
from services.models.lm.output_projector import gather_signal_input, initial_projectors, preset_heads
from services.models.lm.tiny import initial_connectors

Twin = Callable[[str], LoadedModel]


@pytest.fixture(scope="module")
def nextgpt(twin_model: Twin) -> LoadedModel:
    return twin_model("tiny-nextgpt")


class Scripted:
    """Greedy over everything but the signal tokens, except `script[step]` at the given steps."""

    def __init__(self, script: dict[int, int], banned: set[int]) -> None:
        self.script, self.banned, self.step = script, sorted(banned), 0

    def __call__(self, logits: torch.Tensor) -> int:
        self.step += 1
        if self.step - 1 in self.script:
            return self.script[self.step - 1]
        logits = logits.clone()
        logits[self.banned] = -math.inf
        return int(logits.argmax())


@contextlib.contextmanager
def scripted(
    loaded: LoadedModel, script: dict[int, int], monkeypatch: pytest.MonkeyPatch, *, allow_eos: bool = False
) -> Iterator[None]:
    ids = output_signal_ids(loaded.preset, loaded.tokenizer)
    banned = {i for v in ids.values() for i in v} | (set() if allow_eos else set(loaded.eos_ids))
    with monkeypatch.context() as m:
        m.setattr(runner_module, "Sampler", lambda params: Scripted(script, banned))
        yield


def ask(
    max_tokens: int = 8, outputs: tuple[str, ...] = (), text: str = "draw a red square"
) -> GenerationRequest:
    return GenerationRequest(
        [Turn("user", [TextPart(text)])],
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        outputs=outputs,
    )


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationEvent]:
    return [e async for e in engine.generate(request)]


def run(loaded: LoadedModel, request: GenerationRequest) -> list[GenerationEvent]:
    engine = Engine(loaded)
    try:
        return asyncio.run(collect(engine, request))
    finally:
        engine.close()


def signals(events: list[GenerationEvent]) -> list[OutputSignal]:
    return [o for e in events for o in e.outputs]


def reference(
    loaded: LoadedModel, request: GenerationRequest, fed: list[int], modality: str, position: str
) -> torch.Tensor:
    """The conditioning recomputed from one uncached forward of prompt + `fed` tokens."""
    engine = Engine(loaded)
    try:
        job = engine.prepare(request)
        prompt = engine.loaded.model.embed(
            job.prompt.input_ids, job.prompt.media_spans, [], engine.adapters.select(job.version), ()
        )
    finally:
        engine.close()
    lm = loaded.model.lm
    table = lm.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([prompt, table(torch.tensor([fed]))], dim=1)  # (1, L, D)
        out = lm(inputs_embeds=embeds, output_hidden_states=True)
        ids = torch.tensor([list(job.prompt.input_ids) + fed])  # (1, L)
        sig = output_signal_ids(loaded.preset, loaded.tokenizer)[modality]
        got = gather_signal_input(out.hidden_states, table, ids, sig, position=position)  # type: ignore[arg-type]
        return loaded.projectors[modality](got.hidden, got.embeds)[0]


def tokens_of(events: list[GenerationEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def test_a_requested_modality_is_appended_after_the_reply(nextgpt: LoadedModel) -> None:
    request = ask(max_tokens=5, outputs=("image",))
    events = run(nextgpt, request)
    text = "".join(e.text for e in events)
    (signal,) = signals(events)
    assert events[-1].outputs == (signal,)  # it arrives with the last event
    assert (signal.modality, signal.index, signal.appended) == ("image", 0, True)
    assert tuple(signal.conditioning.shape) == (77, 32) and signal.conditioning.dtype == torch.float32
    assert signal.char_offset == len(text)
    ids = output_signal_ids(nextgpt.preset, nextgpt.tokenizer)["image"]
    generated = tokens_of(events)
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == len(generated) == 5
    # The span is fed after every generated token (the budget ended the reply, so all were fed).
    expected = reference(nextgpt, request, generated + ids, "image", "at")
    torch.testing.assert_close(signal.conditioning, expected, atol=1e-4, rtol=1e-4)


def test_every_output_modality_at_once_in_the_order_asked(nextgpt: LoadedModel) -> None:
    events = run(nextgpt, ask(max_tokens=3, outputs=("audio", "video", "image", "audio")))
    got = [(s.modality, s.index, tuple(s.conditioning.shape)) for s in signals(events)]
    assert got == [("audio", 0, (1, 16)), ("video", 1, (77, 48)), ("image", 2, (77, 32))]


@pytest.mark.parametrize("position", ["at", "before"])
def test_a_span_the_model_starts_is_completed_stripped_and_projected(
    nextgpt: LoadedModel, monkeypatch: pytest.MonkeyPatch, position: str
) -> None:
    spec = nextgpt.preset.outputs["image"]
    preset = nextgpt.preset.model_copy(
        update={
            "outputs": {**nextgpt.preset.outputs, "image": spec.model_copy(update={"position": position})}
        }
    )
    loaded = dataclasses.replace(nextgpt, preset=preset)
    ids = output_signal_ids(preset, loaded.tokenizer)["image"]
    request = ask(max_tokens=10, outputs=("image",))  # asked for and emitted: produced once
    with scripted(loaded, {2: ids[0]}, monkeypatch):
        events = run(loaded, request)
    generated = tokens_of(events)
    assert generated[2:6] == ids  # the first was sampled, the other three forced
    assert not any(i in generated[6:] for i in ids)
    text = "".join(e.text for e in events)
    plain = loaded.tokenizer.decode(generated[:2])
    assert text.startswith(plain) and "[IMG" not in text
    (signal,) = signals(events)
    assert (signal.modality, signal.appended, signal.char_offset) == ("image", False, len(plain))
    assert not events[-1].outputs or events[-1].outputs[0] is not signal or len(generated) <= 7
    expected = reference(loaded, request, generated[:7], "image", position)
    torch.testing.assert_close(signal.conditioning, expected, atol=1e-4, rtol=1e-4)


def test_a_span_cut_off_by_the_token_budget_is_still_completed(
    nextgpt: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = output_signal_ids(nextgpt.preset, nextgpt.tokenizer)["video"]
    with scripted(nextgpt, {3: ids[0]}, monkeypatch):
        events = run(nextgpt, ask(max_tokens=6))
    assert events[-1].finish_reason is not None and events[-1].finish_reason.value == "length"
    (signal,) = signals(events)
    assert (signal.modality, tuple(signal.conditioning.shape), signal.appended) == ("video", (77, 48), False)


def test_a_stray_signal_token_is_ignored(nextgpt: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = output_signal_ids(nextgpt.preset, nextgpt.tokenizer)["audio"]
    with scripted(nextgpt, {1: ids[3]}, monkeypatch):
        events = run(nextgpt, ask(max_tokens=4))
    assert signals(events) == []
    assert "[AUD" not in "".join(e.text for e in events)


def test_an_eos_that_ends_the_reply_is_not_fed_before_an_appended_span(
    nextgpt: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    eos = min(nextgpt.eos_ids)
    request = ask(max_tokens=8, outputs=("audio",))
    with scripted(nextgpt, {2: eos}, monkeypatch, allow_eos=True):
        events = run(nextgpt, request)
    generated = tokens_of(events)
    assert generated[-1] == eos and len(generated) == 3
    (signal,) = signals(events)
    ids = output_signal_ids(nextgpt.preset, nextgpt.tokenizer)["audio"]
    expected = reference(nextgpt, request, generated[:-1] + ids, "audio", "at")
    torch.testing.assert_close(signal.conditioning, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("preset", "outputs", "message"),
    [
        (
            "tiny-nextgpt",
            ("smell",),
            "output modality 'smell': preset tiny-nextgpt can produce audio, image, video",
        ),
        ("tiny-pandagpt", ("image",), "output modality 'image': preset tiny-pandagpt can produce text only"),
    ],
)
def test_an_output_the_preset_cannot_produce_is_refused(
    twin_model: Twin, preset: str, outputs: tuple[str, ...], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(")):
        run(twin_model(preset), ask(outputs=outputs))


def test_model_info_lists_the_outputs(nextgpt: LoadedModel) -> None:
    engine = Engine(nextgpt)
    try:
        info = engine.info()
    finally:
        engine.close()
    got = {(o.modality, o.signal_tokens, o.conditioning_shape) for o in info.outputs}
    assert got == {("image", 4, (77, 32)), ("video", 24, (77, 48)), ("audio", 8, (1, 16))}


def test_a_new_adapter_version_brings_its_own_projectors(nextgpt: LoadedModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    preset, llm_dim = nextgpt.preset, nextgpt.model.lm.config.hidden_size
    path = tmp_path / "2"
    write_bundle(
        path,
        name=preset.adapter.name,
        version="2",
        preset=preset.name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint),
        connectors=initial_connectors(preset, llm_dim, seed=7),
        heads=preset_heads(preset, initial_projectors(preset, llm_dim, seed=77)),
        stage="stage2",
    )
    engine = Engine(nextgpt)
    try:
        first = asyncio.run(collect(engine, ask(max_tokens=2, outputs=("image",))))
        version = engine.adapters.load(path, make_current=True)
        assert version.projectors["image"].query_embs.shape == (1, 77, 32)
        second = asyncio.run(collect(engine, ask(max_tokens=2, outputs=("image",))))
        assert second[0].adapter is not None and second[0].adapter.endswith("@2")
    finally:
        engine.close()
    a, b = signals(first)[0].conditioning, signals(second)[0].conditioning
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_signal_requests_decoded_together_equal_them_alone(
    nextgpt: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching with signal spans: rows forced through a span, rows with outputs
    appended after the reply (from the row's own KV cache) and plain rows, in one batch."""
    ids = output_signal_ids(nextgpt.preset, nextgpt.tokenizer)
    requests = [
        ask(max_tokens=10, outputs=("image",)),
        ask(max_tokens=5, outputs=("audio", "video"), text="play a dog barking"),
        ask(max_tokens=7, text="hello there"),
    ]

    async def both() -> tuple[list[list[GenerationEvent]], list[list[GenerationEvent]]]:
        engine = Engine(nextgpt)
        try:
            alone = [await collect(engine, r) for r in requests]
            together = await asyncio.gather(*(collect(engine, r) for r in requests))
            return alone, list(together)
        finally:
            engine.close()

    with scripted(nextgpt, {2: ids["image"][0]}, monkeypatch):
        alone, together = asyncio.run(both())
    for a, b in zip(alone, together, strict=True):
        assert tokens_of(b) == tokens_of(a)
        assert "".join(e.text for e in b) == "".join(e.text for e in a)
        assert [(s.modality, s.index, s.char_offset, s.appended) for s in signals(b)] == [
            (s.modality, s.index, s.char_offset, s.appended) for s in signals(a)
        ]
        for x, y in zip(signals(a), signals(b), strict=True):
            torch.testing.assert_close(y.conditioning, x.conditioning, atol=1e-4, rtol=1e-4)
    # each emits the scripted image span; the second also gets its two asked-for modalities appended
    assert [[s.modality for s in signals(a)] for a in alone] == [
        ["image"],
        ["image", "audio", "video"],
        ["image"],
    ]
