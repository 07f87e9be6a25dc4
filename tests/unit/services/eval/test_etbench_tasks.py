"""E.T. Bench's task scorers against values computed by hand in the comments (IoU thresholds
0.1, 0.3, 0.5, 0.7)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.eval.metrics import (
    ETBENCH_IOU_THRESHOLDS,
    Scores,
    score_etbench_captioning,
    score_etbench_choice,
    score_etbench_evs,
    score_etbench_gvq,
    score_etbench_multi_span,
    score_etbench_single_span,
    score_etbench_tem,
    score_etbench_vhd,
)


def test_thresholds() -> None:
    assert ETBENCH_IOU_THRESHOLDS == (0.1, 0.3, 0.5, 0.7)


def test_choice() -> None:
    items = [
        ("A) walking", 0, 4),  # right
        ("Best Option: (B) eating", 1, 4),  # right
        ("The man is (C) running", 1, 4),  # wrong
        ("", 0, 4),  # empty_reply
        ("He walks", 0, 4),  # no_letter
        ("e) none", 0, 4),  # letter_out_of_range
    ]
    s = score_etbench_choice(items)
    assert s.metrics == {"Acc": pytest.approx(1 / 3)}
    assert s.total == 6
    assert s.failed == {"empty_reply": 1, "no_letter": 1, "letter_out_of_range": 1}


def test_single_span() -> None:
    gt = (10.0, 20.0)
    items = [
        ("The event happens in 10 - 20 seconds.", gt),  # IoU 1
        ("12 - 22", gt),  # 8 / 12 = 2/3: >= 0.1, 0.3, 0.5
        ("0 - 11", gt),  # 1 / 20 = 0.05: none
        ("at 25 - 30", gt),  # 0
        ("no", gt),  # no_timestamps
        ("20 - 10 and 0 - 5", gt),  # first span, reversed: IoU 1
    ]
    s = score_etbench_single_span(items)
    assert s.metrics["F1@0.1"] == pytest.approx(3 / 6)
    assert s.metrics["F1@0.3"] == pytest.approx(3 / 6)
    assert s.metrics["F1@0.5"] == pytest.approx(3 / 6)
    assert s.metrics["F1@0.7"] == pytest.approx(2 / 6)
    assert s.metrics["F1"] == pytest.approx(11 / 24)  # (3 * 1/2 + 1/3) / 4
    assert s.metrics["mIoU"] == pytest.approx(163 / 360)  # (1 + 2/3 + 1/20 + 0 + 1) / 6
    assert s.value == s.metrics["F1"]
    assert s.failed == {"no_timestamps": 1}


def test_tem_best_of_true_spans() -> None:
    gts = [(0.0, 10.0), (20.0, 30.0)]
    items = [
        ("20 - 30", gts),  # 1
        ("5 - 10", gts),  # 5/10 = 0.5 with the first
        ("25 - 40", gts),  # 5/20 = 0.25 with the second
        ("", gts),  # no_timestamps
        ("1 - 2", []),  # no_ground_truth
    ]
    s = score_etbench_tem(items)
    assert s.total == 5
    assert s.metrics["R@0.1"] == pytest.approx(3 / 5)
    assert s.metrics["R@0.3"] == pytest.approx(2 / 5)
    assert s.metrics["R@0.5"] == pytest.approx(2 / 5)
    assert s.metrics["R@0.7"] == pytest.approx(1 / 5)
    assert s.metrics["mRec"] == pytest.approx(2 / 5)  # (3 + 2 + 2 + 1) / 5 / 4
    assert s.metrics["mIoU"] == pytest.approx(1.75 / 5)
    assert s.main == "mRec"
    assert s.failed == {"no_timestamps": 1, "no_ground_truth": 1}


def test_multi_span() -> None:
    items = [
        # preds (0,10): IoU 1 with g1; (20,25): 0.5 with g2; (50,60): 0.
        # t <= 0.5: P = 2/3, R = 2/2 -> F1 = 0.8; t = 0.7: P = 1/3, R = 1/2 -> F1 = 0.4
        ("0 - 10, 20 - 25, 50 - 60", [(0.0, 10.0), (20.0, 30.0)]),
        # duplicates both count as correct: P = R = 1
        ("0 - 10, 0 - 10", [(0.0, 10.0)]),
        ("30 - 40", [(0.0, 10.0)]),  # nothing reaches any t: 0
        ("none", [(0.0, 10.0)]),  # no_timestamps
    ]
    s = score_etbench_multi_span(items)
    for t in (0.1, 0.3, 0.5):
        assert s.metrics[f"F1@{t}"] == pytest.approx(0.45)  # (0.8 + 1) / 4
    assert s.metrics["F1@0.7"] == pytest.approx(0.35)  # (0.4 + 1) / 4
    assert s.metrics["F1"] == pytest.approx(0.425)
    assert s.failed == {"no_timestamps": 1}


def test_evs() -> None:
    items = [
        # P = (5,25), G = (0,10)+(20,30): TP 10, |P| 20, |G| 20 -> 20/40
        ("5 - 25", [(0.0, 10.0), (20.0, 30.0)]),
        # overlapping and repeated spans merge to (0,10): F1 1
        ("0 - 6, 4 - 10, 0 - 10", [(0.0, 10.0)]),
        ("10 - 20", [(0.0, 10.0)]),  # TP 0
        # fractions count: TP 2.5, |P| 2.5, |G| 10 -> 5 / 12.5
        ("2.5 - 5", [(0.0, 10.0)]),
        ("", [(0.0, 10.0)]),  # no_timestamps, scores 0
        ("1 - 2", []),  # no_ground_truth, scores 0
    ]
    s = score_etbench_evs(items)
    assert s.metrics == {"F1": pytest.approx((0.5 + 1 + 0 + 0.4) / 6)}
    assert s.failed == {"no_timestamps": 1, "no_ground_truth": 1}


def test_vhd() -> None:
    items = [
        ("The highlight is at 12.5 seconds.", [[(10.0, 15.0)]]),  # hit
        ("3", [[(5.0, 6.0)], [(0.0, 3.0)]]),  # second annotator, end included
        ("40", [[(10.0, 15.0), (20.0, 30.0)]]),  # miss
        ("", [[(0.0, 1.0)]]),  # no_timestamps
        ("7", [[(8.0, 6.0)]]),  # a reversed true span is ordered: hit
    ]
    s = score_etbench_vhd(items)
    assert s.metrics == {"F1": pytest.approx(3 / 5)}
    assert s.failed == {"no_timestamps": 1}


def test_gvq() -> None:
    gt = (10.0, 20.0)
    items = [
        ("(B) he eats. 10 - 20 seconds", 1, 4, gt),  # right, IoU 1
        ("B) he eats from 15 - 25", 1, 4, gt),  # right, IoU 5/15: >= 0.1, 0.3
        ("C) runs 10 - 20", 1, 4, gt),  # wrong answer: no grounding credit
        ("B) he eats", 1, 4, gt),  # right, no_timestamps
        ("", 1, 4, gt),  # empty_reply
    ]
    s = score_etbench_gvq(items)
    assert s.metrics["Acc"] == pytest.approx(3 / 5)
    assert s.metrics["R@0.1"] == pytest.approx(2 / 5)
    assert s.metrics["R@0.3"] == pytest.approx(2 / 5)
    assert s.metrics["R@0.5"] == pytest.approx(1 / 5)
    assert s.metrics["R@0.7"] == pytest.approx(1 / 5)
    assert s.metrics["mRec"] == pytest.approx(0.3)
    assert s.metrics["mIoU"] == pytest.approx(4 / 15)  # (1 + 1/3) / 5
    assert s.main == "mRec"
    assert s.failed == {"no_timestamps": 1, "empty_reply": 1}


def test_captioning_localisation() -> None:
    items = [
        # (0,10): IoU 1 with g1; (10,15): IoU 0.5 with g2, not > 0.5.
        # t 0.1, 0.3: P = R = 1; t 0.5, 0.7: P = R = 1/2
        ("0 - 10 seconds, a man walks. 10 - 15 seconds, he sits.", [(0.0, 10.0), (10.0, 20.0)]),
        # (0,2): IoU 0.2 with g1; (30,40): 0. t 0.1: P 1/2, R 1; else 0
        ("0 - 2, 30 - 40", [(0.0, 10.0)]),
        ("nothing", [(0.0, 10.0)]),  # no_timestamps
    ]
    s = score_etbench_captioning(items)
    # t 0.1: P = 1.5/3, R = 2/3 -> F1 = 2 * (1/2)(2/3) / (7/6) = 4/7
    assert s.metrics["P@0.1"] == pytest.approx(0.5)
    assert s.metrics["R@0.1"] == pytest.approx(2 / 3)
    assert s.metrics["F1@0.1"] == pytest.approx(4 / 7)
    assert s.metrics["F1@0.3"] == pytest.approx(1 / 3)  # P = R = 1/3
    assert s.metrics["F1@0.5"] == pytest.approx(1 / 6)  # P = R = 1/6
    assert s.metrics["F1@0.7"] == pytest.approx(1 / 6)
    assert s.metrics["F1"] == pytest.approx(13 / 42)  # (4/7 + 1/3 + 1/6 + 1/6) / 4
    assert s.failed == {"no_timestamps": 1}


def test_captioning_missing_reply_scales_like_an_unreadable_one() -> None:
    items = [("0 - 10, 30 - 40", [(0.0, 10.0)])]  # P = 1/2, R = 1 at every t
    one = score_etbench_captioning(items)
    assert one.metrics["F1"] == pytest.approx(2 / 3)  # 2 * (1/2) / (3/2)
    two = score_etbench_captioning([*items, ("", [(0.0, 10.0)])])
    assert two.metrics["F1"] == pytest.approx(1 / 3)  # P = 1/4, R = 1/2 -> (1/4) / (3/4)
    assert one.with_missing(1, "no_answer").metrics["F1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "scorer",
    [
        score_etbench_single_span,
        score_etbench_tem,
        score_etbench_multi_span,
        score_etbench_evs,
        score_etbench_vhd,
        score_etbench_gvq,
        score_etbench_captioning,
        score_etbench_choice,
    ],
)
def test_no_samples(scorer: Callable[[list[Any]], Scores]) -> None:
    s = scorer([])
    assert s.total == 0
    assert s.failed == {}
    assert all(v == 0.0 for v in s.metrics.values())


def test_iou_thresholds_are_inclusive_except_for_captioning() -> None:
    gt = (10.0, 20.0)
    half = "10 - 15"  # IoU exactly 0.5
    assert score_etbench_single_span([(half, gt)]).metrics["F1@0.5"] == 1.0
    assert score_etbench_single_span([(half, gt)]).metrics["F1@0.7"] == 0.0
    assert score_etbench_tem([(half, [gt])]).metrics["R@0.5"] == 1.0
    assert score_etbench_gvq([(f"A) {half}", 0, 4, gt)]).metrics["R@0.5"] == 1.0
    assert score_etbench_multi_span([(half, [gt])]).metrics["F1@0.5"] == 1.0
    # densevid_eval's rule: IoU must exceed the threshold
    assert score_etbench_captioning([(half, [gt])]).metrics["F1@0.5"] == 0.0
    assert score_etbench_captioning([(half, [gt])]).metrics["F1@0.3"] == 1.0
