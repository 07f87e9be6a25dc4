"""The synthetic shapes dataset: determinism, validity under the trainer's loaders, and scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.llm.templates import get_template
from services.trainer.datasets import DatasetSpec, SupervisedEncoder, load_supervised, modality_slots
from services.trainer.synth import BACKGROUNDS, COLORS, KINDS, SHAPES, score_reply, synthesize


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, train=40, heldout=12, seed=7)
    return out


def test_two_runs_write_the_same_bytes(tmp_path: Path, synth_dir: Path) -> None:
    report = synthesize(tmp_path / "again", train=40, heldout=12, seed=7)
    assert tree(tmp_path / "again") == tree(synth_dir)
    assert (report.train_images, report.heldout_images, report.train_samples) == (40, 12, 40)
    other = synthesize(tmp_path / "other", train=40, heldout=12, seed=8)
    assert json.loads(other.train.read_text()) != json.loads((synth_dir / "train.json").read_text())


def test_files_and_meta(synth_dir: Path) -> None:
    assert sorted(p.name for p in synth_dir.iterdir()) == [
        "captions.json",
        "heldout.json",
        "images",
        "meta.json",
        "train.json",
    ]
    assert len(list((synth_dir / "images").glob("*.png"))) == 52
    meta = json.loads((synth_dir / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["seed"] != meta["heldout_seed"]
    assert (meta["caption_pairs"], meta["train_samples"], meta["heldout_samples"]) == (40, 40, 12)
    assert meta["colors"] == list(COLORS) and meta["shapes"] == list(SHAPES)


def test_images_show_the_named_shape_colour_and_background(synth_dir: Path) -> None:
    for record in json.loads((synth_dir / "heldout.json").read_text()):
        image = Image.open(synth_dir / record["image"]).convert("RGB")
        assert image.size == (64, 64)
        counts = {rgb: n for n, rgb in image.getcolors(maxcolors=64 * 64) or []}
        shape = counts.get(COLORS[record["answer"]["color"]], 0)
        # The shape's side is 45-80% of the image's: a triangle covers at least half its box.
        assert shape >= 0.5 * (0.45 * 64) ** 2 * 0.9
        backgrounds = [name for name, rgb in BACKGROUNDS.items() if counts.get(rgb, 0) > 64]
        assert len(backgrounds) == 1


def test_texts_describe_the_scene(synth_dir: Path) -> None:
    captions = json.loads((synth_dir / "captions.json").read_text())
    assert all(c["caption"].startswith(("a ", "a picture of a ")) for c in captions)
    assert all(" background" in c["caption"] for c in captions)
    for record in json.loads((synth_dir / "heldout.json").read_text()):
        question, answer = record["conversations"]
        assert question["value"].startswith("<image>\n")
        assert score_reply(answer["value"], record)
    kinds = [r["kind"] for r in json.loads((synth_dir / "heldout.json").read_text())]
    assert kinds == list(KINDS) * 4
    train = json.loads((synth_dir / "train.json").read_text())
    assert {len(r["conversations"]) for r in train} == {2, 4}


@pytest.mark.parametrize(
    ("name", "template", "format"),
    [
        ("captions.json", "plain", "captions"),
        ("train.json", "vicuna_v1", "llava"),
        ("heldout.json", "vicuna_v1", "llava"),
    ],
)
def test_files_load_without_bad_samples(
    synth_dir: Path, tiny_preset: Preset, name: str, template: str, format: Any
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_preset.llm.checkpoint)
    encoder = SupervisedEncoder(
        tokenizer, get_template(template), modality_slots(tiny_preset, tokenizer), max_length=256
    )
    dataset = load_supervised(DatasetSpec(format=format, path=synth_dir / name), encoder, max_bad_ratio=0.0)
    assert dataset.report.bad == 0 and len(dataset) == (12 if name == "heldout.json" else 40)
    # Words come from the tiny tokenizer's vocabulary, so sequences stay short.
    assert max(len(e.input_ids) for e in dataset) < (48 if template == "plain" else 128)


def held(kind: str, color: str = "red", shape: str = "circle") -> dict[str, Any]:
    return {"kind": kind, "answer": {"color": color, "shape": shape}}


@pytest.mark.parametrize(
    ("reply", "sample", "expected"),
    [
        ("The shape is red.", held("color"), True),
        ("RED", held("color"), True),
        ("The shape is blue.", held("color"), False),
        ("It is red or blue.", held("color"), False),
        ("A red circle on a white background.", held("color"), True),  # background is no shape colour
        ("reddish", held("color"), False),
        ("It is a circle.", held("shape"), True),
        ("It is a circle or a square.", held("shape"), False),
        ("It is a triangle.", held("shape"), False),
        ("The shape is red.", held("shape"), False),
        ("A red circle on a black background.", held("describe"), True),
        ("A red square.", held("describe"), False),
        ("A blue circle.", held("describe"), False),
        ("", held("describe"), False),
    ],
)
def test_score_reply(reply: str, sample: dict[str, Any], expected: bool) -> None:
    assert score_reply(reply, sample) is expected


def test_score_reply_refuses_malformed_samples() -> None:
    with pytest.raises(InvalidArgumentError, match="expected 'kind' in"):
        score_reply("red", {"kind": "size", "answer": {"color": "red", "shape": "circle"}})
    with pytest.raises(InvalidArgumentError, match="expected a known color and shape"):
        score_reply("red", held("color", color="pink"))


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="expected train >= 1"):
        synthesize(tmp_path, train=0)
    with pytest.raises(InvalidArgumentError, match="image_size: expected 16 to 1024 pixels, got 8"):
        synthesize(tmp_path, image_size=8)
