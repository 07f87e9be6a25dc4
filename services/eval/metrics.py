"""Scoring functions: temporal IoU, Charades-STA-style grounding, E.T. Bench's tasks,
MVBench-style and LLaVA-style multiple choice, and reference answers.

Every scorer takes replies (text, or the reply's timestamps) with their ground truth and
returns a `Scores`: plain numbers plus, by reason, the count of replies it could not read.
Nothing raises on a bad reply; an unreadable reply scores 0 and is counted. An empty sample
list scores 0 with total 0. Replies are read by `services.eval.parsing`.

E.T. Bench (the E.T. Bench paper's metrics; the scorers live in `_etbench_tasks`, re-exported
here; IoU thresholds 0.1, 0.3, 0.5, 0.7 wherever a task has thresholds):
- RAR, ECA, RVQ: accuracy of the option letter (`score_etbench_choice`).
- TVG, EPM: first predicted span vs the true span; F1@t = share with IoU >= t, F1 = mean
  over t (`score_etbench_single_span`).
- TAL: all predicted vs all true spans, per-sample F1 at each t without one-to-one
  matching, F1 = mean over samples and t (`score_etbench_multi_span`).
- EVS: per-sample F1 of the selected time vs the true time, in seconds
  (`score_etbench_evs`).
- VHD: the first timestamp is a hit inside any true highlight; F1 = hit share
  (`score_etbench_vhd`).
- TEM: first predicted span vs the best of the true spans; mRec = mean over t of the share
  with IoU >= t (`score_etbench_tem`).
- GVQ: "Acc" of the letter and "mRec": recall over t counting only right answers
  (`score_etbench_gvq`).
- DVC, SLC: localisation F1 only, from mean precision and recall at IoU > t
  (`score_etbench_captioning`).
Left out: the caption similarity of DVC and SLC (the paper's "Sim": cosine similarity of
sentence-transformers all-MiniLM-L6-v2 embeddings of matched captions) and the official
script's fallback for multiple-choice replies without a letter (the option most similar to
the reply under the same model): both need that model. Such replies count as wrong here
("no_letter").

Sources, read for their definitions (no code of theirs is used):
- E.T. Chat, PolyU-ChenLab/ETBench: `etchat/eval/eval_grounding.py` (R@1 at IoU 0.3/0.5/0.7
  and mIoU on Charades-STA), `etchat/eval/infer_charades.py` (predictions are the times of the
  matched frames), `etchat/eval/infer_mvbench.py` (MVBench answer check); the E.T. Bench paper
  (arXiv 2409.18111) and copies of its `compute_metrics.py` (see `_etbench_tasks`).
- VideoChat2, OpenGVLab/Ask-Anything: `video_chat2/mvbench.ipynb` (`infer_mvbench`,
  `check_ans`).
- LLaVA, haotian-liu/LLaVA: `llava/eval/eval_science_qa.py` (option letters).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from services.eval._etbench_tasks import (
    ETBENCH_IOU_THRESHOLDS,
    score_etbench_captioning,
    score_etbench_choice,
    score_etbench_evs,
    score_etbench_gvq,
    score_etbench_multi_span,
    score_etbench_single_span,
    score_etbench_tem,
    score_etbench_vhd,
)
from services.eval._scores import Scores, ratio, temporal_iou
from services.eval.parsing import (
    EMPTY_REPLY,
    NO_TIMESTAMPS,
    WRONG_TIMESTAMP_COUNT,
    Parsed,
    Span,
    contains_tokens,
    llava_letter,
    normalize_answer,
    parse_spans,
)

__all__ = [
    "ETBENCH_IOU_THRESHOLDS",
    "GROUNDING_THRESHOLDS",
    "ChoiceItem",
    "GroundingItem",
    "Scores",
    "contains_answer",
    "exact_match",
    "grounding_prediction",
    "mvbench_correct",
    "score_etbench_captioning",
    "score_etbench_choice",
    "score_etbench_evs",
    "score_etbench_gvq",
    "score_etbench_multi_span",
    "score_etbench_single_span",
    "score_etbench_tem",
    "score_etbench_vhd",
    "score_grounding",
    "score_letter_choice",
    "score_mvbench",
    "score_reference_answers",
    "temporal_iou",
]

GROUNDING_THRESHOLDS = (0.3, 0.5, 0.7)
EMPTY_REFERENCE = "empty_reference"


@dataclass(frozen=True)
class GroundingItem:
    """One Charades-STA-style sample: a query's true span and the model's answer.

    Attributes:
        gt: The true [start, end], seconds.
        timestamps: The reply's timestamps (E.T. Chat: the times of the matched frames, as
            `infer_charades.py` reads `model.tgt[match_inds]`); None or empty when it has none.
        text: The reply's text, parsed for a span when `timestamps` is None or empty.
    """

    gt: Span
    timestamps: Sequence[float] | None = None
    text: str | None = None


def grounding_prediction(item: GroundingItem) -> Parsed[Span]:
    """The span a grounding reply predicts.

    The reply's timestamps when it has any: exactly two, as `eval_grounding.py` requires
    (`len(sample['pred']) == 2`), else "wrong_timestamp_count"; otherwise the first span of
    the text (`parsing.parse_spans`), else "no_timestamps". The span is ordered.
    """
    if item.timestamps:
        if len(item.timestamps) != 2:
            return Parsed(None, WRONG_TIMESTAMP_COUNT)
        a, b = item.timestamps
        return Parsed((min(a, b), max(a, b)))
    if item.text:
        spans = parse_spans(item.text)
        if spans.ok and spans.value:
            return Parsed(spans.value[0])
    return Parsed(None, NO_TIMESTAMPS)


def score_grounding(
    items: Sequence[GroundingItem], thresholds: Sequence[float] = GROUNDING_THRESHOLDS
) -> Scores:
    """Charades-STA-style moment retrieval: R@1 at IoU thresholds and mIoU.

    As `etchat/eval/eval_grounding.py` computes them: one predicted span per query;
    R1@t = (queries whose IoU >= t) / (all queries); mIoU = (sum of IoUs) / (all queries). A
    query without a usable prediction counts in the denominators with IoU 0 and is reported
    by reason.

    Args:
        items: The samples.
        thresholds: IoU thresholds; Charades-STA reports 0.3, 0.5 and 0.7.

    Returns:
        Scores with "R1@<t>" per threshold and "mIoU"; main "R1@0.5" when 0.5 is a threshold,
        else "mIoU".
    """
    failed: Counter[str] = Counter()
    hits = [0] * len(thresholds)
    iou_sum = 0.0
    for item in items:
        pred = grounding_prediction(item)
        if pred.value is None:
            failed[pred.reason or NO_TIMESTAMPS] += 1
            continue
        iou = temporal_iou(item.gt, pred.value)
        iou_sum += iou
        for k, t in enumerate(thresholds):
            hits[k] += iou >= t
    n = len(items)
    metrics = {f"R1@{t}": ratio(h, n) for t, h in zip(thresholds, hits, strict=True)}
    metrics["mIoU"] = ratio(iou_sum, n)
    main = "R1@0.5" if "R1@0.5" in metrics else "mIoU"
    return Scores(main, metrics, n, dict(failed))


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice sample.

    Attributes:
        reply: The model's reply (for MVBench: the text generated after "Best Option: (").
        answer: Index of the right option (0 for A).
        n_options: Number of options.
        task: The sample's task type, for per-task accuracy (MVBench's 20 tasks); "" for none.
    """

    reply: str
    answer: int
    n_options: int = 4
    task: str = ""


