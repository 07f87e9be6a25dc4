"""Every tiny twin served end to end: the real Redis, encoder service, LLM service and gateway.

For each twin (tiny-pandagpt, tiny-nextgpt, tiny-videochat, tiny-etchat, tiny-eventgpt) one
stack runs at a time (started when its first test asks, stopped when the next twin's starts,
so memory holds one stack), and POST /v1/chat/completions is asked with each of its
modalities in the forms a client sends them (data URLs, input_audio, input_event), mixed in
one message and over several turns. Every answer is a 200 with text; `usage.prompt_tokens`
is checked against the preset's token counts where the count is exact (a media item adds
its connector's tokens, summed presets add one token per turn whatever the media, fps
sampling adds one token per second) and bounded where the template adds text around media.

Then the bad inputs of the issue, through the same gateways: each a 4xx whose message says
what was expected, each followed by a good request on the same stack (the services stay
up). The stacks run with small video limits (MODALMESH_VIDEO_MAX_SECONDS / _FRAMES) so that
the over-the-limit videos stay small.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers.media import make_audio, make_events, make_video, png_bytes
from tests.helpers.procs import Process, free_ports, stop_all
from tests.helpers.services import start_encoders, start_gateway, start_llm, wait_stack_healthy

pytestmark = pytest.mark.integration

VIDEO_MAX_SECONDS = 20
VIDEO_MAX_FRAMES = 200
# Text a template may add around one media item (wrappers such as "<Img>...</Img>"), in tokens of
# the tiny tokenizers (512 byte-level BPE entries: most words are several tokens).
TEMPLATE_SLACK = 64
# VideoChat also makes each part its own "###Human: " message and writes after a video " The
# video contains 4 frames sampled at 0.2, 0.8, 1.2, 1.8 seconds.": about 80 tiny tokens.
VIDEOCHAT_VIDEO_SLACK = 128


# ---- one stack per twin ----------------------------------------------------------------------


@dataclass
class Stack:
    preset: str
    base_url: str = ""
    grpc_address: str = ""
    procs: list[Process] = field(default_factory=list)

    def chat(self, messages: list[dict[str, Any]], **fields: Any) -> httpx.Response:
        payload = {"model": self.preset, "max_tokens": 3, "temperature": 0, "messages": messages, **fields}
        return httpx.post(f"{self.base_url}/v1/chat/completions", json=payload, timeout=120)

    def ok(self, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """A request that must succeed: 200, a text reply, usage; the body."""
        r = self.chat(messages, **fields)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        usage = reply["usage"]
        assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= fields.get("max_tokens", 3)
        return dict(reply)

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        return int(self.ok(messages)["usage"]["prompt_tokens"])

    def stop(self) -> None:
        stop_all(reversed(self.procs))


class Stacks:
    """Starts a twin's stack on first use; keeps one running at a time."""

    def __init__(self, cache_dir: Path, redis_url: str, logs: Path) -> None:
        self.cache_dir, self.redis_url, self.logs = cache_dir, redis_url, logs
        self.current: Stack | None = None

    def get(self, preset: str) -> Stack:
        if self.current is not None and self.current.preset == preset:
            return self.current
        self.close()
        self.current = self._start(preset)
        return self.current

    def _start(self, preset: str) -> Stack:
        """Start `preset`'s stack; one more try on fresh ports if the first is not healthy.

        The ports are picked free and then bound by three processes a moment later; on a busy
        CI machine another process can take one in between (seen once: the stack never became
        healthy). The first failure is kept in the log folder, and a second one fails the test
        with every service's log tail.
        """
        from services.common.presets import load_preset
        from services.models.tiny import ensure_generated

        ensure_generated(load_preset(preset, cache_dir=self.cache_dir))
        try:
            return self._start_once(preset, self.logs / preset)
        except AssertionError as first:
            (self.logs / f"{preset}-first-try.txt").write_text(str(first))
            return self._start_once(preset, self.logs / f"{preset}-retry")

    def _start_once(self, preset: str, logs: Path) -> Stack:
        enc_http, enc_grpc, enc_metrics, llm_port, gw_http, gw_grpc = free_ports(6)
        env = {
            "MODALMESH_PRESET": preset,
            "MODALMESH_CACHE_DIR": str(self.cache_dir),
            "MODALMESH_LOG_JSON": "true",
            "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
            "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
            "MODALMESH_REDIS_URL": self.redis_url,
            "MODALMESH_VIDEO_MAX_SECONDS": str(VIDEO_MAX_SECONDS),
            "MODALMESH_VIDEO_MAX_FRAMES": str(VIDEO_MAX_FRAMES),
        }
        stack = Stack(preset)
        try:
            stack.procs.append(
                start_encoders(env, logs / "encoders.log", http=enc_http, grpc=enc_grpc, metrics=enc_metrics)
            )
            stack.procs.append(start_llm(env, logs / "llm.log", port=llm_port))
            gateway, stack.base_url, stack.grpc_address = start_gateway(
                env, logs / "gateway.log", ports=(gw_http, gw_grpc)
            )
            stack.procs.append(gateway)
            wait_stack_healthy(stack.base_url, stack.procs, timeout=240, what=f"{preset} stack")
        except BaseException:
            stack.stop()
            raise
        return stack

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
        self.current = None


