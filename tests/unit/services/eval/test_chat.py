"""The chat body sent for a sample, reading replies and errors, and the retry decisions."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from services.eval._chat import (
    MissingMediaError,
    chat_body,
    error_message,
    parse_retry_after,
    reply_text,
    retry_delay,
)
from services.eval.benchmarks import MediaRef, Sample


def test_chat_body_has_media_text_model_seed(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"\x89PNG-bytes")
    (tmp_path / "t.wav").write_bytes(b"RIFF")
    sample = Sample(
        3,
        "s3",
        "What color is the shape?",
        (MediaRef("image", tmp_path / "a.png"), MediaRef("audio", tmp_path / "t.wav")),
    )
    body = chat_body(sample, model="tiny@3", seed=10, max_tokens=24)
    assert {k: body[k] for k in ("model", "seed", "temperature", "max_tokens")} == {
        "model": "tiny@3",
        "seed": 10,
        "temperature": 0.0,
        "max_tokens": 24,
    }
    [message] = body["messages"]
    assert message["role"] == "user"
    image, audio, text = message["content"]
    prefix = "data:image/png;base64,"
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(image["image_url"]["url"][len(prefix) :]) == b"\x89PNG-bytes"
    assert audio == {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"},
    }
    assert text == {"type": "text", "text": "What color is the shape?"}


def test_chat_body_video_and_missing_media(tmp_path: Path) -> None:
    (tmp_path / "v.mp4").write_bytes(b"mp4")
    body = chat_body(Sample(0, "v", "Q", (MediaRef("video", tmp_path / "v.mp4"),)), model="m", seed=0)
    assert body["messages"][0]["content"][0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    with pytest.raises(MissingMediaError, match="image file not found"):
        chat_body(Sample(0, "x", "Q", (MediaRef("image", tmp_path / "gone.png"),)), model="m", seed=0)


def test_reply_and_error_reading() -> None:
    assert reply_text({"choices": [{"message": {"content": "red"}}]}) == "red"
    assert reply_text({"choices": []}) is None
    assert reply_text({"choices": [{"message": {"content": None}}]}) is None
    assert reply_text("oops") is None
    assert error_message({"error": {"message": "model 'x' not found"}}, "fallback") == "model 'x' not found"
    assert error_message(None, "fallback") == "fallback"


@pytest.mark.parametrize(
    ("attempt", "status", "retry_after", "expected"),
    [
        (1, 503, None, 0.5),
        (2, 503, None, 1.0),
        (3, None, None, 2.0),  # connection error
        (4, 429, 7.0, 7.0),  # Retry-After wins
        (1, 429, 99.0, 30.0),  # capped
        (5, 503, None, 8.0),
        (6, 503, None, None),  # retries spent
        (1, 400, None, None),
        (1, 404, 3.0, None),
        (1, 500, None, None),
    ],
)
def test_retry_delay(
    attempt: int, status: int | None, retry_after: float | None, expected: float | None
) -> None:
    assert retry_delay(attempt, status, retry_after=retry_after, retries=5) == expected


def test_retry_delay_cap_on_backoff() -> None:
    assert retry_delay(10, 503, retries=20, base_s=1.0, cap_s=4.0) == 4.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    # an HTTP date 10 s after "now"
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:20 GMT", now=10.0) == 10.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:05 GMT", now=10.0) == 0.0
