"""Temporal IoU, Charades-STA grounding, MVBench and LLaVA-style scoring, against values
computed by hand in the comments."""

from __future__ import annotations

import math

import pytest

from services.eval.metrics import (
    ChoiceItem,
    GroundingItem,
    Scores,
    contains_answer,
    exact_match,
    grounding_prediction,
    mvbench_correct,
    score_grounding,
    score_letter_choice,
    score_mvbench,
    score_reference_answers,
    temporal_iou,
)


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ((0, 10), (5, 15), 1 / 3),  # overlap 5, union 15
        ((0, 10), (0, 10), 1.0),
        ((2, 4), (0, 10), 0.2),  # contained: 2 / 10
        ((0, 4), (4, 8), 0.0),  # touching
        ((0, 4), (6, 8), 0.0),  # apart
        ((10, 0), (5, 15), 1 / 3),  # reversed span is ordered
        ((15, 5), (10, 0), 1 / 3),
        ((5, 5), (5, 5), 0.0),  # zero-length: union 0
        ((5, 5), (0, 10), 0.0),
        ((0, math.nan), (0, 10), 0.0),
        ((0, math.inf), (0, 10), 0.0),
    ],
)
def test_temporal_iou(a: tuple[float, float], b: tuple[float, float], iou: float) -> None:
    assert temporal_iou(a, b) == pytest.approx(iou)
    assert temporal_iou(b, a) == pytest.approx(iou)


def test_grounding_prediction_sources() -> None:
    # Timestamps win over the text; reversed timestamps are ordered.
    assert grounding_prediction(GroundingItem((0, 10), [8.0, 2.0], "0 - 1")).value == (2.0, 8.0)
    # Empty timestamps fall back to the text's first span.
    assert grounding_prediction(GroundingItem((0, 10), [], "3 - 4 and 5 - 6")).value == (3.0, 4.0)
    assert grounding_prediction(GroundingItem((0, 10), [1.0])).reason == "wrong_timestamp_count"
    assert grounding_prediction(GroundingItem((0, 10))).reason == "no_timestamps"
    assert grounding_prediction(GroundingItem((0, 10), None, "")).reason == "no_timestamps"


def test_score_grounding() -> None:
    gt = (0.0, 10.0)
    items = [
        GroundingItem(gt, [0.0, 10.0]),  # IoU 1
        GroundingItem(gt, [5.0, 15.0]),  # IoU 1/3: >= 0.3 only
        GroundingItem(gt, None, "from 2 to 8 seconds"),  # IoU 6/10: >= 0.3, 0.5
        GroundingItem(gt, [1.0, 2.0, 3.0]),  # wrong_timestamp_count
        GroundingItem(gt, None, "no idea"),  # no_timestamps
    ]
    s = score_grounding(items)
    assert s.total == 5
    assert s.metrics["R1@0.3"] == pytest.approx(3 / 5)
    assert s.metrics["R1@0.5"] == pytest.approx(2 / 5)
    assert s.metrics["R1@0.7"] == pytest.approx(1 / 5)
    assert s.metrics["mIoU"] == pytest.approx(29 / 75)  # (1 + 1/3 + 3/5) / 5
    assert s.main == "R1@0.5"
    assert s.value == pytest.approx(0.4)
    assert s.failed == {"wrong_timestamp_count": 1, "no_timestamps": 1}


def test_score_grounding_threshold_is_inclusive() -> None:
    s = score_grounding([GroundingItem((0, 10), [0, 5])])  # IoU exactly 0.5
    assert s.metrics["R1@0.5"] == 1.0
    assert s.metrics["R1@0.7"] == 0.0


def test_score_grounding_empty() -> None:
    s = score_grounding([])
    assert s.total == 0
    assert s.metrics == {"R1@0.3": 0.0, "R1@0.5": 0.0, "R1@0.7": 0.0, "mIoU": 0.0}
    assert s.failed == {}


@pytest.mark.parametrize(
    ("reply", "answer", "right"),
    [
        ("B) a dog", 1, True),
        ("b", 1, True),
        ("  B", 1, True),  # detokenize strips
        (" C", 1, False),
        ("(B)", 1, False),  # the prompt already opened "(": the first character is "("
        ("", 0, False),
    ],
)
def test_mvbench_etchat_rule(reply: str, answer: int, right: bool) -> None:
    assert mvbench_correct(reply, answer, "etchat") is right


