"""E.T. Bench files: reading (each bad sample skipped with its reason), writing predictions
back (a round trip keeps every sample as read, plus `a`), and scoring per task and source."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgumentError
from services.eval.etbench import (
    TASKS,
    read_etbench,
    score_etbench,
    with_answer,
    write_predictions,
)


def _base(task: str, idx: int = 0, **fields: Any) -> dict[str, Any]:
    sample: dict[str, Any] = {
        "version": 1.0,
        "idx": idx,
        "task": task,
        "source": "src1",
        "video": f"{task}/v{idx}.mp4",
        "duration": 35,
        "q": "prompt",
    }
    return sample | fields


def good_samples() -> list[dict[str, Any]]:
    """One valid sample per task, `txt` and `vid` styles mixed."""
    options = ["walk", "run", "eat", "sit"]
    return [
        _base("rar", src=[1.2, 3.0], p=1, o=options, q="What happens from <vid> to <vid>?"),
        _base("eca", p=0, o=[[0, 5], [5, 9], [9, 12], [12, 20]], q="Which segment matches?"),
        _base("rvq", src=[4.0], p=3, o=options, q="At <vid>, what does he do?"),
        _base("tvg", tgt=[15.0, 31.0]),
        _base("epm", tgt=[[2, 4]]),
        _base("tal", tgt=[[0, 5], [10, 12.5]]),
        _base("evs", tgt=[[0, 5]]),
        _base("vhd", tgt=[[[1, 2]], [[1.5, 3]]]),
        _base("dvc", tgt=[[0, 5], [5, 9]], g=["a man walks", "he sits"]),
        _base("slc", tgt=[[1, 2]], g=["step one"]),
        _base("tem", src=[3, 6], tgt=[[10, 12], [20, 25]], q="When does <vid> - <vid> happen again?"),
        _base("gvq", p=2, o=options, tgt=[10, 20]),
    ]


def test_reads_every_task() -> None:
    records, report = read_etbench(good_samples())
    assert [r.sample.task for r in records] == list(TASKS)
    assert report.total == report.kept == 12
    assert report.problems == []
    by_task = {r.sample.task: r.sample for r in records}
    assert by_task["rar"].style == "vid"
    assert by_task["tvg"].style == "txt"
    assert by_task["tvg"].span() == (15.0, 31.0)
    assert by_task["epm"].span() == (2.0, 4.0)  # [[s, e]] accepted for one span
    assert by_task["tal"].spans() == [(0.0, 5.0), (10.0, 12.5)]
    assert by_task["vhd"].annotators() == [[(1.0, 2.0)], [(1.5, 3.0)]]
    assert by_task["tvg"].model_extra == {"version": 1.0}


def test_vhd_spans_alone_are_one_annotator_and_true_spans_are_ordered() -> None:
    records, _ = read_etbench([_base("vhd", tgt=[[1, 2], [6, 4]])])
    assert records[0].sample.annotators() == [[(1.0, 2.0), (4.0, 6.0)]]


def _reason(sample: Any, **kwargs: Any) -> tuple[str, str]:
    records, report = read_etbench([sample], **kwargs)
    assert records == []
    assert report.total == 1 and report.kept == 0
    (problem,) = report.problems
    assert report.reasons == {problem.reason: 1}
    return problem.reason, problem.detail


def _without(sample: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in sample.items() if k != key}


@pytest.mark.parametrize(
    ("sample", "reason", "detail"),
    [
        (["not", "an", "object"], "not_an_object", "got list"),
        (_without(_base("tvg", tgt=[1, 2]), "q"), "missing_field", "q: Field required"),
        (_without(_base("tvg", tgt=[1, 2]), "video"), "missing_field", "video"),
        (_base("tvg", tgt=[1, 2], idx="3"), "bad_field", "idx"),
        (_base("tvg", tgt=[1, 2], idx=True), "bad_field", "idx"),
        (_base("tvg", tgt=[1, 2], duration=0), "bad_field", "duration"),
        (_base("tvg", tgt=[1, 2], src=["a"]), "bad_field", "src"),
        (_base("tvg", tgt=[1, 2], a=5), "bad_field", "a"),
        (_base("xyz"), "unknown_task", "got 'xyz'"),
        (_base("tvg"), "missing_field", "tgt"),
        (_base("tvg", tgt=[[1, 2], [3, 4]]), "bad_tgt", "expected [start, end]"),
        (_base("tvg", tgt=[1, "b"]), "bad_tgt", "expected [start, end]"),
        (_base("tal", tgt=[1, 2]), "bad_tgt", "list of [start, end]"),
        (_base("tal", tgt=[]), "bad_tgt", "list of [start, end]"),
        (_base("tem", tgt=[[1, float("nan")]]), "bad_tgt", "list of [start, end]"),
        (_base("vhd", tgt=[[[1, 2]], [1, 2]]), "bad_tgt", "per annotator"),
        (_base("rar", o=["a", "b"]), "missing_field", "p: required"),
        (_base("gvq", p=0, tgt=[1, 2]), "missing_field", "o: required"),
        (_base("rvq", p=0, o=["only"]), "bad_options", "got 1"),
        (_base("rvq", p=4, o=["a", "b", "c", "d"]), "bad_answer_index", "expected 0..3, got 4"),
        (_base("rvq", p=-1, o=["a", "b", "c", "d"]), "bad_answer_index", "got -1"),
        (_base("dvc", tgt=[[0, 1], [1, 2]], g=["one"]), "bad_captions", "(2), got 1"),
        (_base("slc", tgt=[[0, 1]]), "bad_captions", "got none"),
        (_base("rar", p=0, o=["a", "b"], q="<vid> to <vid>", src=[1.0]), "vid_src_mismatch", "expected 2"),
        (_base("rar", p=0, o=["a", "b"], q="at <vid>"), "vid_src_mismatch", "expected 1"),
    ],
)
def test_bad_sample_reasons(sample: Any, reason: str, detail: str) -> None:
    got_reason, got_detail = _reason(sample)
    assert got_reason == reason
    assert detail in got_detail


def test_missing_video(tmp_path: Path) -> None:
    (tmp_path / "tvg").mkdir()
    (tmp_path / "tvg" / "v0.mp4").write_bytes(b"x")
    records, _ = read_etbench([_base("tvg", tgt=[1, 2])], media_root=tmp_path)
    assert len(records) == 1
    reason, detail = _reason(_base("tvg", idx=1, tgt=[1, 2]), media_root=tmp_path)
    assert reason == "missing_video"
    assert "tvg/v1.mp4" in detail


def test_bad_samples_are_skipped_and_the_rest_kept() -> None:
    data = [
        _base("tvg", 0, tgt=[1, 2]),
        _base("tvg", 0, tgt=[3, 4]),  # same task, source and idx
        _base("tvg", 0, tgt=[3, 4], source="src2"),  # other source: fine
        _base("nope", 1),
        _base("tvg", 2),
    ]
    records, report = read_etbench(data)
    assert [(r.position, r.sample.source) for r in records] == [(0, "src1"), (2, "src2")]
    assert report.total == 5 and report.kept == 2
    assert report.reasons == {"duplicate_idx": 1, "unknown_task": 1, "missing_field": 1}
    assert [(p.position, p.idx) for p in report.problems] == [(1, 0), (3, 1), (4, 2)]


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "expected JSON"), ('{"idx": 0}', "expected a JSON list of samples, got dict")],
)
def test_file_level_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "anno.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError, match=message):
        read_etbench(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        read_etbench(tmp_path / "absent.json")


def test_round_trip(tmp_path: Path) -> None:
    original = good_samples()
    anno = tmp_path / "etbench_vid_v1.0.json"
    anno.write_text(json.dumps(original))
    records, _ = read_etbench(anno)

    answers = [f"reply {i}" for i in range(len(records))]
    out = tmp_path / "etbench.json"
    write_predictions(out, [with_answer(r, a) for r, a in zip(records, answers, strict=True)])

    written = json.loads(out.read_text())
    assert written == [s | {"a": a} for s, a in zip(original, answers, strict=True)]
    # key order as read, `a` appended last; ints stay ints
    assert [list(w) for w in written] == [[*s, "a"] for s in original]
    assert written[0]["duration"] == 35 and isinstance(written[0]["duration"], int)
    assert not list(tmp_path.glob(".*.tmp"))

    again, report = read_etbench(out)
    assert report.kept == len(original)
    assert [r.sample.a for r in again] == answers
    assert [r.sample.model_copy(update={"a": None}) for r in again] == [r.sample for r in records]


def test_with_answer_replaces_an_earlier_answer_and_leaves_the_record_alone() -> None:
    raw = _base("tvg", tgt=[1, 2], a="old")
    records, _ = read_etbench([raw])
    before = copy.deepcopy(raw)
    out = with_answer(records[0], "new")
    assert out == before | {"a": "new"}
    assert list(out) == list(before)
    assert raw == before


def test_score_etbench_averages_sources_and_counts_missing_answers() -> None:
    data = [
        _base("tvg", 0, tgt=[10, 20], a="10 - 20"),  # src1: F1 1
        _base("tvg", 1, tgt=[10, 20], source="src2", a="10 - 20 seconds"),  # src2: 1
        _base("tvg", 2, tgt=[10, 20], source="src2"),  # src2: no answer -> 0
        _base("rvq", 3, p=1, o=["a", "b", "c", "d"], a="B) yes"),
        _base("rvq", 4, p=1, o=["a", "b", "c", "d"], a="what?"),
    ]
    records, _ = read_etbench(data)
    report = score_etbench(records)
    tvg = report.by_source["tvg"]
    assert tvg["src1"].value == 1.0
    assert tvg["src2"].value == pytest.approx(0.5)
    assert tvg["src2"].total == 2
    assert tvg["src2"].failed == {"no_answer": 1}
    assert tvg["src2"].metrics["mIoU"] == pytest.approx(0.5)
    # the task's figure is the mean over sources (1 + 0.5) / 2, not over samples (2/3)
    assert report.by_task["tvg"] == pytest.approx(0.75)
    assert report.by_task["rvq"] == pytest.approx(0.5)
    assert report.by_source["rvq"]["src1"].failed == {"no_letter": 1}
    assert list(report.by_task) == ["rvq", "tvg"]  # in the order of TASKS
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["by_task"] == {"rvq": 0.5, "tvg": 0.75}
    assert as_json["by_source"]["tvg"]["src2"]["failed"] == {"no_answer": 1}


def test_score_etbench_every_task_scores_a_perfect_reply() -> None:
    perfect = {
        "rar": "B) run",
        "eca": "A) 0 - 5",
        "rvq": "D) sit",
        "tvg": "15 - 31",
        "epm": "2 - 4",
        "tal": "0 - 5, 10 - 12.5",
        "evs": "0 - 5",
        "vhd": "1.5",
        "dvc": "0 - 5 a man walks. 5 - 9 he sits.",
        "slc": "1 - 2 step one",
        "tem": "10 - 12",
        "gvq": "C) eat at 10 - 20",
    }
    records, _ = read_etbench([s | {"a": perfect[s["task"]]} for s in good_samples()])
    report = score_etbench(records)
    assert report.by_task == dict.fromkeys(TASKS, 1.0)