MVBenchRule = Literal["etchat", "videochat2"]


def mvbench_correct(reply: str, answer: int, rule: MVBenchRule = "etchat") -> bool:
    """Whether an MVBench reply is right, by the answer check of one of the seeds.

    Both seeds end the prompt with the opening of the answer, so the reply starts with the
    letter.

    - "etchat": `etchat/eval/infer_mvbench.py` appends "Best Option: (" to the prompt
      (line 108) and counts a hit when `response[0].lower() == answer[1].lower()` (line 132),
      the answer being "(X) text" and the response stripped by `detokenize`. So: the first
      character of the stripped reply equals the letter, ignoring case. An empty reply (an
      IndexError in the seed) is wrong.
    - "videochat2": `video_chat2/mvbench.ipynb` ends the prompt with "Best option:("
      (`answer_prompt`), keeps the first line of the stripped reply and prefixes "("
      (`return_prompt`); `check_ans` lowercases it and takes the text before the first space
      as the predicted option: right when, with "." removed, it is a substring of the true
      "(x)", or "(x)" is a substring of it. So "B) a dog", "b", "B." and "B)." all match "(b)",
      and "ba" does not. Quirk kept: an empty reply becomes "(", a substring of every "(x)",
      so it is right (`score_mvbench` also counts it as "empty_reply").

    Args:
        reply: The generated text after the prompt.
        answer: Index of the right option (0 for A).
        rule: Whose check.
    """
    letter = chr(ord("a") + answer)
    text = reply.strip()
    if rule == "etchat":
        return text[:1].lower() == letter
    option = ("(" + text.split("\n")[0]).lower().split(" ")[0]
    truth = f"({letter})"
    return option.replace(".", "") in truth or truth in option


