"""Reading the preprocessing parity fixtures (`scripts/parity/*_preprocess.py`) and checking an
output against one of their digests.

A digest (see `scripts/parity/_preprocess_common.py`) holds an output's shape, its exact values
at a fixed pseudo-random subset of elements, and float64 sums and sums of squares per plane
(last two axes). `check_digest` requires the same shape, every kept value within `atol`, and
every plane sum and sum of squares within the bound `atol` implies for that plane; it returns
the largest difference seen among the kept values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


@dataclass(frozen=True)
class Fixture:
    """One seed's preprocessing fixture: the JSON record, the digests and the folder of its files."""

    folder: Path
    record: dict[str, Any]
    tensors: dict[str, np.ndarray]

    def file(self, key: str) -> bytes:
        """The bytes of input `key` (its name in `record["inputs"][key]["file"]`)."""
        return (self.folder / self.record["inputs"][key]["file"]).read_bytes()


def load_fixture(seed: str, part: str = "preprocess") -> Fixture:
    """tests/fixtures/parity/<seed>/<part>.{json,safetensors}."""
    folder = FIXTURES / seed
    record = json.loads((folder / f"{part}.json").read_text())
    return Fixture(folder, record, load_file(str(folder / f"{part}.safetensors")))


def check_digest(fixture: Fixture, name: str, ours: np.ndarray, *, atol: float = 1e-5) -> float:
    """Compare `ours` with the digest of output `name`; returns the largest kept-value difference.

    Raises:
        AssertionError: Another shape, a kept value off by more than `atol`, or a plane whose
            sum (sum of squares) is further from the seed's than `atol` per element allows.
    """
    t = fixture.tensors
    shape = tuple(int(s) for s in t[f"{name}.shape"])
    assert ours.shape == shape, f"{name}: expected shape {shape}, got {ours.shape}"
    flat = np.ascontiguousarray(ours, dtype=np.float32).reshape(-1)
    idx = t[f"{name}.idx"]
    diff = np.abs(flat[idx].astype(np.float64) - t[f"{name}.values"].astype(np.float64))
    worst = float(diff.max())
    where = np.unravel_index(int(idx[int(diff.argmax())]), shape)
    assert worst <= atol, f"{name}: {worst:.3g} > {atol} at {where} (of {len(idx)} kept values)"
    planes = flat.reshape(-1, shape[-2] * shape[-1]).astype(np.float64)
    n = planes.shape[1]
    sums, sumsq = planes.sum(axis=1), (planes**2).sum(axis=1)
    # |sum x - sum y| <= n atol; |sum x^2 - sum y^2| <= sum |x - y| |x + y| <= n atol (2 max|x| + atol)
    sum_bound = n * atol + 1e-9 * np.abs(sums).max()
    sq_bound = n * atol * (2 * np.abs(planes).max(axis=1) + atol) + 1e-9 * sumsq
    bad_sum = np.abs(sums - t[f"{name}.sum"]) > sum_bound
    bad_sq = np.abs(sumsq - t[f"{name}.sumsq"]) > sq_bound
    assert not bad_sum.any(), f"{name}: plane {int(np.argmax(bad_sum))} sum differs beyond {atol} per element"
    assert not bad_sq.any(), f"{name}: plane {int(np.argmax(bad_sq))} sum of squares differs beyond {atol}"
    return worst


def real_preset(name: str, cache_dir: Path) -> Any:
    """A shipped real preset, validated (its checkpoints need not exist: nothing is loaded)."""
    from services.common.presets import load_preset

    return load_preset(name, cache_dir=cache_dir)


def frame_times_match_tags(times: np.ndarray, tags: list[float]) -> bool:
    """Our frame times (index / fps) rounded to 0.1 s, as the seeds print them, equal `tags`."""
    return [round(float(t), 1) for t in times] == [round(float(t), 1) for t in tags]
