"""E.T. Chat timestamps at inference on the tiny-etchat twin: the time token's text and
structured timestamps, the frame choice against an uncached reference, and the requests and
presets that must not be matched; the video span attending bidirectionally at the prefill
(`attention: bidirectional`), alone and in a continuous batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.content import MediaFeatures, MediaPart, Part, TextPart, TimePart, Turn
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.presets import GenerationSpec, Preset
from services.llm import runner as runner_module
from services.llm.domain import GenerationEvent, GenerationRequest
from services.llm.engine import Engine
from services.llm.sampling import SamplingParams
from services.models.checkpoints.bundle import base_fingerprint, write_bundle
from services.models.lm.loading import HEADS_SEED, LoadedModel, load_heads
from services.models.lm.timestamps import HEAD_NAME, capture_norm_input, format_seconds, init_timestamp_heads
from services.models.lm.tiny import initial_connectors

Twin = Callable[[str], LoadedModel]
TIMES = (0.5, 1.5, 2.5, 3.5, 4.5, 5.5)


class ForcedSampler:
    """Greedy, except that it samples `token` at the given steps and never samples `banned`."""

    def __init__(self, token: int, steps: set[int], banned: set[int]) -> None:
        self.token, self.steps, self.banned = token, steps, sorted(banned)
        self.step = 0

    def __call__(self, logits: torch.Tensor) -> int:
        self.step += 1
        if self.step - 1 in self.steps:
            return self.token
        return masked_argmax(logits, self.banned)


def masked_argmax(logits: torch.Tensor, banned: list[int]) -> int:
    logits = logits.clone()
    logits[banned] = -math.inf
    return int(logits.argmax())


@pytest.fixture(scope="module")
def etchat(twin_model: Twin) -> LoadedModel:
    return twin_model("tiny-etchat")


@contextlib.contextmanager
def forcing(loaded: LoadedModel, steps: set[int], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the engine sample the time token at `steps` (0-based) and greedily otherwise."""
    vid = loaded.time_token_id
    assert vid is not None
    banned = {vid, *loaded.eos_ids}
    with monkeypatch.context() as m:
        m.setattr(runner_module, "Sampler", lambda params: ForcedSampler(vid, steps, banned))
        yield


@contextlib.contextmanager
def lm_calls(loaded: LoadedModel) -> Iterator[list[dict[str, Any]]]:
    """Record the keyword arguments of every forward of the LM."""
    calls: list[dict[str, Any]] = []

    def hook(_module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        calls.append(kwargs)

    handle = loaded.model.lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def video(frames: int = 6, times: tuple[float, ...] = TIMES, seed: int = 0) -> MediaFeatures:
    features = torch.randn(frames * 4, 32, generator=torch.Generator().manual_seed(seed))  # (F*4, 32)
    return MediaFeatures("video", features, times)


def ask(media: list[MediaFeatures], max_tokens: int = 6, stop: tuple[str, ...] = ()) -> GenerationRequest:
    parts: list[Part] = [*(MediaPart(m) for m in media), TextPart("When does the dog move?")]
    return GenerationRequest(
        [Turn("user", parts)], SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)
    )


async def run(loaded: LoadedModel, request: GenerationRequest) -> list[GenerationEvent]:
    engine = Engine(loaded)
    try:
        return [e async for e in engine.generate(request)]
    finally:
        engine.close()


def reply(events: list[GenerationEvent]) -> tuple[str, list[int], list[Any]]:
    text = "".join(e.text for e in events)
    tokens = [t for e in events for t in e.token_ids]
    return text, tokens, [t for e in events for t in e.timestamps]


