"""Dataset records -> Samples: LLaVA conversations, caption pairs and E.T. Instruct records,
each record checked alone.

A record that breaks a rule raises `BadSampleError` with a short reason kind ("media_missing",
"roles", ...); the loader in `services.trainer.datasets` counts and logs those instead of
failing the whole dataset. Media files are only checked to exist, be readable and non-empty
here; their bytes are read later, by the trainer.

Media keys: the modality's name ("image", "video", "audio", "event"), "media", NExT-GPT's
"<modality>_name" (`{"video_name": ..., "caption": ...}`) or its new code base's
"input_<modality>"; one of them per record. PandaGPT's "conversation" is read as
"conversations".

Time tokens (E.T. Chat's "<vid>", when the preset has timestamp heads): a record in the
`etinstruct` format gives the seconds of each one, "src" for those in user turns and "tgt" for
those in assistant replies, in text order; a time token in any other record is a bad sample.

Placeholders: each occurrence of the modality's placeholder (e.g. "<image>") in a user message
marks where the next media item goes. Text around a placeholder is stripped, and a message's
parts render joined by "\\n" (the serving convention of `services.models.prompt.templates`), so LLaVA's
"<image>\\nWhat is this?" becomes [a MediaPart holding the file, "What is this?"] and renders back
unchanged.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.common.content import MediaPart, Part, TextPart, Turn, media_parts
from services.common.errors import InvalidArgumentError
from services.models.prompt.templates import check_roles

# LLaVA's "from" values, and the OpenAI-style ones, mapped to template roles.
ROLE_NAMES: Mapping[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class BadSampleError(InvalidArgumentError):
    """One sample of a dataset breaks a rule; the loader skips and counts it.

    Args:
        reason: A short kind for counting, e.g. "media_missing", "too_long".
        message: What was expected and what came.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class MediaFile:
    """A media item of a sample: its modality and the file holding it (read lazily)."""

    modality: str
    path: Path


@dataclass(frozen=True)
class Sample:
    """One training conversation.

    Attributes:
        id: The record's "id", or its index in the dataset when it has none.
        turns: An optional system turn, then user/assistant turns alternating, ending with
            the assistant's; each media part carries its `MediaFile`.
        times: Seconds of each time token ("<vid>") in the text, in text order.
    """

    id: str
    turns: tuple[Turn[MediaFile], ...]
    times: tuple[float, ...] = ()

    @property
    def media(self) -> tuple[MediaFile, ...]:
        """The media files of the media parts, in the order they appear."""
        return tuple(p.media for p in media_parts(self.turns))


@dataclass(frozen=True)
class RecordRules:
    """What records of one dataset are parsed and checked against.

    Attributes:
        modality: The modality of every media item (the dataset spec's).
        placeholder: That modality's placeholder string in the preset, e.g. "<image>".
        max_per_prompt: Most items one sample may hold.
        media_root: Relative media paths are resolved against this folder.
        time_token: The preset's time token (E.T. Chat's "<vid>"), or None without timestamp heads.
    """

    modality: str
    placeholder: str
    max_per_prompt: int
    media_root: Path
    time_token: str | None = None

    def __post_init__(self) -> None:
        if not self.placeholder:
            raise InvalidArgumentError(f"{self.modality} placeholder: expected a non-empty string")


def record_id(record: Any) -> str:
    """The id a record is reported under: its "id" if that is a string or int, else ''."""
    if isinstance(record, dict):
        value = record.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return ""


