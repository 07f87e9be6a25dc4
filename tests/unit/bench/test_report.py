"""bench._report: ratios, gains, percentiles and the JSON shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench._report import Figure, percentile, table, write_json


def test_ratio_is_value_over_baseline_and_gain_says_times_better() -> None:
    faster = Figure("tokens/s @16", 300.0, 100.0, "tokens/s", "higher")
    quicker = Figure("latency p50 @1", 0.5, 1.0, "s", "lower")
    assert faster.ratio == 3.0 and faster.gain == 3.0
    assert quicker.ratio == 0.5 and quicker.gain == 2.0
    assert math.isnan(Figure("x", 1.0, 0.0, "s", "lower").ratio)


def test_percentile_interpolates_between_sorted_values() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert math.isnan(percentile([], 50))


def test_table_and_json_hold_every_figure(tmp_path: Path) -> None:
    results = {"cache": [Figure("latency p50 cached", 0.09, 0.11, "s", "lower", "note")]}
    assert "latency p50 cached" in table(results)
    write_json(tmp_path / "r.json", results, {"quick": True})
    body = json.loads((tmp_path / "r.json").read_text())
    (figure,) = body["benchmarks"]["cache"]
    assert figure["name"] == "latency p50 cached" and figure["note"] == "note"
    assert math.isclose(figure["ratio"], 0.09 / 0.11) and math.isclose(figure["gain"], 0.11 / 0.09)