def span_mask(length: int, start: int, count: int) -> torch.Tensor:
    """A reference mask (1, 1, L, L): causal, except that the positions of [start, start + count)
    attend to each other."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[start : start + count, start : start + count] = True
    return torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)


def reference(
    loaded: LoadedModel, request: GenerationRequest, steps: set[int], count: int
) -> tuple[list[int], list[int]]:
    """Tokens and matched frames recomputed without a KV cache, from the whole sequence each step.

    The frame keys come from a hook on the last decoder block (not the engine's norm hook), the
    queries from hidden_states[-2] at the last position; a time token is fed back as its
    embedding plus the frame embedding of the frame matched here. Where the preset's video
    attends bidirectionally, every forward has the video's span bidirectional (`span_mask`).
    """
    bidirectional = loaded.preset.modalities["video"].attention == "bidirectional"
    engine = Engine(loaded)
    try:
        job = engine.prepare(request)
    finally:
        engine.close()
    model, lm, heads, vid = loaded.model, loaded.model.lm, loaded.heads, loaded.time_token_id
    assert heads is not None and vid is not None
    banned = sorted({vid, *loaded.eos_ids})
    start, length = job.prompt.media_spans[-1]
    last_block: list[torch.Tensor] = []
    handle = lm.model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last_block.append(out if isinstance(out, torch.Tensor) else out[0])
    )
    tokens, frames = [], []
    try:
        with torch.inference_mode():
            seq = model.embed(
                job.prompt.input_ids, job.prompt.media_spans, request.media, None, job.instructions
            )
            frame_embeds = seq[0, start : start + length]  # (F, D)
            for step in range(count):
                mask = span_mask(seq.shape[1], start, length) if bidirectional else None
                out = lm(inputs_embeds=seq, attention_mask=mask, output_hidden_states=True)
                keys = heads.frm_head(last_block[-1][0, start : start + length])  # (F, h)
                query = heads.vid_head(out.hidden_states[-2][0, -1])  # (h,)
                frame = int((keys @ query).argmax())
                token = vid if step in steps else masked_argmax(out.logits[0, -1], banned)
                fed = lm.get_input_embeddings()(torch.tensor([[token]]))  # (1, 1, D)
                if token == vid:
                    frames.append(frame)
                    fed = fed + frame_embeds[frame]
                tokens.append(token)
                seq = torch.cat([seq, fed], 1)
    finally:
        handle.remove()
    return tokens, frames


async def test_time_tokens_become_matched_times_in_text_and_timestamps(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = {1, 4}
    request = ask([video()])
    with forcing(etchat, steps, monkeypatch), lm_calls(etchat) as calls:
        events = await run(etchat, request)
    text, tokens, stamps = reply(events)
    assert len(tokens) == 6 and [tokens[s] for s in sorted(steps)] == [etchat.time_token_id] * 2
    assert len(stamps) == 2
    for stamp in stamps:
        assert stamp.media_index == 0 and 0 <= stamp.frame < 6
        assert stamp.seconds == TIMES[stamp.frame]
        written = format_seconds(stamp.seconds)
        assert text[stamp.char_offset : stamp.char_offset + len(written)] == written
    assert stamps[0].char_offset < stamps[1].char_offset
    assert "<vid>" not in text
    # Each timestamp travels with the event whose text holds its time.
    sent = 0
    for event in events:
        assert all(sent <= t.char_offset < sent + len(event.text) for t in event.timestamps)
        sent += len(event.text)
    assert all(c.get("output_hidden_states") for c in calls)  # the matching path, every forward
    ref_tokens, ref_frames = reference(etchat, request, steps, len(tokens))
    assert tokens == ref_tokens
    assert [s.frame for s in stamps] == ref_frames


async def test_timestamps_point_at_their_times_in_a_reply_stripped_and_decoded_alone(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real etchat preset's text rules (E.T. Chat's decode of the reply, then .strip())."""
    rules = GenerationSpec(decode_reply_alone=True, strip=True)
    served = dataclasses.replace(etchat, preset=etchat.preset.model_copy(update={"generation": rules}))
    with forcing(served, {0, 3}, monkeypatch):
        text, _, stamps = reply(await run(served, ask([video()], max_tokens=8)))
    assert text == text.strip() and len(stamps) == 2 and stamps[0].char_offset == 0
    for stamp in stamps:
        written = format_seconds(stamp.seconds)
        assert text[stamp.char_offset : stamp.char_offset + len(written)] == written


async def test_the_last_video_is_matched_and_unknown_times_are_frame_indices(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = ask([video(3, ())], max_tokens=2)
    with forcing(etchat, {0}, monkeypatch):
        (stamp,) = reply(await run(etchat, request))[2]
    assert stamp.seconds == float(stamp.frame) and stamp.char_offset == 0
    assert stamp.frame == reference(etchat, request, {0}, 1)[1][0]


async def test_a_stop_string_drops_the_timestamps_it_cuts(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    with forcing(etchat, {0, 3}, monkeypatch):
        text, _, stamps = reply(await run(etchat, ask([video()])))
        end = stamps[0].char_offset + len(format_seconds(stamps[0].seconds))
        stop = text[end : stamps[1].char_offset + 1]  # up to the second time's first character
        cut_text, _, cut = reply(await run(etchat, ask([video()], stop=(stop,))))
    assert cut_text == text[: text.index(stop)]
    assert cut == [s for s in stamps if s.char_offset < len(cut_text)] and stamps[1] not in cut


async def test_a_request_without_video_is_not_matched(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = GenerationRequest(
        [Turn("user", [TextPart("When does it start?")])], SamplingParams(max_tokens=4, temperature=0.0)
    )
    with forcing(etchat, {1}, monkeypatch), lm_calls(etchat) as calls:
        events = await run(etchat, request)
    text, tokens, stamps = reply(events)
    assert tokens[1] == etchat.time_token_id and stamps == [] and "<vid>" not in text
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 4
    assert calls and not any(c.get("output_hidden_states") for c in calls)


def timed_question(
    media: list[MediaFeatures], times: tuple[float, ...], max_tokens: int = 4
) -> GenerationRequest:
    """E.T. Bench vid style: "Is it moving between <vid> and <vid>?" with the times as parts."""
    parts: list[Part] = [*(MediaPart(m) for m in media), TextPart("Is it moving between ")]
    for i, t in enumerate(times):
        parts += [TimePart(t), TextPart(" and " if i < len(times) - 1 else "?")]
    return GenerationRequest([Turn("user", parts)], SamplingParams(max_tokens=max_tokens, temperature=0.0))


async def test_time_parts_add_the_frame_at_their_time_to_the_time_token(etchat: LoadedModel) -> None:
    """E.T. Chat's prepare_multimodal_data: emb(<vid>) + frame_token[round(src)] clamped; frames
    at TIMES (0.5 s apart from 0.5 s): 1.4 s -> frame 0.9 -> 1, 9.0 s -> past the end -> 5."""
    request = timed_question([video()], (1.4, 9.0))
    engine = Engine(etchat)
    try:
        job = engine.prepare(request)
        with lm_calls(etchat) as calls:
            [e async for e in engine.generate(request)]
    finally:
        engine.close()
    positions = [p for p, _ in job.prompt.time_tokens]
    assert [job.prompt.input_ids[p] for p in positions] == [etchat.time_token_id] * 2
    assert [s for _, s in job.prompt.time_tokens] == [1.4, 9.0]
    with torch.inference_mode():
        plain = etchat.model.embed(
            job.prompt.input_ids, job.prompt.media_spans, request.media, None, job.instructions
        )
    start, _ = job.prompt.media_spans[0]
    want = plain.clone()
    for position, frame in zip(positions, (1, 5), strict=True):
        want[0, position] += plain[0, start + frame]
    got = calls[0]["inputs_embeds"]  # the prefill
    assert torch.allclose(got, want) and not torch.allclose(got, plain)
    assert job.instructions == ("Is it moving between <vid> and <vid>?",)  # what the Q-Former reads


async def test_time_parts_are_refused_where_they_cannot_be_honoured(
    etchat: LoadedModel, loaded: LoadedModel
) -> None:
    engine, plain = Engine(etchat), Engine(loaded)
    try:
        with pytest.raises(InvalidArgumentError, match=r"turns\[0\]\.parts\[1\]: .*heads\.timestamps.*none"):
            plain.prepare(timed_question([], (1.0,)))
        with pytest.raises(InvalidArgumentError, match=r"turns\[0\]\.parts\[1\]: .*no video media"):
            engine.prepare(timed_question([], (1.0,)))
        with pytest.raises(InvalidArgumentError, match=r"expected finite seconds >= 0, got -1\.0"):
            engine.prepare(timed_question([video()], (-1.0,)))
        typed = GenerationRequest(
            [Turn("user", [MediaPart(video()), TextPart("At <vid>?")])], SamplingParams(max_tokens=2)
        )
        with pytest.raises(
            InvalidArgumentError, match=r"expected one '<vid>' per time part \(0\), the text holds 1"
        ):
            engine.prepare(typed)
        answered = GenerationRequest(
            [
                Turn("user", [MediaPart(video()), TextPart("When?")]),
                Turn("assistant", [TimePart(2.0)]),
                Turn("user", [TextPart("Sure?")]),
            ],
            SamplingParams(max_tokens=2),
        )
        with pytest.raises(
            InvalidArgumentError, match=r"turns\[1\]: time parts are only allowed in user turns"
        ):
            engine.prepare(answered)
    finally:
        engine.close()
        plain.close()


async def test_a_preset_without_heads_is_unaffected(loaded: LoadedModel) -> None:
    assert loaded.heads is None and loaded.time_token_id is None
    request = GenerationRequest(
        [
            Turn(
                "user",
                [
                    MediaPart(
                        MediaFeatures(
                            "image", torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
                        )
                    ),
                    TextPart("What is this?"),
                ],
            )
        ],
        SamplingParams(max_tokens=5, temperature=0.0),
    )
    with lm_calls(loaded) as calls:
        events = await run(loaded, request)
    assert all(not e.timestamps for e in events)
    assert calls and not any(c.get("output_hidden_states") for c in calls)
    assert not loaded.model.lm.get_decoder().norm._forward_pre_hooks


def test_heads_come_from_the_bundle_else_a_fixed_initialisation(
    etchat: LoadedModel, tiny_preset: Preset
) -> None:
    preset = etchat.preset
    assert etchat.heads is not None  # the twin's initial bundle has none: initialised
    fresh = init_timestamp_heads(32, seed=HEADS_SEED)
    for key, value in fresh.state_dict().items():
        assert torch.equal(etchat.heads.state_dict()[key], value)
    trained = {f"{HEAD_NAME}.{k}": v for k, v in init_timestamp_heads(32, seed=7).state_dict().items()}
    heads = load_heads(preset, trained, llm_dim=32, dtype=torch.float32)
    assert heads is not None
    assert torch.equal(heads.state_dict()["vid_head.1.weight"], trained[f"{HEAD_NAME}.vid_head.1.weight"])
    assert load_heads(tiny_preset, trained, llm_dim=64, dtype=torch.float32) is None
    with pytest.raises(FailedPreconditionError, match="expected shape"):
        load_heads(preset, trained, llm_dim=48, dtype=torch.float32)


async def test_an_adapter_version_serves_its_own_heads(
    etchat: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = etchat.preset
    heads = init_timestamp_heads(32, seed=11)
    last = heads.vid_head[3]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():  # a constant query along the first key dimension
        last.weight.zero_()
        last.bias.copy_(torch.eye(32)[0] * 10)
    path = write_bundle(
        tmp_path / "2",
        name=preset.adapter.name,
        version="2",
        preset=preset.name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint),
        connectors={k: dict(v) for k, v in initial_connectors(preset, 32, seed=101).items()},
        heads={HEAD_NAME: heads.state_dict()},
    )
    engine = Engine(etchat)
    try:
        version = await asyncio.to_thread(engine.adapters.load, path)
        assert version.heads is not None and version.heads is not etchat.heads
        request = ask([video()], max_tokens=2)
        request = GenerationRequest(request.turns, request.sampling, adapter=version.ref)
        with forcing(etchat, {0}, monkeypatch):
            events = [e async for e in engine.generate(request)]
        job = engine.prepare(request)
        with torch.inference_mode():
            embeds = etchat.model.embed(
                job.prompt.input_ids,
                job.prompt.media_spans,
                request.media,
                version.connectors,
                job.instructions,
            )
            start, length = job.prompt.media_spans[0]
            with capture_norm_input(etchat.model.lm) as norm_in:
                etchat.model.lm(
                    inputs_embeds=embeds, attention_mask=span_mask(embeds.shape[1], start, length)
                )
            assert norm_in.value is not None
            keys = version.heads.frm_head(norm_in.value[0, start : start + length])  # (F, h)
        (stamp,) = reply(events)[2]
        assert stamp.frame == int(keys[:, 0].argmax())  # the query picks the largest first key entry
    finally:
        engine.close()


def test_an_initial_bundle_can_hold_the_heads(etchat: LoadedModel, tiny_preset: Preset) -> None:
    from services.models.lm.tiny import initial_heads

    assert initial_heads(tiny_preset, 64) == {}
    first, again = initial_heads(etchat.preset, 32, seed=3), initial_heads(etchat.preset, 32, seed=3)
    flat = {f"{HEAD_NAME}.{k}": v for k, v in first[HEAD_NAME].items()}
    heads = load_heads(etchat.preset, flat, llm_dim=32, dtype=torch.float32)  # the keys the loader wants
    assert heads is not None
    assert all(torch.equal(v, again[HEAD_NAME][k]) for k, v in first[HEAD_NAME].items())


async def test_time_token_requests_decoded_together_equal_them_alone(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuous batching: each row feeds its own time-token input (token + matched frame) and
    matches from its own hidden states, so a batch gives every request its reply alone."""
    requests = [ask([video(seed=s)], max_tokens=n) for s, n in [(0, 6), (1, 9), (2, 4)]]
    requests.append(ask([video(frames=3, times=(0.5, 1.0, 1.5), seed=3)], max_tokens=7))
    requests.append(timed_question([video(seed=4)], (1.0, 2.5), max_tokens=5))  # a question's times
    engine = Engine(etchat)
    try:
        with forcing(etchat, {0, 3}, monkeypatch):
            alone = [reply([e async for e in engine.generate(r)]) for r in requests]

            async def collect(r: GenerationRequest) -> list[GenerationEvent]:
                return [e async for e in engine.generate(r)]

            with lm_calls(etchat) as calls:
                together = [reply(events) for events in await asyncio.gather(*(collect(r) for r in requests))]
    finally:
        engine.close()
    assert together == alone
    assert all(len(stamps) == 2 for _, _, stamps in alone)  # the forced time tokens were matched
    assert max(int(c["inputs_embeds"].shape[0]) for c in calls) == len(requests)


def with_attention(loaded: LoadedModel, attention: str) -> LoadedModel:
    """The same loaded model served under a preset whose video has `attention`."""
    preset = loaded.preset
    video = preset.modalities["video"].model_copy(update={"attention": attention})
    return dataclasses.replace(
        loaded, preset=preset.model_copy(update={"modalities": {**preset.modalities, "video": video}})
    )


async def test_the_video_attends_bidirectionally_at_the_prefill_and_decode_steps_stay_causal(
    etchat: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = {1, 3}
    request = ask([video()], max_tokens=6)
    causal = with_attention(etchat, "causal")
    assert etchat.preset.bidirectional_modalities() == {"video"}  # the twin, as etchat
    with forcing(etchat, steps, monkeypatch):
        with lm_calls(etchat) as calls:
            bidirectional_reply = reply(await run(etchat, request))
        causal_reply = reply(await run(causal, request))
    engine = Engine(etchat)
    try:
        start, length = engine.prepare(request).prompt.media_spans[0]
    finally:
        engine.close()
    prefill, *decode = calls
    mask = prefill["attention_mask"]  # the prefill's 4D mask: the span's block open, the rest causal
    assert mask.shape[:2] == (1, 1) and torch.equal(mask, span_mask(mask.shape[-1], start, length))
    assert decode and all(c["attention_mask"].dim() == 2 for c in decode)  # steps: padding only
    for loaded, (_, tokens, stamps) in [(etchat, bidirectional_reply), (causal, causal_reply)]:
        assert (tokens, [t.frame for t in stamps]) == reference(loaded, request, steps, len(tokens))
    embeds = prefill["inputs_embeds"]
    with torch.no_grad():  # what follows the span sees another state when the span attends both ways
        opened = etchat.model.lm(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
        closed = etchat.model.lm(inputs_embeds=embeds).logits[0, -1]
    assert not torch.allclose(opened, closed, atol=1e-4)


async def test_bidirectional_rows_joining_a_running_batch_get_what_they_get_alone(
    etchat: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One prefill per iteration, so every row joins a batch that is already decoding; among
    them a text-only row (causal prefill) and rows of a second adapter version."""
    preset = etchat.preset
    path = write_bundle(
        tmp_path / "2",
        name=preset.adapter.name,
        version="2",
        preset=preset.name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint),
        connectors={k: dict(v) for k, v in initial_connectors(preset, 32, seed=303).items()},
    )
    text_only = GenerationRequest(
        [Turn("user", [TextPart("Say something long")])], SamplingParams(max_tokens=8, temperature=0.0)
    )
    requests = [ask([video(seed=s)], max_tokens=n) for s, n in [(4, 9), (5, 3), (6, 7)]] + [text_only]
    engine = Engine(etchat, max_prefill_tokens=1)
    try:
        version = await asyncio.to_thread(engine.adapters.load, path)
        requests += [dataclasses.replace(r, adapter=version.ref) for r in requests[:2]]
        with forcing(etchat, {0, 2}, monkeypatch):
            alone = [reply([e async for e in engine.generate(r)]) for r in requests]

            async def collect(r: GenerationRequest) -> list[GenerationEvent]:
                return [e async for e in engine.generate(r)]

            with lm_calls(etchat) as calls:
                together = [reply(events) for events in await asyncio.gather(*(collect(r) for r in requests))]
    finally:
        engine.close()
    assert together == alone
    four_d = [c for c in calls if c.get("attention_mask") is not None and c["attention_mask"].dim() == 4]
    assert len(four_d) == 5  # every video row's prefill, none of the steps
    assert max(int(c["inputs_embeds"].shape[0]) for c in calls) >= 3  # rows really decoded together
    assert alone[0] != alone[4]  # the second version answers otherwise
