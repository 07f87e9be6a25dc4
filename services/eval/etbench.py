"""E.T. Bench annotation files: reading and checking them, writing predictions back, scoring.

The format is the one documented in PolyU-ChenLab/ETBench `docs/BENCHMARK.md`: a JSON list of
samples with `idx, task, source, video, duration, q` and, by task, `src` (times in the model's
input), `tgt` (true times), `p` and `o` (right option and options), `g` (true captions);
`version` may be present. Two styles of file: in `txt` style the times are written in `q`; in
`vid` style each time in `q` is a "<vid>" token and `src` holds their seconds, in order.

Reading checks each sample alone and skips a bad one with a reason ("missing_field",
"unknown_task", "bad_tgt", ...) instead of failing the file; only a file that is not a JSON list
is an error. The prediction file is the same list, each sample as read plus an `a` entry holding
the model's raw reply, as E.T. Chat's `etchat/eval/infer_etbench.py` writes it and E.T. Bench's
`compute_metrics.py` reads it (we have not run that script).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import InvalidArgumentError
from services.eval import metrics
from services.eval.metrics import Scores
from services.eval.parsing import Span

TIME_TOKEN = "<vid>"
CHOICE_TASKS = frozenset({"rar", "eca", "rvq", "gvq"})
ONE_SPAN_TASKS = frozenset({"tvg", "epm", "gvq"})
CAPTION_TASKS = frozenset({"dvc", "slc"})
TASKS = ("rar", "eca", "rvq", "tvg", "epm", "tal", "evs", "vhd", "dvc", "slc", "tem", "gvq")
TGT_TASKS = frozenset(TASKS) - {"rar", "eca", "rvq"}
NO_ANSWER = "no_answer"


class ETBenchSample(BaseModel):
    """One E.T. Bench sample, its fields as `docs/BENCHMARK.md` lists them; other keys are
    kept. Types are strict: "3" is not an idx.

    Attributes:
        idx: The sample's index.
        task: One of TASKS.
        source: The source dataset, e.g. "qvhighlights".
        video: The video path, relative to the benchmark's videos folder.
        duration: The video's length, seconds.
        q: The prompt.
        src: Seconds of the times in the prompt; in `vid` style one per "<vid>" in `q`.
        tgt: True times: [start, end] (TVG, EPM, GVQ), a list of spans (TAL, EVS, TEM, DVC,
            SLC), or for VHD spans or one list of spans per annotator.
        p: Index of the right option (RAR, ECA, RVQ, GVQ).
        o: The options (text, or spans for ECA).
        g: True captions, one per span of `tgt` (DVC, SLC).
        a: The model's reply, in a prediction file.
    """

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    idx: int
    task: str
    source: str
    video: str
    duration: Annotated[float, Field(gt=0)]
    q: str
    src: list[float] | None = None
    tgt: list[Any] | None = None
    p: int | None = None
    o: list[Any] | None = None
    g: list[str] | None = None
    a: str | None = None

    @property
    def style(self) -> str:
        """The sample's style: "vid" when its prompt holds "<vid>" tokens, else "txt"."""
        return "vid" if TIME_TOKEN in self.q else "txt"

    def span(self) -> Span:
        """The one true span of TVG, EPM and GVQ (checked when read)."""
        tgt = self.tgt or []
        return _spans(tgt if _is_span(tgt) else tgt[0])[0]

    def spans(self) -> list[Span]:
        """The true spans of TAL, EVS, TEM, DVC, SLC (checked when read)."""
        return _spans(self.tgt)

    def annotators(self) -> list[list[Span]]:
        """VHD's highlight spans per annotator; spans alone are one annotator."""
        tgt = self.tgt or []
        if tgt and all(_is_span(x) for x in tgt):
            return [_spans(tgt)]
        return [_spans(spans) for spans in tgt]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_span(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_is_number(t) for t in x)


def _spans(x: Any) -> list[Span]:
    if _is_span(x):
        x = [x]
    return [(float(min(s)), float(max(s))) for s in x]


