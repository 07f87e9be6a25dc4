"""The chat request the runner sends for a sample, what it reads back, and when it retries.

Pure functions: no network. Media travel inline, as the gateway accepts them
(`gateway/protocol.py`): images as `image_url` data URLs, audio as `input_audio`, events as
`input_event`, video as a `video_url` data URL.
"""

from __future__ import annotations

import base64
import email.utils
import time
from pathlib import Path
from typing import Any

from services.eval.benchmarks import MISSING_MEDIA, Sample

RETRY_STATUSES = frozenset({429, 503})
_IMAGE_TYPES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp", ".bmp": "bmp"}
_VIDEO_TYPES = {
    ".mp4": "mp4",
    ".mov": "quicktime",
    ".webm": "webm",
    ".mkv": "x-matroska",
    ".avi": "x-msvideo",
}


class MissingMediaError(Exception):
    """A sample's media file is not there (reason "missing_media")."""

    reason = MISSING_MEDIA


def media_part(modality: str, path: Path) -> dict[str, Any]:
    """One content part carrying the file at `path` inline.

    Raises:
        MissingMediaError: The file does not exist.
    """
    try:
        data = base64.b64encode(path.read_bytes()).decode()
    except FileNotFoundError as e:
        raise MissingMediaError(f"{modality} file not found: {path}") from e
    suffix = path.suffix.lower()
    if modality == "image":
        url = f"data:image/{_IMAGE_TYPES.get(suffix, 'png')};base64,{data}"
        return {"type": "image_url", "image_url": {"url": url}}
    if modality == "video":
        url = f"data:video/{_VIDEO_TYPES.get(suffix, 'mp4')};base64,{data}"
        return {"type": "video_url", "video_url": {"url": url}}
    if modality == "audio":
        return {"type": "input_audio", "input_audio": {"data": data, "format": suffix.lstrip(".") or "wav"}}
    if modality == "event":
        return {"type": "input_event", "input_event": {"data": data, "format": suffix.lstrip(".") or "npy"}}
    return {"type": "input_media", "input_media": {"modality": modality, "data": data}}


def chat_body(
    sample: Sample, *, model: str, seed: int, temperature: float = 0.0, max_tokens: int = 24
) -> dict[str, Any]:
    """The POST /v1/chat/completions body for a sample: one user message with its media parts
    then its text, the model pinned as given ("tiny", "tiny@3"), a fixed seed.

    Raises:
        MissingMediaError: A media file does not exist.
    """
    content = [media_part(m.modality, m.path) for m in sample.media]
    content.append({"type": "text", "text": sample.prompt})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }


def reply_text(body: Any) -> str | None:
    """The first choice's message content of a chat.completion body, or None if it has none."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def error_message(body: Any, fallback: str) -> str:
    """The gateway's error message ({"error": {"message": ...}}), else `fallback`."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if isinstance(message, str) and message:
            return message
    return fallback


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(
    attempt: int,
    status: int | None,
    *,
    retry_after: float | None = None,
    retries: int = 5,
    base_s: float = 0.5,
    cap_s: float = 30.0,
) -> float | None:
    """How long to wait before trying a sample again, or None to give up.

    Retried: 429 and 503 (`status`), and connection errors and timeouts (`status` None), at most
    `retries` times. The wait is the server's Retry-After when it sent one (capped at `cap_s`),
    else `base_s * 2**attempt`, capped at `cap_s`.

    Args:
        attempt: Tries made so far that failed, from 1.
        status: The HTTP status, or None when no response came.
        retry_after: Seconds from the response's Retry-After header.
        retries: Retries allowed after the first try.
        base_s: The first backoff.
        cap_s: The longest wait.
    """
    if attempt > retries or (status is not None and status not in RETRY_STATUSES):
        return None
    if retry_after is not None:
        return min(retry_after, cap_s)
    return min(base_s * 2 ** (attempt - 1), cap_s)