def _object(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadSampleError("not_object", f"expected a JSON object, got {_kind(record)}")
    return record


def _kind(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def media_keys(modality: str) -> tuple[str, ...]:
    """The record keys that may hold a modality's media path(s)."""
    return tuple(dict.fromkeys((modality, "media", f"{modality}_name", f"input_{modality}")))


def _media_paths(record: dict[str, Any], modality: str) -> list[str]:
    keys = [k for k in media_keys(modality) if record.get(k) is not None]
    if len(keys) > 1:
        raise BadSampleError(
            "bad_field", f"expected only one of {list(media_keys(modality))}, got several: {keys}"
        )
    if not keys:
        return []
    key, value = keys[0], record[keys[0]]
    paths = value if isinstance(value, list) else [value]
    for path in paths:
        if not isinstance(path, str) or not path.strip():
            raise BadSampleError(
                "bad_field", f"{key}: expected a path or a list of paths, got {_kind(path)} {path!r}"
            )
    return [p.strip() for p in paths]


def _media(paths: list[str], rules: RecordRules) -> tuple[MediaFile, ...]:
    if len(paths) > rules.max_per_prompt:
        raise BadSampleError(
            "too_many_media",
            f"expected at most {rules.max_per_prompt} {rules.modality} items, got {len(paths)}",
        )
    # An absolute path stays as it is: root / "/abs" == "/abs".
    return tuple(MediaFile(rules.modality, rules.media_root / p) for p in paths)


def _user_parts(value: str, placeholder: str, media: Iterator[MediaFile]) -> list[Part[MediaFile]]:
    """A user message's parts, each placeholder taking the next file of `media` (a placeholder
    past the last file is left out; the caller refuses the count)."""
    parts: list[Part[MediaFile]] = []
    for j, piece in enumerate(value.split(placeholder)):
        item = next(media, None) if j else None
        if item is not None:
            parts.append(MediaPart(item))
        if piece.strip():
            parts.append(TextPart(piece.strip()))
    return parts


def _plain_text(value: str, placeholder: str, where: str) -> str:
    if placeholder in value:
        raise BadSampleError(
            "reserved_placeholder",
            f"{where}: contains {placeholder!r}, which only user turns may hold (one per media item)",
        )
    return value.strip()


def parse_llava(record: Any, rules: RecordRules, *, index: int) -> Sample:
    """Parse one LLaVA record: {"id", "image" (path, list or absent), "conversations"}.

    Args:
        record: One decoded JSON value.
        rules: What the record is checked against.
        index: Its position in the dataset; the id when the record has none.

    Raises:
        BadSampleError: The record is malformed; `reason` says how.
    """
    obj = _object(record)
    media = _media(_media_paths(obj, rules.modality), rules)
    convs = obj.get("conversations", obj.get("conversation"))
    if not isinstance(convs, list):
        kind = "missing_field" if convs is None else "bad_field"
        raise BadSampleError(kind, f"conversations: expected a list of messages, got {_kind(convs)}")
    turns: list[Turn[MediaFile]] = []
    refs = 0
    unplaced = iter(media)
    for i, message in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(message, dict):
            raise BadSampleError("bad_field", f"{where}: expected an object, got {_kind(message)}")
        name, value = message.get("from"), message.get("value")
        if not isinstance(name, str) or name.lower() not in ROLE_NAMES:
            raise BadSampleError("roles", f"{where}.from: expected one of {sorted(ROLE_NAMES)}, got {name!r}")
        if not isinstance(value, str):
            raise BadSampleError("bad_field", f"{where}.value: expected a string, got {_kind(value)}")
        role = ROLE_NAMES[name.lower()]
        if role == "user":
            refs += value.count(rules.placeholder)
            parts = _user_parts(value, rules.placeholder, unplaced)
        else:
            text = _plain_text(value, rules.placeholder, where)
            parts = [TextPart(text)] if text else []
        turns.append(Turn(role, tuple(parts)))
    if refs == 0 and media:
        turns = _media_first(turns, media)
    elif refs != len(media):
        raise BadSampleError(
            "placeholder_count",
            f"expected {len(media)} {rules.placeholder!r} placeholder(s), one per {rules.modality} "
            f"item, got {refs}",
        )
    _check_turns(turns)
    sample = Sample(id=record_id(obj) or str(index), turns=tuple(turns))
    if rules.time_token is not None:
        in_user, in_replies = _time_tokens(sample, rules.time_token)
        if in_user + in_replies:
            raise BadSampleError(
                "time_token_count",
                f"the text holds {in_user + in_replies} {rules.time_token!r} token(s) but the record "
                "gives no times (use format etinstruct with src/tgt)",
            )
    return sample


def _time_tokens(sample: Sample, token: str) -> tuple[int, int]:
    """(time tokens in user turns, in assistant turns) of a sample's text."""
    counts = {"user": 0, "assistant": 0, "system": 0}
    for turn in sample.turns:
        for part in turn.parts:
            if isinstance(part, TextPart):
                counts[turn.role] += part.text.count(token)
    if counts["system"]:
        raise BadSampleError("time_token_count", f"the system message holds {token!r}; only turns may")
    return counts["user"], counts["assistant"]


def _seconds(obj: dict[str, Any], key: str, duration: float | None) -> list[float]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise BadSampleError("bad_field", f"{key}: expected a list of seconds, got {_kind(value)} {value!r}")
    for v in value:
        if not math.isfinite(v) or v < 0 or (duration is not None and v > duration):
            limit = f"[0, {duration:g}] (the duration)" if duration is not None else ">= 0"
            raise BadSampleError("time_out_of_range", f"{key}: expected seconds in {limit}, got {v!r}")
    return [float(v) for v in value]


def parse_etinstruct(record: Any, rules: RecordRules, *, index: int) -> Sample:
    """Parse one E.T. Instruct record: {"video", "duration", "src", "tgt", "conversations"}.

    The conversation is read as LLaVA's; "src" gives the seconds of the time tokens in user
    turns and "tgt" those in assistant replies, each in text order (E.T. Chat adds the frame at
    each of them to the token's embedding, and learns to match the replies' ones).

    Raises:
        BadSampleError: As `parse_llava`, or "time_token_count" (tokens and times disagree),
            "time_out_of_range" (a time outside [0, duration]) or "bad_field".
    """
    if rules.time_token is None:
        raise InvalidArgumentError(
            "format etinstruct: the preset has no timestamp heads (heads.timestamps), so its "
            "time tokens mean nothing to it"
        )
    obj = _object(record)
    duration = obj.get("duration")
    if duration is not None and (
        not isinstance(duration, int | float) or isinstance(duration, bool) or not duration > 0
    ):
        raise BadSampleError("bad_field", f"duration: expected seconds > 0, got {duration!r}")
    src = _seconds(obj, "src", duration)
    tgt = _seconds(obj, "tgt", duration)
    sample = parse_llava(
        {k: v for k, v in obj.items() if k not in ("src", "tgt")},
        replace(rules, time_token=None),
        index=index,
    )
    in_user, in_replies = _time_tokens(sample, rules.time_token)
    if (in_user, in_replies) != (len(src), len(tgt)):
        raise BadSampleError(
            "time_token_count",
            f"expected one {rules.time_token!r} per time: {len(src)} in user turns (src) and "
            f"{len(tgt)} in replies (tgt), got {in_user} and {in_replies}",
        )
    return replace(sample, times=tuple(_text_order_times(sample, rules.time_token, src, tgt)))


def _text_order_times(sample: Sample, token: str, src: list[float], tgt: list[float]) -> list[float]:
    user, reply = iter(src), iter(tgt)
    out = []
    for turn in sample.turns:
        for part in turn.parts:
            if isinstance(part, TextPart):
                out += [next(user if turn.role == "user" else reply) for _ in range(part.text.count(token))]
    return out


def _media_first(turns: list[Turn[MediaFile]], media: tuple[MediaFile, ...]) -> list[Turn[MediaFile]]:
    """LLaVA's rule for samples without placeholders: all media open the first user turn."""
    parts: list[Part[MediaFile]] = [MediaPart(m) for m in media]
    for i, turn in enumerate(turns):
        if turn.role == "user":
            return [*turns[:i], Turn("user", (*parts, *turn.parts)), *turns[i + 1 :]]
    raise BadSampleError("no_user", f"expected a user turn to hold the {len(media)} media item(s), got none")


def _check_turns(turns: list[Turn[MediaFile]]) -> None:
    if not any(t.role == "assistant" for t in turns):
        raise BadSampleError(
            "no_assistant", f"expected at least one assistant turn, got {len(turns)} turn(s)"
        )
    for i, turn in enumerate(turns):
        if not turn.parts:
            raise BadSampleError("empty_text", f"conversations[{i}]: {turn.role} message is empty")
    try:
        check_roles(turns, last_user=False)
    except InvalidArgumentError as e:
        raise BadSampleError("roles", e.message) from None
    if turns[-1].role != "assistant":
        raise BadSampleError(
            "roles", f"turns[{len(turns) - 1}]: expected the last turn to be the assistant's, got 'user'"
        )


def parse_caption(record: Any, rules: RecordRules, *, index: int) -> Sample:
    """Parse one caption pair {"image" (or "video", "audio", "event", "media",
    "<modality>_name", "input_<modality>"): path, "caption": text}.

    The pair becomes a user turn holding the media item and an assistant turn with the caption.

    Raises:
        BadSampleError: The record is malformed; `reason` says how.
    """
    obj = _object(record)
    paths = _media_paths(obj, rules.modality)
    if len(paths) != 1:
        kind = "missing_field" if not paths else "bad_field"
        raise BadSampleError(kind, f"{rules.modality}: expected one path, got {len(paths)}")
    caption = obj.get("caption")
    if not isinstance(caption, str):
        kind = "missing_field" if caption is None else "bad_field"
        raise BadSampleError(kind, f"caption: expected a string, got {_kind(caption)}")
    text = _plain_text(caption, rules.placeholder, "caption")
    if not text:
        raise BadSampleError("empty_text", "caption: expected text, got an empty string")
    (media,) = _media(paths, rules)
    turns: tuple[Turn[MediaFile], ...] = (
        Turn("user", (MediaPart(media),)),
        Turn("assistant", (TextPart(text),)),
    )
    return Sample(id=record_id(obj) or str(index), turns=turns)


def check_media_files(sample: Sample, seen: dict[Path, BadSampleError | None]) -> None:
    """Check each media file exists, is a readable regular file and is not empty.

    Args:
        sample: The sample whose media to check.
        seen: Results by path, shared across a dataset so a file used twice is checked once.

    Raises:
        BadSampleError: "media_missing", "media_unreadable" or "media_empty".
    """
    for i, item in enumerate(sample.media):
        if item.path not in seen:
            seen[item.path] = _media_problem(item.path)
        problem = seen[item.path]
        if problem is not None:
            raise BadSampleError(problem.reason, f"media[{i}]: {problem.message}")


def _media_problem(path: Path) -> BadSampleError | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return BadSampleError("media_missing", f"{path}: expected a file, found nothing")
    except OSError as e:
        return BadSampleError("media_unreadable", f"{path}: cannot stat ({e.strerror})")
    if not stat.S_ISREG(info.st_mode):
        return BadSampleError("media_missing", f"{path}: expected a file, found a directory or device")
    if info.st_size == 0:
        return BadSampleError("media_empty", f"{path}: expected media bytes, got an empty file")
    if not os.access(path, os.R_OK):
        return BadSampleError("media_unreadable", f"{path}: not readable (permission denied)")
    return None
