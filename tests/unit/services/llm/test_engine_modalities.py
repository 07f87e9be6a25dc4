"""The LLM side of every tiny twin: frames, token counts, templates, sum-combine, bad media."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.presets import Preset
from services.llm.domain import GenerationRequest
from services.llm.engine import Engine, media_instructions
from services.llm.sampling import SamplingParams
from services.models.lm.loading import LoadedModel, check_added_tokens, load_model

Twin = Callable[[str], LoadedModel]


def item(modality: str, frames: int, rows: int, dim: int, times: tuple[float, ...] = ()) -> MediaFeatures:
    return MediaFeatures(
        modality, torch.randn(frames * rows, dim, generator=torch.Generator().manual_seed(frames)), times
    )


def ask(media: list[MediaFeatures], *turns: Turn) -> GenerationRequest:
    default = Turn("user", [*(MediaPart(m) for m in media), TextPart("What happens?")])
    return GenerationRequest(list(turns) or [default], SamplingParams(max_tokens=3, temperature=0.0))


def text_of(loaded: LoadedModel, ids: list[int]) -> str:
    return str(loaded.tokenizer.decode(ids))


@pytest.mark.parametrize(
    ("name", "modality", "frames", "rows", "dim", "tokens"),
    [
        ("tiny-videochat", "video", 4, 10, 32, 12),
        ("tiny-videochat", "image", 1, 10, 32, 12),
        ("tiny-etchat", "video", 5, 4, 32, 5),
        ("tiny-eventgpt", "event", 5, 17, 64, 22),
        ("tiny-pandagpt", "audio", 1, 1, 32, 1),
        ("tiny-nextgpt", "video", 1, 1, 32, 1),
    ],
)
async def test_each_twin_generates_with_its_token_count(
    twin_model: Twin, name: str, modality: str, frames: int, rows: int, dim: int, tokens: int
) -> None:
    engine = Engine(twin_model(name))
    try:
        request = ask([item(modality, frames, rows, dim, tuple(float(t) for t in range(frames)))])
        job = engine.prepare(request)
        assert job.prompt.media_spans[0][1] == tokens
        events = [e async for e in engine.generate(request)]
        assert events[-1].usage is not None and events[-1].usage.completion_tokens >= 1
    finally:
        engine.close()


def test_videochat_writes_the_frame_sentence_from_the_times(twin_model: Twin) -> None:
    loaded = twin_model("tiny-videochat")
    engine = Engine(loaded)
    try:
        job = engine.prepare(ask([item("video", 4, 10, 32, (0.54, 1.56, 2.5, 3.0))]))
        (start, length), ids = job.prompt.media_spans[0], job.prompt.input_ids
        after = text_of(loaded, ids[start + length :])
        assert after.startswith(
            "</Video> The video contains 4 frames sampled at 0.5, 1.6, 2.5, 3.0 seconds.\n###Human: What happens?"
        )
        image = engine.prepare(ask([item("image", 1, 10, 32, (0.0,))]))
        assert "contains" not in text_of(loaded, image.prompt.input_ids)
    finally:
        engine.close()


def test_eventgpt_prompt(twin_model: Twin) -> None:
    loaded = twin_model("tiny-eventgpt")
    engine = Engine(loaded)
    try:
        job = engine.prepare(ask([item("event", 5, 17, 64)]))
        (start, length), ids = job.prompt.media_spans[0], job.prompt.input_ids
        assert text_of(loaded, ids[1:start]).endswith("human's questions. USER: <ev_start>")
        assert text_of(loaded, ids[start + length :]) == "<ev_end>\nWhat happens? ASSISTANT:"
    finally:
        engine.close()


def test_etchat_reads_the_turns_text_and_varies_frames(twin_model: Twin) -> None:
    loaded = twin_model("tiny-etchat")
    turns = [
        Turn("user", [TextPart("hi")]),
        Turn("assistant", [TextPart("yes")]),
        Turn("user", [MediaPart(video := item("video", 3, 4, 32)), TextPart(" when? ")]),
    ]
    assert media_instructions(turns) == ("when?",)
    model = loaded.model
    with torch.inference_mode():
        a, b = (model.project([video], instructions=[t])[0] for t in ("when does it start", "describe it"))
    assert a.shape == (3, 32) and not torch.allclose(a, b)
    engine = Engine(loaded)
    try:
        for frames in (1, 8):
            assert engine.prepare(ask([item("video", frames, 4, 32)])).prompt.media_spans[0][1] == frames
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("name", "media", "message"),
    [
        ("tiny-videochat", [item("video", 3, 10, 32)], "video features: expected (40, 32) = 4 frame(s) x 10 rows, got (30, 32)"),
        ("tiny-videochat", [MediaFeatures("video", torch.zeros(41, 32))], "expected (40, 32) = 4 frame(s) x 10 rows, got (41, 32)"),
        ("tiny-etchat", [MediaFeatures("video", torch.zeros(10, 32))], "expected (frames * 4, 32), frames <= 8, got (10, 32)"),
        ("tiny-etchat", [item("video", 9, 4, 32)], "frames <= 8, got (36, 32)"),
        ("tiny-etchat", [item("video", 2, 4, 16)], "got (8, 16)"),
        ("tiny-eventgpt", [item("video", 1, 17, 64)], "media[0].modality: expected one of ['event'], got 'video'"),
        ("tiny-eventgpt", [item("event", 5, 17, 64)] * 2, "at most 1 event items per prompt, got 2"),
        ("tiny-etchat", [item("video", 2, 4, 32, (0.0,))], "frame times: expected 2 (one per frame), got 1"),
        ("tiny-etchat", [item("video", 2, 4, 32, (0.0, float("nan")))], "frame times: expected finite seconds >= 0"),
    ],
)  # fmt: skip
def test_bad_media_is_refused(twin_model: Twin, name: str, media: list[MediaFeatures], message: str) -> None:
    engine = Engine(twin_model(name))
    try:
        with pytest.raises(InvalidArgumentError) as e:
            engine.prepare(ask(media))
        assert message in e.value.message
    finally:
        engine.close()


def test_sum_combine_gives_one_token_per_turn(twin_model: Twin) -> None:
    loaded = twin_model("tiny-pandagpt")
    image, audio, video = item("image", 1, 1, 32), item("audio", 1, 1, 32), item("video", 1, 1, 32)
    turns = [
        Turn("user", [TextPart("look"), MediaPart(image), MediaPart(video)]),
        Turn("assistant", [TextPart("ok")]),
        Turn("user", [MediaPart(audio), TextPart("and this?")]),
    ]
    engine = Engine(loaded)
    try:
        job = engine.prepare(ask([], *turns))
        assert job.request.media == (image, video, audio)  # numbered as their parts appear
        spans = job.prompt.media_spans
        assert spans[0] == spans[1] and spans[2] != spans[0] and all(n == 1 for _, n in spans)
        ids = job.prompt.input_ids
        assert len(set(spans)) == 2  # two placeholder positions, not three
        assert text_of(loaded, ids).count("<Img>") == 2
        model = loaded.model
        with torch.inference_mode():
            embeds = model.embed(ids, spans, [image, video, audio])
            proj = model.project([image, video, audio])
        assert torch.allclose(embeds[0, spans[0][0]], proj[0][0] + proj[1][0], atol=1e-6)
        assert torch.allclose(embeds[0, spans[2][0]], proj[2][0], atol=1e-6)
        assert model.connector("image") is model.connector("audio")  # one shared llama_proj
        assert list(model.connectors) == ["llama_proj"]
    finally:
        engine.close()


def test_added_tokens_must_be_single_tokens(twin: Callable[[str], Preset]) -> None:
    preset = twin("tiny-etchat")
    loaded = load_model(preset)
    check_added_tokens(preset, loaded.tokenizer)
    llm = preset.llm.model_copy(update={"added_tokens": ["<vid>", "<nope>"]})
    with pytest.raises(FailedPreconditionError, match=r"llm\.added_tokens '<nope>': expected one token"):
        check_added_tokens(preset.model_copy(update={"llm": llm}), loaded.tokenizer)