def _is_spans(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(_is_span(s) for s in x)


def _tgt_problem(sample: ETBenchSample) -> str | None:
    tgt, task = sample.tgt, sample.task
    if tgt is None:
        return "missing_field: tgt"
    if task in ONE_SPAN_TASKS:
        ok = _is_span(tgt) or (len(tgt) == 1 and _is_span(tgt[0]))
        return None if ok else f"tgt: expected [start, end], got {tgt!r:.80}"
    if task == "vhd":
        ok = _is_spans(tgt) or (bool(tgt) and all(_is_spans(a) for a in tgt))
        return None if ok else f"tgt: expected spans or spans per annotator, got {tgt!r:.80}"
    if not _is_spans(tgt):
        return f"tgt: expected a list of [start, end], got {tgt!r:.80}"
    return None


@dataclass(frozen=True)
class Problem:
    """One sample that was skipped.

    Attributes:
        position: Its position in the file's list.
        idx: Its `idx`, when it had a readable one.
        reason: A short kind for counting: "not_an_object", "missing_field", "bad_field",
            "unknown_task", "bad_tgt", "bad_options", "bad_answer_index", "bad_captions",
            "vid_src_mismatch", "duplicate_idx", "missing_video".
        detail: What was expected and what came.
    """

    position: int
    idx: Any
    reason: str
    detail: str


@dataclass
class ReadReport:
    """What reading a file kept and skipped.

    Attributes:
        total: Samples in the file.
        kept: Samples that passed the checks.
        reasons: Skipped samples by reason.
        problems: Every skipped sample.
    """

    total: int = 0
    kept: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ETBenchRecord:
    """A kept sample: where it was, the dict as read (for writing back), and its checked form.

    Attributes:
        position: Position in the file's list.
        raw: The sample exactly as read.
        sample: The checked sample.
    """

    position: int
    raw: Mapping[str, Any]
    sample: ETBenchSample


def _check(sample: ETBenchSample, media_root: Path | None) -> tuple[str, str] | None:
    """(reason, detail) for the first rule the sample breaks, or None."""
    task = sample.task
    if task not in TASKS:
        return "unknown_task", f"task: expected one of {', '.join(TASKS)}, got {task!r}"
    if task in CHOICE_TASKS:
        if sample.o is None or sample.p is None:
            return "missing_field", f"{'o' if sample.o is None else 'p'}: required for task {task}"
        if not 2 <= len(sample.o) <= 26:
            return "bad_options", f"o: expected 2 to 26 options, got {len(sample.o)}"
        if not 0 <= sample.p < len(sample.o):
            return "bad_answer_index", f"p: expected 0..{len(sample.o) - 1}, got {sample.p}"
    if task in TGT_TASKS:
        problem = _tgt_problem(sample)
        if problem is not None:
            kind = "missing_field" if problem.startswith("missing_field") else "bad_tgt"
            return kind, problem.removeprefix("missing_field: ")
    if task in CAPTION_TASKS and (sample.g is None or len(sample.g) != len(sample.tgt or [])):
        got = "none" if sample.g is None else str(len(sample.g))
        return "bad_captions", f"g: expected one caption per span of tgt ({len(sample.tgt or [])}), got {got}"
    n_tokens = sample.q.count(TIME_TOKEN)
    if n_tokens and n_tokens != len(sample.src or []):
        return (
            "vid_src_mismatch",
            f"src: expected {n_tokens} times for the <vid> tokens of q, got {sample.src}",
        )
    if media_root is not None and not (media_root / sample.video).is_file():
        return "missing_video", f"video: expected a file at {media_root / sample.video}, found none"
    return None


def read_etbench(
    source: Path | Sequence[Any], *, media_root: Path | None = None
) -> tuple[list[ETBenchRecord], ReadReport]:
    """Read an E.T. Bench annotation or prediction file, keeping the samples that pass.

    Args:
        source: The JSON file, or its already-parsed list.
        media_root: When given, each sample's video must exist under it ("missing_video").

    Returns:
        The kept samples in file order, and the report of what was skipped and why.

    Raises:
        InvalidArgumentError: The file cannot be read, is not JSON, or is not a list.
    """
    data = _load_list(source) if isinstance(source, Path) else source
    if not isinstance(data, list):
        raise InvalidArgumentError(
            f"E.T. Bench file: expected a JSON list of samples, got {type(data).__name__}"
        )
    records: list[ETBenchRecord] = []
    report = ReadReport(total=len(data))
    seen: set[tuple[str, str, int]] = set()

    def skip(position: int, idx: Any, reason: str, detail: str) -> None:
        report.reasons[reason] += 1
        report.problems.append(Problem(position, idx, reason, detail))

    for position, raw in enumerate(data):
        if not isinstance(raw, dict):
            skip(position, None, "not_an_object", f"expected an object, got {type(raw).__name__}")
            continue
        try:
            sample = ETBenchSample.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            reason = "missing_field" if err["type"] == "missing" else "bad_field"
            skip(position, raw.get("idx"), reason, f"{where}: {err['msg']}")
            continue
        problem = _check(sample, media_root)
        key = (sample.task, sample.source, sample.idx)
        if problem is None and key in seen:
            problem = "duplicate_idx", f"idx {sample.idx} of {sample.task}/{sample.source} appears twice"
        if problem is not None:
            skip(position, sample.idx, *problem)
            continue
        seen.add(key)
        records.append(ETBenchRecord(position, raw, sample))
    report.kept = len(records)
    return records, report


def _load_list(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgumentError(f"E.T. Bench file {path}: cannot read ({e.strerror})", param="data") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"E.T. Bench file {path}: expected JSON, {e}", param="data") from e


def with_answer(record: ETBenchRecord, answer: str) -> dict[str, Any]:
    """The sample as read, with `a` set to the model's reply (replacing any earlier `a`).

    `a` holds the raw reply text, as `etchat/eval/infer_etbench.py` stores it for every task:
    for RAR, ECA and RVQ the text generated after the prompt's "Best Option: (" (so it starts
    with the letter, "B) ..."); E.T. Chat writes the times of its "<vid>" answers into the
    text as numbers.
    """
    out = dict(record.raw)
    out["a"] = answer
    return out


def write_predictions(path: Path, entries: Iterable[Mapping[str, Any]]) -> None:
    """Write the prediction file: a JSON list of `with_answer` entries, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(list(entries), ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _choice(rs: Sequence[ETBenchSample]) -> Scores:
    return metrics.score_etbench_choice([(s.a or "", s.p or 0, len(s.o or [])) for s in rs])


def _gvq(rs: Sequence[ETBenchSample]) -> Scores:
    return metrics.score_etbench_gvq([(s.a or "", s.p or 0, len(s.o or []), s.span()) for s in rs])


def _one_span(rs: Sequence[ETBenchSample]) -> Scores:
    return metrics.score_etbench_single_span([(s.a or "", s.span()) for s in rs])


def _many(scorer: Callable[[Sequence[tuple[str, Sequence[Span]]]], Scores]) -> Callable[..., Scores]:
    return lambda rs: scorer([(s.a or "", s.spans()) for s in rs])


def _vhd(rs: Sequence[ETBenchSample]) -> Scores:
    return metrics.score_etbench_vhd([(s.a or "", s.annotators()) for s in rs])


TASK_SCORERS: Mapping[str, Callable[[Sequence[ETBenchSample]], Scores]] = {
    "rar": _choice,
    "eca": _choice,
    "rvq": _choice,
    "tvg": _one_span,
    "epm": _one_span,
    "tal": _many(metrics.score_etbench_multi_span),
    "evs": _many(metrics.score_etbench_evs),
    "vhd": _vhd,
    "dvc": _many(metrics.score_etbench_captioning),
    "slc": _many(metrics.score_etbench_captioning),
    "tem": _many(metrics.score_etbench_tem),
    "gvq": _gvq,
}


@dataclass(frozen=True)
class ETBenchReport:
    """Scores of a prediction file.

    Attributes:
        by_source: task -> source -> Scores of that task's samples from that source.
        by_task: task -> its headline metric, the mean over its sources (as the copies of
            `compute_metrics.py` average a task: each source weighs the same).
    """

    by_source: dict[str, dict[str, Scores]]
    by_task: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "by_task": dict(self.by_task),
            "by_source": {t: {s: sc.to_dict() for s, sc in d.items()} for t, d in self.by_source.items()},
        }


def score_etbench(records: Iterable[ETBenchRecord]) -> ETBenchReport:
    """Score read-back predictions, per task and source.

    A sample without `a` scores 0 and is counted as "no_answer".
    """
    groups: dict[str, dict[str, list[ETBenchSample]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[record.sample.task][record.sample.source].append(record.sample)
    by_source: dict[str, dict[str, Scores]] = {}
    for task in (t for t in TASKS if t in groups):
        by_source[task] = {}
        for source, samples in sorted(groups[task].items()):
            answered = [s for s in samples if s.a is not None]
            scores = TASK_SCORERS[task](answered)
            by_source[task][source] = scores.with_missing(len(samples) - len(answered), NO_ANSWER)
    by_task = {t: sum(s.value for s in d.values()) / len(d) for t, d in by_source.items()}
    return ETBenchReport(by_source, by_task)
