"""Benchmarks by name: each is a reader (data file -> samples), a request setting and a scorer.

Registered now:
- `shapes`: the synthetic held-out set `services.trainer.synth.synthesize` writes
  (`heldout.json`); scored by `services.common.answer_words.shapes_correct`, the rule
  `synth.score_reply` uses too.
- `llava`: LLaVA-format conversations with a reference answer, for images, audio, video or
  events; scored by exact match and contains, and by option letter where the reference is one
  (see `score_llava`).

E.T. Bench, MVBench and Charades-STA grounding have scorers in `services.eval.metrics` and
readers in `services.eval.etbench`; their entries ("etbench", "mvbench", "grounding") are
added to `BENCHMARKS` with their request builders (they need continued assistant turns and
time parts), not here yet.

A reader never raises on a bad sample: it returns the sample with `problem` set ("missing_media",
"missing_field"), and the runner counts it without asking the model. It raises only when the
file itself cannot be read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.answer_words import SHAPES_KINDS, shapes_correct
from services.common.errors import InvalidArgumentError, NotFoundError
from services.eval._scores import Scores, ratio
from services.eval.metrics import EMPTY_REFERENCE, ChoiceItem, contains_answer, exact_match
from services.eval.parsing import EMPTY_REPLY, NO_LETTER, OPTION_LETTERS, llava_letter, normalize_answer

MISSING_MEDIA = "missing_media"
MISSING_FIELD = "missing_field"
MEDIA_KEYS = ("image", "video", "audio", "event")  # LLaVA-format keys naming a media file


@dataclass(frozen=True)
class MediaRef:
    """One media file of a sample: its modality ("image", ...) and its path."""

    modality: str
    path: Path


@dataclass(frozen=True)
class Sample:
    """One question of a benchmark.

    Attributes:
        index: Position in the data file (the seed offset, and the order of the output).
        id: The sample's id (predictions are matched to samples by it when a run resumes).
        prompt: The user's text, media placeholders removed.
        media: Media sent before the text, in order.
        reference: The reference answer text ("" when the benchmark has none).
        extra: What the scorer needs besides the reply (e.g. shapes' "kind" and "answer").
        problem: Why the sample cannot be asked ("missing_media", "missing_field"), or None.
    """

    index: int
    id: str
    prompt: str
    media: tuple[MediaRef, ...] = ()
    reference: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to read it, ask it and score it.

    Attributes:
        name: Its registry name.
        read: (data path, media root or None) -> samples; the default media root is the data
            file's folder.
        score: (samples, their replies) -> Scores; every sample given has a reply.
        unreadable: (sample, reply) -> the reason the reply cannot be scored, or None; the
            runner counts these toward the bad-sample ratio while it runs.
        max_tokens: The reply length asked for.
    """

    name: str
    read: Callable[[Path, Path | None], list[Sample]]
    score: Callable[[Sequence[Sample], Sequence[str]], Scores]
    unreadable: Callable[[Sample, str], str | None]
    max_tokens: int = 24


def _load_list(path: Path, what: str) -> list[Any]:
    if not path.is_file():
        raise NotFoundError(f"{what}: no such file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{what}: {path} is not JSON: {e}") from e
    if not isinstance(data, list):
        raise InvalidArgumentError(f"{what}: expected a JSON list of samples, got {type(data).__name__}")
    return data


_PLACEHOLDER = re.compile(r"<(?:image|video|audio|event)>")


def _question(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first human turn (placeholders removed) and the gpt turn after it, or None."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    for i, turn in enumerate(turns[:-1]):
        if isinstance(turn, dict) and turn.get("from") == "human":
            reply = turns[i + 1]
            if isinstance(reply, dict) and reply.get("from") == "gpt" and isinstance(reply.get("value"), str):
                return _PLACEHOLDER.sub("", str(turn.get("value", ""))).strip(), reply["value"]
    return None


def _sample(index: int, record: Any, root: Path, extra: Mapping[str, Any] | None = None) -> Sample:
    if not isinstance(record, dict):
        return Sample(index, f"#{index}", "", problem=MISSING_FIELD)
    sample_id = str(record.get("id", f"#{index}"))
    qa = _question(record)
    if qa is None:
        return Sample(index, sample_id, "", problem=MISSING_FIELD)
    media = tuple(MediaRef(key, root / str(record[key])) for key in MEDIA_KEYS if record.get(key))
    problem = MISSING_MEDIA if any(not m.path.is_file() for m in media) else None
    return Sample(index, sample_id, qa[0], media, qa[1], extra or {}, problem)


# --- shapes --------------------------------------------------------------------------------


def _shapes_vocabulary(folder: Path, records: list[Any]) -> tuple[list[str], list[str]]:
    """Colours and shapes from meta.json beside the data (as synth writes it), else those the
    answers use."""
    meta = folder / "meta.json"
    if meta.is_file():
        data = json.loads(meta.read_text(encoding="utf-8"))
        if isinstance(data.get("colors"), list) and isinstance(data.get("shapes"), list):
            return [str(c) for c in data["colors"]], [str(s) for s in data["shapes"]]
    answers = [r["answer"] for r in records if isinstance(r, dict) and isinstance(r.get("answer"), dict)]
    return sorted({str(a.get("color")) for a in answers}), sorted({str(a.get("shape")) for a in answers})


def read_shapes(data: Path, media_root: Path | None) -> list[Sample]:
    """The shapes held-out set: `data` is heldout.json or the folder holding it."""
    path = data / "heldout.json" if data.is_dir() else data
    records = _load_list(path, "shapes")
    colors, shapes = _shapes_vocabulary(path.parent, records)
    root = media_root or path.parent
    samples = []
    for i, record in enumerate(records):
        sample = _sample(i, record, root)
        answer = record.get("answer") if isinstance(record, dict) else None
        kind = record.get("kind") if isinstance(record, dict) else None
        if kind not in SHAPES_KINDS or not isinstance(answer, dict) or not {"color", "shape"} <= set(answer):
            samples.append(dataclasses.replace(sample, media=(), problem=sample.problem or MISSING_FIELD))
            continue
        extra = {"kind": kind, "answer": dict(answer), "colors": colors, "shapes": shapes}
        samples.append(dataclasses.replace(sample, extra=extra))
    return samples


def score_shapes(samples: Sequence[Sample], replies: Sequence[str]) -> Scores:
    """Accuracy overall ("accuracy", main) and per question kind ("accuracy/<kind>")."""
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for sample, reply in zip(samples, replies, strict=True):
        x = sample.extra
        if not reply.strip():
            failed[EMPTY_REPLY] += 1
        ok = shapes_correct(reply, x["kind"], x["answer"], x["colors"], x["shapes"])
        for key in ("", x["kind"]):
            seen[key] += 1
            right[key] += ok
    metrics = {"accuracy": ratio(right[""], len(samples))}
    metrics |= {f"accuracy/{k}": ratio(right[k], seen[k]) for k in sorted(seen) if k}
    return Scores("accuracy", metrics, len(samples), dict(failed))


def _empty_reply(_sample: Sample, reply: str) -> str | None:
    return EMPTY_REPLY if not reply.strip() else None


# --- llava ---------------------------------------------------------------------------------

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s", re.MULTILINE)


def choice_of(prompt: str, reference: str) -> ChoiceItem | None:
    """The multiple-choice reading of a sample: when the reference is an option letter ("B",
    "B. a dog", "The answer is B"), the right option and the number of options (the option
    lines "A. ..." / "(A) ..." in the prompt, at least up to the right one); else None."""
    letter = llava_letter(reference, len(OPTION_LETTERS))
    if letter.value is None:
        return None
    listed = {OPTION_LETTERS.index(m) for m in _OPTION_LINE.findall(prompt)}
    n_options = max([letter.value + 1, *(i + 1 for i in listed)])
    return ChoiceItem(reply="", answer=letter.value, n_options=n_options)


def read_llava(data: Path, media_root: Path | None) -> list[Sample]:
    """LLaVA-format JSON: a list of {"id", "image" | "video" | "audio" | "event",
    "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}; the
    first human turn is asked, the gpt turn after it is the reference."""
    records = _load_list(data, "llava")
    root = media_root or data.parent
    samples = []
    for i, record in enumerate(records):
        sample = _sample(i, record, root)
        choice = choice_of(sample.prompt, sample.reference) if sample.problem is None else None
        if choice is not None:
            sample = dataclasses.replace(sample, extra={"choice": choice})
        samples.append(sample)
    return samples


def score_llava(samples: Sequence[Sample], replies: Sequence[str]) -> Scores:
    """ "exact" (main) and "contains" over all samples, and "letter": the accuracy over the
    multiple-choice samples alone (present when there are any).

    An open sample is right by `metrics.exact_match` / `metrics.contains_answer` against its
    reference (a reference that normalises to nothing is counted as "empty_reference"); a
    multiple-choice sample (see `choice_of`) is right in all three when the reply's letter
    (`parsing.llava_letter`, as `metrics.score_letter_choice` reads it) is the reference's:
    its reference is a letter, which `normalize_answer` would drop as the article "a". Every
    sample counts once in "failed" at most: "empty_reply", or why its letter is unreadable.
    """
    failed: Counter[str] = Counter()
    exact = contains = letters = choices = 0
    for sample, reply in zip(samples, replies, strict=True):
        choice = sample.extra.get("choice")
        choices += choice is not None
        if not reply.strip():
            failed[EMPTY_REPLY] += 1
        elif choice is not None:
            letter = llava_letter(reply, choice.n_options)
            if letter.value is None:
                failed[letter.reason or NO_LETTER] += 1
                continue
            hit = letter.value == choice.answer
            exact, contains, letters = exact + hit, contains + hit, letters + hit
        elif not normalize_answer(sample.reference):
            failed[EMPTY_REFERENCE] += 1
        else:
            exact += exact_match(reply, sample.reference)
            contains += contains_answer(reply, sample.reference)
    metrics = {"exact": ratio(exact, len(samples)), "contains": ratio(contains, len(samples))}
    if choices:
        metrics["letter"] = ratio(letters, choices)
    return Scores("exact", metrics, len(samples), dict(failed))


def _llava_unreadable(sample: Sample, reply: str) -> str | None:
    if not reply.strip():
        return EMPTY_REPLY
    choice = sample.extra.get("choice")
    return llava_letter(reply, choice.n_options).reason if choice is not None else None


BENCHMARKS: dict[str, Benchmark] = {
    "shapes": Benchmark("shapes", read_shapes, score_shapes, _empty_reply, max_tokens=24),
    "llava": Benchmark("llava", read_llava, score_llava, _llava_unreadable, max_tokens=64),
    # "etbench", "mvbench", "grounding": to come (see the module docstring).
}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as `name`.

    Raises:
        InvalidArgumentError: No such benchmark; the message lists those registered.
    """
    if name not in BENCHMARKS:
        raise InvalidArgumentError(f"benchmark: expected one of {sorted(BENCHMARKS)}, got {name!r}")
    return BENCHMARKS[name]
