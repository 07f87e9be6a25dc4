"""Scorers for E.T. Bench's tasks, one per kind of answer; which task uses which is in
`services.eval.metrics`'s docstring and `services.eval.etbench.TASK_SCORERS`.

Definitions from the E.T. Bench paper (Liu et al., NeurIPS 2024 Datasets and Benchmarks,
arXiv 2409.18111, "evaluation metrics") and our reading of the copies of its
`evaluation/compute_metrics.py` that circulate publicly (the script ships with the benchmark's
data kit on Hugging Face, not with PolyU-ChenLab/ETBench on GitHub, and we have not run it).
Where we differ from those copies, the function's docstring says so.

Every scorer takes (reply, ground truth...) tuples for one task and source and returns
`Scores` over all of them: a reply we cannot read scores 0 and is counted by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from services.eval._scores import Scores, ratio, temporal_iou
from services.eval.parsing import NO_TIMESTAMPS, Span, etbench_letter, parse_point, parse_spans

ETBENCH_IOU_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
NO_GROUND_TRUTH = "no_ground_truth"


def _by_threshold(prefix: str, values: Sequence[float], thresholds: Sequence[float]) -> dict[str, float]:
    out = {f"{prefix}@{t}": v for t, v in zip(thresholds, values, strict=True)}
    out[prefix] = ratio(sum(values), len(values))
    return out


def score_etbench_choice(items: Sequence[tuple[str, int, int]]) -> Scores:
    """Accuracy of multiple-choice replies (RAR, ECA, RVQ; GVQ's answer part).

    Args:
        items: (reply, index of the right option, number of options) per sample.

    Returns:
        Scores with "Acc" (main): right / all. Replies without a readable letter
        (`parsing.etbench_letter`) are wrong and counted by reason; the official script would
        instead match them to the most similar option with a sentence-embedding model.
    """
    failed: Counter[str] = Counter()
    right = 0
    for reply, answer, n_options in items:
        letter = etbench_letter(reply, n_options)
        if letter.value is None:
            failed[letter.reason or "no_letter"] += 1
            continue
        right += letter.value == answer
    return Scores("Acc", {"Acc": ratio(right, len(items))}, len(items), dict(failed))


def _first_span(reply: str, failed: Counter[str]) -> Span | None:
    spans = parse_spans(reply)
    if not spans.value:
        failed[spans.reason or NO_TIMESTAMPS] += 1
        return None
    return spans.value[0]


def score_etbench_single_span(
    items: Sequence[tuple[str, Span]], thresholds: Sequence[float] = ETBENCH_IOU_THRESHOLDS
) -> Scores:
    """One-moment grounding (TVG, EPM): the first span of the reply against the one true span.

    With one prediction and one truth, precision = recall = hit, so the paper's F1 at a
    threshold is the share of samples whose IoU >= t (the copies' `tvg_eval` reports exactly
    that as "F1@t"). F1 = mean over the thresholds 0.1, 0.3, 0.5, 0.7; mIoU over all samples.

    Args:
        items: (reply, true [start, end]) per sample.
        thresholds: IoU thresholds.

    Returns:
        Scores with "F1@<t>", "F1" (main) and "mIoU".
    """
    failed: Counter[str] = Counter()
    hits = [0] * len(thresholds)
    iou_sum = 0.0
    for reply, gt in items:
        pred = _first_span(reply, failed)
        if pred is None:
            continue
        iou = temporal_iou(pred, gt)
        iou_sum += iou
        for k, t in enumerate(thresholds):
            hits[k] += iou >= t
    n = len(items)
    metrics = _by_threshold("F1", [ratio(h, n) for h in hits], thresholds)
    metrics["mIoU"] = ratio(iou_sum, n)
    return Scores("F1", metrics, n, dict(failed))


def score_etbench_tem(
    items: Sequence[tuple[str, Sequence[Span]]], thresholds: Sequence[float] = ETBENCH_IOU_THRESHOLDS
) -> Scores:
    """Temporal event matching (TEM): the first span of the reply against the best-matching
    of the true spans (any of them may be found).

    Recall at a threshold = share of samples whose best IoU >= t; "mRec" = mean over the
    thresholds (the paper's "Rec" column); mIoU of the best IoU over all samples. As the
    copies' `tem_eval`.

    Args:
        items: (reply, true spans) per sample.
        thresholds: IoU thresholds.

    Returns:
        Scores with "R@<t>", "mRec" (main) and "mIoU".
    """
    failed: Counter[str] = Counter()
    hits = [0] * len(thresholds)
    iou_sum = 0.0
    for reply, gts in items:
        if not gts:
            failed[NO_GROUND_TRUTH] += 1
            continue
        pred = _first_span(reply, failed)
        if pred is None:
            continue
        iou = max(temporal_iou(pred, g) for g in gts)
        iou_sum += iou
        for k, t in enumerate(thresholds):
            hits[k] += iou >= t
    n = len(items)
    recall = [ratio(h, n) for h in hits]
    metrics = {f"R@{t}": r for t, r in zip(thresholds, recall, strict=True)}
    metrics["mRec"] = ratio(sum(recall), len(recall))
    metrics["mIoU"] = ratio(iou_sum, n)
    return Scores("mRec", metrics, n, dict(failed))


def _iou_rows(
    items: Sequence[tuple[str, Sequence[Span]]], failed: Counter[str]
) -> Iterator[list[list[float]]]:
    """Per sample with true spans and a readable reply: the IoU of each predicted span (a row)
    with each true span (a column). The other samples are counted in `failed` by reason."""
    for reply, gts in items:
        if not gts:
            failed[NO_GROUND_TRUTH] += 1
            continue
        preds = parse_spans(reply)
        if not preds.value:
            failed[preds.reason or NO_TIMESTAMPS] += 1
            continue
        yield [[temporal_iou(p, g) for g in gts] for p in preds.value]


def score_etbench_multi_span(
    items: Sequence[tuple[str, Sequence[Span]]], thresholds: Sequence[float] = ETBENCH_IOU_THRESHOLDS
) -> Scores:
    """Several moments (TAL): F1 between all spans of the reply and all true spans.

    Per sample and threshold t, as the copies' `tal_eval`: a predicted span is correct when
    its IoU with some true span is >= t, a true span is found when some predicted span has
    IoU >= t with it; precision = correct / predicted, recall = found / true,
    F1 = 2PR / (P + R) (0 when nothing reaches t). No one-to-one matching: two copies of a
    correct span are both correct. F1@t = mean over all samples, F1 = mean over thresholds.

    Args:
        items: (reply, true spans) per sample.
        thresholds: IoU thresholds.

    Returns:
        Scores with "F1@<t>" and "F1" (main).
    """
    failed: Counter[str] = Counter()
    sums = [0.0] * len(thresholds)
    for iou in _iou_rows(items, failed):
        n_true = len(iou[0])
        for k, t in enumerate(thresholds):
            correct = sum(any(v >= t for v in row) for row in iou)
            found = sum(any(row[j] >= t for row in iou) for j in range(n_true))
            if correct:
                p, r = correct / len(iou), found / n_true
                sums[k] += 2 * p * r / (p + r)
    n = len(items)
    return Scores("F1", _by_threshold("F1", [ratio(s, n) for s in sums], thresholds), n, dict(failed))


def _merged(spans: Sequence[Span]) -> list[Span]:
    out: list[Span] = []
    for s, e in sorted((min(a, b), max(a, b)) for a, b in spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _overlap(a: list[Span], b: list[Span]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def score_etbench_evs(items: Sequence[tuple[str, Sequence[Span]]]) -> Scores:
    """Event-level video summarisation (EVS): F1 of the time the reply selects against the
    true time, with no IoU threshold.

    Per sample: P = the predicted spans' union, G = the true spans' union; TP = |P ∩ G|,
    FP = |P| - TP, FN = |G| - TP in seconds; F1 = 2TP / (2TP + FP + FN), 0 when TP is 0.
    Overlapping or repeated spans count once. F1 = mean over all samples.

    Differences from the copies' `evs_eval`: they round span ends to whole seconds and mark
    a 1000-second timeline, so fractions of a second and times past 1000 s are lost; and they
    average over readable replies only, so an unreadable reply does not lower the score. We
    measure exact lengths and count unreadable replies as 0, like every other task.

    Args:
        items: (reply, true spans) per sample.

    Returns:
        Scores with "F1" (main).
    """
    failed: Counter[str] = Counter()
    f1_sum = 0.0
    for reply, gts in items:
        truth = _merged(gts)
        if not truth:
            failed[NO_GROUND_TRUTH] += 1
            continue
        preds = parse_spans(reply)
        if not preds.value:
            failed[preds.reason or NO_TIMESTAMPS] += 1
            continue
        pred = _merged(preds.value)
        tp = _overlap(pred, truth)
        length = sum(e - s for s, e in pred) + sum(e - s for s, e in truth)
        f1_sum += 2 * tp / length if tp > 0 else 0.0
    n = len(items)
    return Scores("F1", {"F1": ratio(f1_sum, n)}, n, dict(failed))


def score_etbench_vhd(items: Sequence[tuple[str, Sequence[Sequence[Span]]]]) -> Scores:
    """Video highlight detection (VHD): one timestamp, right when it falls inside a true
    highlight span (ends included) of any annotator.

    With one prediction per sample precision = recall = hit, so F1 = share of samples hit (as
    the copies' `vhd_eval`, which reports it as "F1"). The timestamp is the first time in the
    reply (`parsing.parse_point`).

    Args:
        items: (reply, highlight spans per annotator) per sample; one annotator is [[spans]].

    Returns:
        Scores with "F1" (main).
    """
    failed: Counter[str] = Counter()
    hits = 0
    for reply, annotators in items:
        point = parse_point(reply)
        if point.value is None:
            failed[point.reason or NO_TIMESTAMPS] += 1
            continue
        x = point.value
        hits += any(min(s, e) <= x <= max(s, e) for spans in annotators for s, e in spans)
    n = len(items)
    return Scores("F1", {"F1": ratio(hits, n)}, n, dict(failed))


def score_etbench_gvq(
    items: Sequence[tuple[str, int, int, Span]], thresholds: Sequence[float] = ETBENCH_IOU_THRESHOLDS
) -> Scores:
    """Grounded video QA (GVQ): the answer must be right and its moment found.

    "Acc" = share of right answers (`parsing.etbench_letter`). For the samples answered
    right, the first span of the reply is compared with the true span; R@t = (right answers
    whose IoU >= t) / (all samples); "mRec" = mean over thresholds (the paper's "Rec"
    column, main); mIoU sums IoUs of right answers over all samples. As the copies'
    `gvq_eval`. A wrong answer scores 0 for grounding and is not a failure; a right answer
    without a span is counted as "no_timestamps".

    Args:
        items: (reply, index of the right option, number of options, true span) per sample.
        thresholds: IoU thresholds.

    Returns:
        Scores with "Acc", "R@<t>", "mRec" (main) and "mIoU".
    """
    failed: Counter[str] = Counter()
    right = 0
    hits = [0] * len(thresholds)
    iou_sum = 0.0
    for reply, answer, n_options, gt in items:
        letter = etbench_letter(reply, n_options)
        if letter.value is None:
            failed[letter.reason or "no_letter"] += 1
            continue
        if letter.value != answer:
            continue
        right += 1
        pred = _first_span(reply, failed)
        if pred is None:
            continue
        iou = temporal_iou(pred, gt)
        iou_sum += iou
        for k, t in enumerate(thresholds):
            hits[k] += iou >= t
    n = len(items)
    recall = [ratio(h, n) for h in hits]
    metrics = {"Acc": ratio(right, n)}
    metrics |= {f"R@{t}": r for t, r in zip(thresholds, recall, strict=True)}
    metrics["mRec"] = ratio(sum(recall), len(recall))
    metrics["mIoU"] = ratio(iou_sum, n)
    return Scores("mRec", metrics, n, dict(failed))


def score_etbench_captioning(
    items: Sequence[tuple[str, Sequence[Span]]], thresholds: Sequence[float] = ETBENCH_IOU_THRESHOLDS
) -> Scores:
    """Dense captioning (DVC, SLC), localisation part only: F1 of the reply's spans.

    As the copies' `dvc_eval` computes it (after the ActivityNet dense-captioning evaluator,
    densevid_eval): per sample and threshold t, a predicted span is correct when its IoU with
    some true span is > t (strictly), a true span is found when some predicted span has
    IoU > t; precision_i = correct / predicted, recall_i = found / true. P and R are the means
    over all samples (an unreadable reply adds 0 to both), and F1@t = 2PR / (P + R) from those
    means (not a mean of per-sample F1s). F1 = mean over thresholds. Captions are not read.

    Not scored: the caption half (the paper's "Sim" column, the cosine similarity of
    sentence embeddings of matched captions under sentence-transformers'
    all-MiniLM-L6-v2), which needs that model.

    Args:
        items: (reply, true spans) per sample.
        thresholds: IoU thresholds.

    Returns:
        Scores with "F1@<t>", "F1" (main), "P@<t>" and "R@<t>".
    """
    failed: Counter[str] = Counter()
    p_sum = [0.0] * len(thresholds)
    r_sum = [0.0] * len(thresholds)
    for iou in _iou_rows(items, failed):
        n_true = len(iou[0])
        for k, t in enumerate(thresholds):
            p_sum[k] += sum(any(v > t for v in row) for row in iou) / len(iou)
            r_sum[k] += sum(any(row[j] > t for row in iou) for j in range(n_true)) / n_true
    n = len(items)
    f1s, metrics = [], {}
    for t, ps, rs in zip(thresholds, p_sum, r_sum, strict=True):
        p, r = ratio(ps, n), ratio(rs, n)
        f1s.append(2 * p * r / (p + r) if p + r > 0 else 0.0)
        metrics[f"P@{t}"], metrics[f"R@{t}"] = p, r
    return Scores("F1", _by_threshold("F1", f1s, thresholds) | metrics, n, dict(failed))
