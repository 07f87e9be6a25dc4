"""What every scorer returns (`Scores`) and the temporal IoU they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.eval.parsing import Span


@dataclass(frozen=True)
class Scores:
    """The result of scoring one set of samples.

    Attributes:
        main: The key of the headline metric in `metrics`.
        metrics: Metric name -> value, each in [0, 1] (e.g. {"R1@0.5": 0.4, "mIoU": 0.37}).
        total: Samples scored, readable or not (every metric is over all of them).
        failed: Reason -> number of samples whose reply could not be read, e.g.
            {"no_timestamps": 3}. Those samples count as wrong in `metrics`.
    """

    main: str
    metrics: dict[str, float]
    total: int
    failed: dict[str, int]

    @property
    def value(self) -> float:
        """The headline metric."""
        return self.metrics[self.main]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: main, value, total, failed, metrics."""
        return {
            "main": self.main,
            "value": self.value,
            "total": self.total,
            "failed": dict(self.failed),
            "metrics": dict(self.metrics),
        }

    def with_missing(self, count: int, reason: str) -> Scores:
        """These scores widened by `count` samples that had no reply, each scoring 0.

        Exact for every scorer in `services.eval`: each metric is a mean over all samples in
        which an unreadable sample adds 0, or (dense-captioning F1) a function of such means
        that scales with them, so each metric scales by total / (total + count).

        Args:
            count: Samples without a reply.
            reason: Their reason, e.g. "no_answer".
        """
        if count <= 0:
            return self
        scale = self.total / (self.total + count)
        failed = dict(self.failed)
        failed[reason] = failed.get(reason, 0) + count
        metrics = {k: v * scale for k, v in self.metrics.items()}
        return Scores(self.main, metrics, self.total + count, failed)


def ratio(part: float, whole: int) -> float:
    """part / whole, or 0.0 for no samples."""
    return part / whole if whole else 0.0


def temporal_iou(a: Span, b: Span) -> float:
    """Intersection over union of two time spans [start, end].

    Each span is ordered first (a reversed (7, 3) is (3, 7)); union = |a| + |b| - |a ∩ b|. When
    the union has no length (two equal zero-length spans) the IoU is 0, as in
    `etchat/eval/eval_grounding.py`, which replaces a non-finite IoU (nncore's `temporal_iou`
    dividing 0 by 0) with 0. A span with a non-finite end gives 0.

    Args:
        a: One span, seconds.
        b: The other.

    Returns:
        The IoU in [0, 1].
    """
    if not all(math.isfinite(t) for t in (*a, *b)):
        return 0.0
    s1, e1 = min(a), max(a)
    s2, e2 = min(b), max(b)
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    return inter / union if union > 0 else 0.0
