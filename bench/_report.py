"""Figures, their baselines and ratios; the printed table and the JSON report."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class Figure:
    """One measured figure against a baseline measured in the same run.

    Attributes:
        name: What was measured ("tokens/s @16").
        value: modalmesh's figure (or the variant under test).
        baseline: The baseline's figure, same unit.
        unit: "tokens/s", "s", "MB/s", "images/s".
        better: Whether a higher or a lower value is better.
        note: What the value and the baseline are.
    """

    name: str
    value: float
    baseline: float
    unit: str
    better: Literal["higher", "lower"]
    note: str = ""

    @property
    def ratio(self) -> float:
        """value / baseline (nan when the baseline is 0)."""
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def gain(self) -> float:
        """How many times better the value is than the baseline (> 1: better)."""
        r = self.ratio
        return r if self.better == "higher" else (1.0 / r if r else float("nan"))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "gain": self.gain}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(x: float) -> str:
    if x != x:  # nan
        return "nan"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def table(results: dict[str, list[Figure]]) -> str:
    """A fixed-width table of every figure: value, baseline, ratio and gain."""
    head = ("benchmark", "figure", "value", "baseline", "unit", "ratio", "gain", "better")
    rows = [head]
    for bench, figures in results.items():
        for f in figures:
            rows.append(
                (
                    bench,
                    f.name,
                    _fmt(f.value),
                    _fmt(f.baseline),
                    f.unit,
                    _fmt(f.ratio),
                    _fmt(f.gain),
                    f.better,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, list[Figure]], meta: dict[str, Any]) -> None:
    """Every figure with its baseline, ratio and gain, plus the run's settings and machine."""
    body = {"meta": meta, "benchmarks": {b: [f.to_json() for f in fs] for b, fs in results.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2, allow_nan=True) + "\n")