@pytest.mark.parametrize(
    ("reply", "answer", "right"),
    [
        ("B) a dog", 1, True),  # "(b)" in "(b)"
        ("B.", 1, True),  # "(b." -> "(b" in "(b)"
        ("B).", 1, True),
        ("b", 1, True),  # "(b" in "(b)"
        ("ba", 1, False),  # "(ba" vs "(b)": neither contains the other
        ("(B) dog", 1, True),  # "((b)" contains "(b)"
        ("C) x", 1, False),
        ("B\nC", 1, True),  # first line only
        ("C\nB", 1, False),
        ("", 0, True),  # "(" is in every "(x)": the seed's quirk, kept
    ],
)
def test_mvbench_videochat2_rule(reply: str, answer: int, right: bool) -> None:
    assert mvbench_correct(reply, answer, "videochat2") is right


def test_score_mvbench_per_task() -> None:
    items = [
        ChoiceItem("B) x", 1, task="Action Sequence"),
        ChoiceItem("A", 1, task="Action Sequence"),
        ChoiceItem("C", 2, task="Object Shuffle"),
        ChoiceItem("", 0, task="Object Shuffle"),
    ]
    s = score_mvbench(items, "etchat")
    assert s.metrics == {"Acc": 0.5, "Acc/Action Sequence": 0.5, "Acc/Object Shuffle": 0.5}
    assert s.failed == {"empty_reply": 1}
    v = score_mvbench(items, "videochat2")
    assert v.metrics == {"Acc": 0.75, "Acc/Action Sequence": 0.5, "Acc/Object Shuffle": 1.0}
    assert v.failed == {"empty_reply": 1}


def test_score_mvbench_without_tasks_and_empty() -> None:
    assert score_mvbench([ChoiceItem("a", 0), ChoiceItem("a", 1)]).metrics == {"Acc": 0.5}
    assert score_mvbench([]).metrics == {"Acc": 0.0}


def test_score_letter_choice() -> None:
    items = [
        ChoiceItem("B", 1),  # right
        ChoiceItem("C. cat", 1),  # wrong letter
        ChoiceItem("The answer is B.", 1),  # right
        ChoiceItem("I think so", 1),  # no_letter
        ChoiceItem("", 1),  # empty_reply
        ChoiceItem("E", 1, n_options=4),  # letter_out_of_range
        ChoiceItem("b", 1),  # lower case: no_letter
    ]
    s = score_letter_choice(items)
    assert s.metrics == {"Acc": pytest.approx(2 / 7)}
    assert s.failed == {"no_letter": 2, "empty_reply": 1, "letter_out_of_range": 1}


def test_exact_and_contains() -> None:
    assert exact_match("The cat.", "cat")
    assert not exact_match("a black cat", "cat")
    assert contains_answer("a black cat", "cat")
    assert not contains_answer("cartoon", "cat")
    assert not exact_match("", "")
    assert not contains_answer("the", "a")  # both normalise to nothing


def test_score_reference_answers() -> None:
    pairs = [
        ("The cat.", "cat"),  # exact, contains
        ("a black cat", "cat"),  # contains
        ("cartoon", "cat"),  # neither
        ("", "cat"),  # empty_reply
        ("cat", "..."),  # empty_reference
        ("Red  Car!", "red car"),  # exact, contains
    ]
    s = score_reference_answers(pairs)
    assert s.total == 6
    assert s.metrics == {"exact": pytest.approx(2 / 6), "contains": pytest.approx(3 / 6)}
    assert s.failed == {"empty_reply": 1, "empty_reference": 1}
    assert s.main == "exact"


def test_scores_to_dict_and_with_missing() -> None:
    s = Scores("F1", {"F1": 0.5, "mIoU": 0.25}, 2, {"no_timestamps": 1})
    assert s.to_dict() == {
        "main": "F1",
        "value": 0.5,
        "total": 2,
        "failed": {"no_timestamps": 1},
        "metrics": {"F1": 0.5, "mIoU": 0.25},
    }
    wide = s.with_missing(2, "no_answer")
    assert wide.total == 4
    assert wide.metrics == {"F1": 0.25, "mIoU": 0.125}
    assert wide.failed == {"no_timestamps": 1, "no_answer": 2}
    assert s.with_missing(0, "no_answer") is s
    assert Scores("F1", {"F1": 0.0}, 0, {}).with_missing(3, "no_answer").metrics == {"F1": 0.0}