def score_mvbench(items: Sequence[ChoiceItem], rule: MVBenchRule = "etchat") -> Scores:
    """MVBench accuracy: overall (right / all, as both seeds' "Avg") and per task type.

    Args:
        items: The samples; `task` names MVBench's task type ("Action Sequence", ...).
        rule: Whose answer check to use (see `mvbench_correct`).

    Returns:
        Scores with "Acc" (main) and "Acc/<task>" for each task named.
    """
    failed: Counter[str] = Counter()
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for item in items:
        if not item.reply.strip():
            failed[EMPTY_REPLY] += 1
        hit = mvbench_correct(item.reply, item.answer, rule)
        for key in ("", item.task) if item.task else ("",):
            seen[key] += 1
            right[key] += hit
    metrics = {"Acc": ratio(right[""], len(items))}
    metrics |= {f"Acc/{task}": ratio(right[task], seen[task]) for task in sorted(seen) if task}
    return Scores("Acc", metrics, len(items), dict(failed))


def score_letter_choice(items: Sequence[ChoiceItem]) -> Scores:
    """LLaVA-style multiple-choice accuracy: the reply's option letter (`parsing.llava_letter`)
    against the right one; unreadable replies are wrong and counted by reason.

    Returns:
        Scores with "Acc" (main).
    """
    failed: Counter[str] = Counter()
    right = 0
    for item in items:
        letter = llava_letter(item.reply, item.n_options)
        if letter.value is None:
            failed[letter.reason or "no_letter"] += 1
            continue
        right += letter.value == item.answer
    return Scores("Acc", {"Acc": ratio(right, len(items))}, len(items), dict(failed))


def exact_match(reply: str, reference: str) -> bool:
    """The normalised reply equals the normalised reference (`parsing.normalize_answer`);
    never true for an empty reference."""
    ref = normalize_answer(reference)
    return bool(ref) and normalize_answer(reply) == ref


def contains_answer(reply: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised reply as whole words: "red car" is
    in "a red car parked", "car" is not in "cartoon"; never true for an empty reference."""
    return contains_tokens(normalize_answer(reply), normalize_answer(reference))


def score_reference_answers(pairs: Iterable[tuple[str, str]]) -> Scores:
    """LLaVA-style open answers against a reference: exact match and contains.

    Args:
        pairs: (reply, reference) per sample.

    Returns:
        Scores with "exact" (main) and "contains"; empty replies and references whose
        normalisation is empty are counted ("empty_reply", "empty_reference").
    """
    failed: Counter[str] = Counter()
    exact = contains = total = 0
    for reply, reference in pairs:
        total += 1
        if not normalize_answer(reference):
            failed[EMPTY_REFERENCE] += 1
            continue
        if not normalize_answer(reply):
            failed[EMPTY_REPLY] += 1
            continue
        exact += exact_match(reply, reference)
        contains += contains_answer(reply, reference)
    metrics = {"exact": ratio(exact, total), "contains": ratio(contains, total)}
    return Scores("exact", metrics, total, dict(failed))
