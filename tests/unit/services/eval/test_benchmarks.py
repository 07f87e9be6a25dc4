"""The benchmark registry and the shapes and llava readers and scorers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import InvalidArgumentError, NotFoundError
from services.eval.benchmarks import (
    BENCHMARKS,
    MISSING_FIELD,
    MISSING_MEDIA,
    get_benchmark,
    read_llava,
    read_shapes,
    score_llava,
    score_shapes,
    shapes_correct,
)


def test_registry_names_and_unknown_benchmark() -> None:
    assert set(BENCHMARKS) == {"shapes", "llava"}
    assert get_benchmark("shapes").name == "shapes"
    with pytest.raises(InvalidArgumentError, match=r"expected one of \['llava', 'shapes'\], got 'etbench'"):
        get_benchmark("etbench")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.trainer.synth import synthesize

    out = tmp_path_factory.mktemp("shapes")
    synthesize(out, train=1, heldout=6, seed=3, image_size=32)
    return out


def test_read_shapes_from_folder_or_file(shapes_dir: Path) -> None:
    samples = read_shapes(shapes_dir, None)
    assert samples == read_shapes(shapes_dir / "heldout.json", None)
    assert [s.index for s in samples] == list(range(6))
    first = samples[0]
    assert first.id == "heldout-00000" and first.problem is None
    assert "<image>" not in first.prompt and first.prompt.endswith("?")
    assert [m.modality for m in first.media] == ["image"]
    assert first.media[0].path == shapes_dir / "images" / "heldout_00000.png"
    assert first.extra["kind"] == "color"
    assert set(first.extra["shapes"]) == {"circle", "square", "triangle"}


def test_shapes_scoring_matches_the_trainer_scorer(shapes_dir: Path) -> None:
    """The same verdicts as services.trainer.synth.score_reply: one rule
    (services.common.answer_words), and the reader's vocabulary (meta.json) is synth's."""
    from services.trainer.synth import score_reply

    records = json.loads((shapes_dir / "heldout.json").read_text())
    samples = read_shapes(shapes_dir, None)
    replies = ["", "red", "a blue circle", "It is a square.", "red red square", "green triangle"]
    replies += ["The shape is " + r["answer"]["color"] for r in records[:2]]
    replies += ["A " + r["answer"]["color"] + " " + r["answer"]["shape"] for r in records]
    for record, sample in zip(records, samples, strict=True):
        for reply in replies:
            x = sample.extra
            assert shapes_correct(reply, x["kind"], x["answer"], x["colors"], x["shapes"]) == score_reply(
                reply, record
            ), (reply, record)


def test_score_shapes_by_kind(shapes_dir: Path) -> None:
    samples = read_shapes(shapes_dir, None)[:3]  # kinds color, shape, describe
    a = [s.extra["answer"] for s in samples]
    replies = [a[0]["color"], "", f"a {a[2]['color']} {a[2]['shape']}"]
    scores = score_shapes(samples, replies)
    assert scores.metrics == {
        "accuracy": pytest.approx(2 / 3),
        "accuracy/color": 1.0,
        "accuracy/describe": 1.0,
        "accuracy/shape": 0.0,
    }
    assert scores.failed == {"empty_reply": 1} and scores.total == 3


def test_shapes_bad_records(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"png")
    records = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "R"}],
        },
        {
            "id": "b",
            "image": "gone.png",
            "kind": "color",
            "answer": {"color": "red", "shape": "circle"},
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "R"}],
        },
    ]
    (tmp_path / "heldout.json").write_text(json.dumps(records))
    samples = read_shapes(tmp_path, None)
    assert [s.problem for s in samples] == [MISSING_FIELD, MISSING_MEDIA]
    with pytest.raises(NotFoundError, match="no such file"):
        read_shapes(tmp_path / "none.json", None)


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_read_llava_media_roots_problems_and_choices(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(b"x")
    (media / "t.wav").write_bytes(b"y")
    records = [
        {"id": "img", "image": "a.png", "conversations": _turns("<image>\nWhat is it?", "A cat.")},
        {
            "id": "aud",
            "audio": "t.wav",
            "conversations": _turns("<audio>\nPitch?\nA. low\nB. high\nC. mid", "B"),
        },
        {"id": "gone", "video": "v.mp4", "conversations": _turns("<video>\nQ", "x")},
        {"id": "noconv", "image": "a.png"},
        "not a record",
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    samples = read_llava(data, media)
    assert [s.problem for s in samples] == [None, None, MISSING_MEDIA, MISSING_FIELD, MISSING_FIELD]
    assert samples[0].prompt == "What is it?" and samples[0].reference == "A cat."
    assert samples[0].media[0].path == media / "a.png" and "choice" not in samples[0].extra
    choice = samples[1].extra["choice"]
    assert (choice.answer, choice.n_options) == (1, 3)
    assert samples[1].media[0].modality == "audio"
    # default media root: the data file's folder
    assert read_llava(data, None)[0].media[0].path == tmp_path / "a.png"


def test_score_llava_exact_contains_letter(tmp_path: Path) -> None:
    records = [
        {"id": "1", "conversations": _turns("Q1", "red car")},
        {"id": "2", "conversations": _turns("Q2\nA. x\nB. y", "A")},
        {"id": "3", "conversations": _turns("Q3\nA. x\nB. y", "B")},
        {"id": "4", "conversations": _turns("Q4", "dog")},
    ]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    samples = read_llava(data, None)
    # 1: contains only; 2: letter right (exact and contains); 3: no letter; 4: empty
    scores = score_llava(samples, ["a red car parked", "A", "hmm", ""])
    assert scores.main == "exact" and scores.total == 4
    assert scores.metrics == {"exact": 0.25, "contains": 0.5, "letter": 0.5}
    assert scores.failed == {"empty_reply": 1, "no_letter": 1}
    bench = get_benchmark("llava")
    assert bench.unreadable(samples[2], "hmm") == "no_letter"
    assert bench.unreadable(samples[0], "hmm") is None
    assert bench.unreadable(samples[0], "  ") == "empty_reply"