@pytest.fixture(scope="module")
def stacks(
    tiny_cache_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stacks]:
    pool = Stacks(tiny_cache_dir, redis_url, tmp_path_factory.mktemp("presets-e2e-logs"))
    try:
        yield pool
    finally:
        pool.close()


# ---- request helpers -------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def image_part(data: bytes | None = None) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(data or png_bytes())}"}}


def video_part(data: bytes, media_type: str = "video/mp4") -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": f"data:{media_type};base64,{b64(data)}"}}


def audio_part(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def audio_url_part(data: bytes, media_type: str) -> dict[str, Any]:
    return {"type": "audio_url", "audio_url": {"url": f"data:{media_type};base64,{b64(data)}"}}


def event_part(data: bytes, fmt: str = "npy") -> dict[str, Any]:
    return {"type": "input_event", "input_event": {"data": b64(data), "format": fmt}}


def media_part(modality: str, data: bytes, media_type: str | None = None) -> dict[str, Any]:
    """The generic part: inline base64, or a data: URL when `media_type` is given."""
    source = {"url": f"data:{media_type};base64,{b64(data)}"} if media_type else {"data": b64(data)}
    return {"type": "input_media", "input_media": {"modality": modality, **source}}


def event_url_part(data: bytes) -> dict[str, Any]:
    return {"type": "event_url", "event_url": {"url": f"data:application/octet-stream;base64,{b64(data)}"}}


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def assistant(t: str) -> dict[str, Any]:
    return {"role": "assistant", "content": t}


QUESTION = "What happens here?"


def video(seconds: int = 2, fps: int = 4, fmt: str = "mp4") -> bytes:
    return make_video(seconds * fps, fps, (64, 48), fmt)


def audio(fmt: str = "wav", seconds: float = 1.0) -> bytes:
    return make_audio(seconds, 16000, fmt, 440.0)


def events(form: str = "pickle_dict", seed: int = 0) -> bytes:
    return make_events(2000, 32, 24, form=form, seed=seed)


def media_tokens(preset: str, modality: str, frames: int | None = None) -> int:
    """LLM tokens one item becomes, from the preset (SEEDS_SPEC's counts at tiny sizes)."""
    from services.common.presets import load_preset

    spec = load_preset(preset, cache_dir=Path("/nonexistent")).modalities[modality]  # type: ignore[index]
    enc, conn = spec.encoder, spec.connector
    frames = frames or (enc.sampling.frames_per_item(modality) if enc.sampling else None) or 1
    if conn.type in ("linear", "mlp2x_gelu"):
        return 1 if enc.backbone == "imagebind" else frames * enc.tokens_per_frame()
    if conn.type == "qformer":
        assert conn.qformer is not None
        return conn.qformer.num_query_tokens + conn.qformer.num_extra_query_tokens
    if conn.type == "instruct_qformer":
        return frames
    return frames + enc.tokens_per_frame()  # event_adaptor


def assert_media_adds(with_media: int, without: int, expected: int, slack: int = TEMPLATE_SLACK) -> None:
    """The media item added its `expected` tokens, plus at most the template's text around it."""
    added = with_media - without
    assert expected <= added <= expected + slack, (with_media, without, expected)


# ---- the twins, happy paths --------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-nextgpt", "tiny-pandagpt"])
def test_imagebind_twins_every_modality_mixed_and_multi_turn(stacks: Stacks, preset: str) -> None:
    """ImageBind twins: one shared Linear; the media of one user turn are summed into ONE token
    (tiny-pandagpt), or those of each modality of a turn (tiny-nextgpt)."""
    stack = stacks.get(preset)
    assert (
        media_tokens(preset, "image") == media_tokens(preset, "video") == media_tokens(preset, "audio") == 1
    )
    plain = stack.prompt_tokens([user(text(QUESTION))])
    one_image = stack.prompt_tokens([user(image_part(), text(QUESTION))])
    assert_media_adds(one_image, plain, 1)
    assert stack.prompt_tokens([user(video_part(video()), text(QUESTION))]) == one_image
    for fmt in ("wav", "flac", "ogg", "mp3"):
        assert stack.prompt_tokens([user(audio_part(audio(fmt), fmt), text(QUESTION))]) == one_image, fmt
    assert (
        stack.prompt_tokens([user(audio_url_part(audio("flac"), "audio/flac"), text(QUESTION))]) == one_image
    )
    # image + video + audio in one message: one summed token (PandaGPT), or one token per
    # modality (legacy NExT-GPT), each in "</Img><Img>" (two added tokens) after the previous.
    mixed = [user(image_part(png_bytes(seed=2)), video_part(video(3)), audio_part(audio()), text(QUESTION))]
    per_modality = preset == "tiny-nextgpt"  # media_combine: sum_per_modality
    assert stack.prompt_tokens(mixed) == one_image + (2 * (1 + 2) if per_modality else 0)
    # Several turns, a modality per turn: one token per turn that has media.
    turns = [
        user(video_part(video(fmt="webm"), "video/webm"), text(QUESTION)),
        assistant("A square moves."),
        user(audio_part(audio("ogg"), "ogg"), text("And this sound?")),
        assistant("A tone."),
        user(image_part(), text("And this picture?")),
    ]
    first = stack.prompt_tokens(turns[:1])
    assert first == one_image
    assert stack.prompt_tokens(turns) > first + 2


def test_pandagpt_takes_thermal_images_through_the_generic_part(stacks: Stacks) -> None:
    """Thermal, a modality added only through the registry and the preset: ImageBind's thermal
    tower -> the shared Linear -> summed with the turn's other media into one token (PandaGPT)."""
    stack = stacks.get("tiny-pandagpt")
    assert media_tokens("tiny-pandagpt", "thermal") == 1
    one_image = stack.prompt_tokens([user(image_part(), text(QUESTION))])
    grey = png_bytes(seed=5)
    assert stack.prompt_tokens([user(media_part("thermal", grey), text(QUESTION))]) == one_image
    assert stack.prompt_tokens([user(media_part("thermal", grey, "image/png"), text(QUESTION))]) == one_image
    mixed = [user(image_part(), media_part("thermal", grey), audio_part(audio()), text(QUESTION))]
    assert stack.prompt_tokens(mixed) == one_image


# ---- bad inputs: a 4xx saying what was expected, then a good request --------------------------


def _evil_npy(marker: Path) -> bytes:
    """An EventGPT-style pickled .npy whose loading with np.load(allow_pickle=True) creates `marker`."""

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    payload = {"x": Evil(), "y": np.zeros(5, np.uint16), "t": np.arange(5), "p": np.ones(5, np.uint8)}
    buf = io.BytesIO()
    np.save(buf, np.array(payload, dtype=object), allow_pickle=True)
    data = buf.getvalue()
    assert b"builtins" in data or b"io" in data  # the reference to open() is in the file
    return data


def _events_dict(**fields: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(fields, dtype=object), allow_pickle=True)
    return buf.getvalue()


def _good_events() -> dict[str, np.ndarray]:
    n = 50
    return {
        "x": np.arange(n, dtype=np.int64) % 32,
        "y": np.arange(n, dtype=np.int64) % 24,
        "t": np.arange(n, dtype=np.int64) * 100,
        "p": np.arange(n, dtype=np.int64) % 2,
    }


def _bad_media(tmp: Path) -> list[tuple[str, str, list[dict[str, Any]], int, list[str]]]:
    """(id, preset, messages, status, texts the error message must contain)."""
    good = _good_events()
    negative = good | {"x": good["x"] - 1}
    unsorted = good | {"t": good["t"][::-1].copy()}
    mp4 = video(2)
    cases: list[tuple[str, str, list[dict[str, Any]], int, list[str]]] = [
        (
            "not a video",
            "tiny-pandagpt",
            [user(video_part(os.urandom(3000)))],
            400,
            ["(video 0)", "not a video"],
        ),
        (
            "zero-frame video",
            "tiny-pandagpt",
            [user(video_part(make_video(0, 4, fmt="avi"), "video/x-msvideo"))],
            400,
            ["(video 0)", "expected at least one frame, got 0 frames"],
        ),
        (
            "truncated video",
            "tiny-pandagpt",
            [user(video_part(mp4[: len(mp4) // 2]))],
            400,
            ["(video 0)", "truncated"],
        ),
        (
            "video over the duration limit",
            "tiny-pandagpt",
            [user(video_part(video(VIDEO_MAX_SECONDS + 5, fps=1)))],
            400,
            [f"expected at most {VIDEO_MAX_SECONDS}"],
        ),
        (
            "video over the frame limit",
            "tiny-pandagpt",
            [user(video_part(video(10, fps=25)))],
            400,
            [f"expected at most {VIDEO_MAX_FRAMES}, got 250"],
        ),
        (
            "silent audio",
            "tiny-pandagpt",
            [user(audio_part(make_audio(1.0, 16000, "wav", amplitude=0.0)))],
            400,
            ["(audio 0)", "audio is silent: expected some sound"],
        ),
        (
            "zero-length audio",
            "tiny-pandagpt",
            [user(audio_part(make_audio(0.0, 16000, "wav")))],
            400,
            ["(audio 0)", "expected at least one sample"],
        ),
        (
            "unsupported audio format declared",
            "tiny-pandagpt",
            [user({"type": "input_audio", "input_audio": {"data": b64(audio()), "format": "aac"}})],
            400,
            ["input_audio.format: expected one of ['wav', 'mp3', 'flac', 'ogg'], got 'aac'"],
        ),
        (
            "unsupported audio format sent",
            "tiny-pandagpt",
            [user(audio_url_part(_aiff(), "audio/aiff"))],
            400,
            ["(audio 0)", "unsupported audio format: expected one of wav, mp3, flac, ogg, got aiff"],
        ),
        (
            "two videos",
            "tiny-pandagpt",
            [user(video_part(mp4), video_part(video(3)))],
            400,
            ["preset tiny-pandagpt accepts at most 1 video per request, got 2"],
        ),
        (
            "events to a preset without an event encoder",
            "tiny-pandagpt",
            [user(event_part(events()))],
            400,
            ["preset tiny-pandagpt has no event encoder; it accepts audio, image, thermal, video"],
        ),
        (
            "event file missing a field",
            "tiny-eventgpt",
            [user(event_part(_events_dict(**{k: v for k, v in good.items() if k != "p"})))],
            400,
            ["(event 0)", "expected fields x, y, t, p", "missing p"],
        ),
        (
            "negative coordinates",
            "tiny-eventgpt",
            [user(event_part(_events_dict(**negative)))],
            400,
            ["expected non-negative x coordinates, got -1"],
        ),
        (
            "coordinates out of the sensor",
            "tiny-eventgpt",
            [user(event_part(_events_dict(**good, width=np.int64(8), height=np.int64(24))))],
            400,
            ["expected x < width = 8"],
        ),
        (
            "unsorted timestamps",
            "tiny-eventgpt",
            [user(event_part(_events_dict(**unsorted)))],
            400,
            ["expected non-decreasing timestamps"],
        ),
        (
            "an npy that runs code when unpickled",
            "tiny-eventgpt",
            [user(event_part(_evil_npy(tmp / "pwned")))],
            400,
            ["(event 0)"],
        ),
        (
            "two event streams",
            "tiny-eventgpt",
            [user(event_part(events()), event_part(events(seed=1)))],
            400,
            ["preset tiny-eventgpt accepts at most 1 event stream per request, got 2"],
        ),
        (
            "a thermal image that is no image",
            "tiny-pandagpt",
            [user(media_part("thermal", b"%PDF-1.4 not a picture"))],
            400,
            ["thermal", "not an image"],
        ),
        (
            "a thermal image to a preset without a thermal encoder",
            "tiny-eventgpt",
            [user(media_part("thermal", png_bytes()))],
            400,
            ["preset tiny-eventgpt has no thermal encoder; it accepts event"],
        ),
        (
            "an image to a preset without an image encoder",
            "tiny-eventgpt",
            [user(image_part())],
            400,
            ["preset tiny-eventgpt has no image encoder; it accepts event"],
        ),
        (
            "a video to etchat that is an image",
            "tiny-etchat",
            [user(video_part(png_bytes(), "video/mp4"))],
            400,
            ["(video 0)", "not a video"],
        ),
    ]
    return cases


def _aiff() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.sin(np.arange(16000) / 10).astype(np.float32), 16000, format="AIFF")
    return buf.getvalue()


def _good_request(stack: Stack) -> None:
    media = {
        "tiny-pandagpt": video_part(video()),
        "tiny-eventgpt": event_part(events()),
        "tiny-etchat": video_part(video(2)),
    }[stack.preset]
    stack.ok([user(media, text(QUESTION))])


def _bad_ids(preset: str) -> list[str]:
    return [c[0] for c in _bad_media(Path("/nonexistent")) if c[1] == preset]


def check_bad_media(stacks: Stacks, tmp_path: Path, case: str) -> None:
    """The case's request gets its 4xx with the expected words; then a good request succeeds."""
    _, preset, messages, status, texts = next(c for c in _bad_media(tmp_path) if c[0] == case)
    stack = stacks.get(preset)
    r = stack.chat(messages)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for t in texts:
        assert t in error["message"], error["message"]
    assert not (tmp_path / "pwned").exists()  # the pickled open() never ran
    _good_request(stack)


def test_the_evil_npy_would_run_code(tmp_path: Path) -> None:
    """The file of the event test below does create its marker when numpy unpickles it."""
    np.load(io.BytesIO(_evil_npy(tmp_path / "pwned")), allow_pickle=True)
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", _bad_ids("tiny-pandagpt"))
def test_bad_video_and_audio_fail_alone(stacks: Stacks, tmp_path: Path, case: str) -> None:
    check_bad_media(stacks, tmp_path, case)


def test_videochat_video_and_image_turns(stacks: Stacks) -> None:
    preset = "tiny-videochat"
    stack = stacks.get(preset)
    expected = media_tokens(preset, "video")
    assert expected == media_tokens(preset, "image") == 12  # Q-Former 4 + 8 extra queries
    plain = stack.prompt_tokens([user(text(QUESTION))])
    with_image = stack.prompt_tokens([user(image_part(), text(QUESTION))])
    assert_media_adds(with_image, plain, expected)
    mp4 = stack.prompt_tokens([user(video_part(video()), text(QUESTION))])
    assert_media_adds(mp4, plain, expected, VIDEOCHAT_VIDEO_SLACK)
    # 4 frames at the same times whatever the container: the same prompt.
    assert stack.prompt_tokens([user(video_part(video(fmt="webm"), "video/webm"), text(QUESTION))]) == mp4
    assert stack.prompt_tokens([user(video_part(video(fmt="avi"), "video/x-msvideo"), text(QUESTION))]) == mp4
    # An image and a video in one message, and over two turns.
    both = stack.prompt_tokens([user(image_part(), video_part(video()), text(QUESTION))])
    assert both >= plain + 2 * expected
    turns = [
        user(video_part(video()), text(QUESTION)),
        assistant("A square."),
        user(image_part(), text("And here?")),
    ]
    assert stack.prompt_tokens(turns) >= plain + 2 * expected


def test_etchat_one_token_per_second_and_timestamps(stacks: Stacks) -> None:
    preset = "tiny-etchat"
    stack = stacks.get(preset)
    plain = stack.prompt_tokens([user(text(QUESTION))])
    three = stack.prompt_tokens([user(video_part(video(3)), text(QUESTION))])
    six = stack.prompt_tokens([user(video_part(video(6)), text(QUESTION))])
    eight = stack.prompt_tokens([user(video_part(video(8, fps=2)), text(QUESTION))])
    assert_media_adds(three, plain, media_tokens(preset, "video", frames=3))
    assert six - three == 3  # 1 fps: one frame, one token per second
    assert eight - three == 8 - 3  # up to max_frames (8), at the source's 2 fps too
    r = stack.chat([user(video_part(video(10, fps=2)), text(QUESTION))])  # over max_frames: refused
    assert r.status_code == 400 and "expected at most max_frames = 8 frames at 1 fps" in r.text, r.text
    reply = stack.ok([user(video_part(video(4)), text("When does it move?"))], max_tokens=8)
    message = reply["choices"][0]["message"]
    assert isinstance(message["timestamps"], list)  # a timestamp head: always a list
    for t in message["timestamps"]:
        assert set(t) == {"media_index", "frame", "seconds", "char_offset"}
        assert (
            t["media_index"] == 0
            and 0 <= t["frame"] < 4
            and t["seconds"] == pytest.approx(t["frame"], abs=0.01)
        )
        assert 0 <= t["char_offset"] <= len(message["content"])
    turns = [user(video_part(video(3)), text(QUESTION)), assistant("A square moves."), user(text("When?"))]
    assert stack.prompt_tokens(turns) > three

    # E.T. Bench vid style: time parts stand where the question writes <vid>, one token each.
    def between(*seconds: float) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [video_part(video(3)), text("Is it moving between ")]
        for i, t in enumerate(seconds):
            parts += [
                {"type": "time", "time": {"seconds": t}},
                text(" and " if i < len(seconds) - 1 else "?"),
            ]
        return [user(*parts)]

    two = stack.prompt_tokens(between(0.5, 2.0))
    assert stack.prompt_tokens(between(0.5, 2.0, 9.0)) >= two + 2  # one more <vid> and " and "
    r = stack.chat([user(text("At "), {"type": "time", "time": {"seconds": 1.0}}, text("?"))])
    assert r.status_code == 400 and "no video media" in r.text, r.text

    # The gRPC Chat API: a video part, the same prompt, timestamps as ChatTimestamp messages.
    import grpc

    from modalmesh.v1 import chat_pb2, chat_pb2_grpc

    request = chat_pb2.ChatRequest(
        model=preset,
        max_tokens=3,
        temperature=0,
        messages=[
            chat_pb2.ChatMessage(
                role="user",
                content=[
                    chat_pb2.ChatContentPart(video=chat_pb2.MediaInput(data=video(3))),
                    chat_pb2.ChatContentPart(text=QUESTION),
                ],
            )
        ],
    )
    with grpc.insecure_channel(stack.grpc_address) as channel:
        chunks = list(chat_pb2_grpc.ChatStub(channel).Complete(request, timeout=60))
    assert chunks[-1].finish_reason in ("stop", "length")
    assert chunks[-1].usage.prompt_tokens == three
    assert all(t.media_index == 0 for c in chunks for t in c.timestamps)


@pytest.mark.parametrize("case", _bad_ids("tiny-etchat"))
def test_bad_video_on_etchat_fails_alone(stacks: Stacks, tmp_path: Path, case: str) -> None:
    check_bad_media(stacks, tmp_path, case)


def test_eventgpt_every_event_file_form(stacks: Stacks) -> None:
    preset = "tiny-eventgpt"
    stack = stacks.get(preset)
    expected = media_tokens(preset, "event")
    assert expected == 5 + 17
    plain = stack.prompt_tokens([user(text(QUESTION))])
    pickled = stack.prompt_tokens([user(event_part(events()), text(QUESTION))])
    assert_media_adds(pickled, plain, expected)
    for form, fmt in (("structured", "npy"), ("array", "npy"), ("npz", "npz")):
        assert stack.prompt_tokens([user(event_part(events(form), fmt), text(QUESTION))]) == pickled, form
    assert stack.prompt_tokens([user(event_url_part(events(seed=3)), text(QUESTION))]) == pickled
    turns = [user(event_part(events()), text(QUESTION)), assistant("Something moves."), user(text("Where?"))]
    assert stack.prompt_tokens(turns) > pickled


@pytest.mark.parametrize("case", _bad_ids("tiny-eventgpt"))
def test_bad_events_fail_alone(stacks: Stacks, tmp_path: Path, case: str) -> None:
    check_bad_media(stacks, tmp_path, case)
