"""The synthetic shapes dataset: determinism, validity under the trainer's loaders, and scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.models.prompt.templates import get_template
from services.trainer.datasets import (
    DatasetSpec,
    SupervisedEncoder,
    load_samples,
    load_supervised,
    modality_slots,
)
from services.trainer.synth import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    MEDIA_KINDS,
    SHAPES,
    score_reply,
    score_reply_for,
    synthesize,
)


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
    with pytest.raises(InvalidArgumentError, match=r"t2x needs a preset with outputs .*got none"):
        synthesize(tmp_path, modalities=["image", "t2x"])


# Video, audio and event modalities.
MEDIA = ("video", "audio", "event")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_media")
    synthesize(out, train=6, heldout=4, seed=3, modalities=("image", *MEDIA))
    return out


def test_media_two_runs_write_the_same_bytes(tmp_path: Path, media_dir: Path) -> None:
    report = synthesize(tmp_path / "again", train=6, heldout=4, seed=3, modalities=("image", *MEDIA))
    assert tree(tmp_path / "again") == tree(media_dir)
    assert sorted(report.media) == sorted(MEDIA)
    assert {(m.train_items, m.heldout_items) for m in report.media.values()} == {(6, 4)}
    other = synthesize(tmp_path / "other", train=6, heldout=4, seed=4, modalities=("image", "audio"))
    assert sorted(other.media) == ["audio"] and not (tmp_path / "other" / "video").exists()
    assert (tmp_path / "other" / "audio" / "train_00000.wav").read_bytes() != (
        media_dir / "audio" / "train_00000.wav"
    ).read_bytes()


def test_media_files_and_meta(media_dir: Path) -> None:
    meta = json.loads((media_dir / "meta.json").read_text())
    assert list(meta["modalities"]) == ["image", "video", "audio", "event"]
    for modality, ext in (("video", "mp4"), ("audio", "wav"), ("event", "npy")):
        assert len(list((media_dir / modality).glob(f"*.{ext}"))) == 10
        entry = meta["modalities"][modality]
        assert (entry["train"], entry["heldout"]) == (6, 4)
        assert all((media_dir / name).is_file() for name in entry["files"].values())


@pytest.mark.parametrize("modality", MEDIA)
def test_media_files_load_without_bad_samples(media_dir: Path, modality: str) -> None:
    captions, report = load_samples(
        DatasetSpec(format="captions", path=media_dir / f"captions_{modality}.json", modality=modality),
        max_bad_ratio=0.0,
    )
    assert report.bad == 0 and len(captions) == 6
    for name, count in ((f"train_{modality}.json", 6), (f"heldout_{modality}.json", 4)):
        samples, report = load_samples(
            DatasetSpec(format="llava", path=media_dir / name, modality=modality),
            placeholder=f"<{modality}>",
            max_bad_ratio=0.0,
        )
        assert report.bad == 0 and len(samples) == count


def test_videos_decode_and_move_as_captioned(media_dir: Path) -> None:
    from services.models.media.video import FrameSampling, VideoLimits, decode_video

    for record in json.loads((media_dir / "captions_video.json").read_text()):
        video = decode_video(
            (media_dir / record["media"]).read_bytes(),
            sampling=FrameSampling(num_frames=16),
            limits=VideoLimits(),
        )
        assert video.num_frames == 16 and video.frames.shape == (16, 64, 64, 3)
        frames = video.frames.astype(int)  # (16, 64, 64, 3)
        # Where the shape is: the columns whose pixels differ most from the frame's corner colour.
        centres = []
        for frame in frames:
            diff = np.abs(frame - frame[0, 0]).sum(axis=(0, 2))  # (W,)
            centres.append(float(np.average(np.arange(64), weights=diff + 1e-6)))
        moving = "right" if centres[-1] > centres[0] else "left"
        assert record["caption"].endswith(f"moving {moving}")


def test_tones_decode_at_the_captioned_pitch(media_dir: Path) -> None:
    from services.models.media.audio import AudioLimits, decode_audio

    for record in json.loads((media_dir / "captions_audio.json").read_text()):
        wave = decode_audio((media_dir / record["media"]).read_bytes(), fmt_hint="wav", limits=AudioLimits())
        assert wave.sample_rate == 16_000 and wave.seconds == pytest.approx(2.0)
        peak = np.fft.rfftfreq(len(wave.samples), 1 / 16_000)[np.argmax(np.abs(np.fft.rfft(wave.samples)))]
        pitch = {220: "low", 440: "medium", 880: "high"}[round(peak)]
        assert record["caption"] == f"a {pitch} tone"


def test_events_parse_and_move_as_captioned(media_dir: Path) -> None:
    from services.models.media.events import EventLimits, parse_events

    for record in json.loads((media_dir / "captions_event.json").read_text()):
        stream = parse_events((media_dir / record["media"]).read_bytes(), limits=EventLimits())
        assert (stream.width, stream.height) == (64, 48) and set(np.unique(stream.p)) == {0, 1}
        on = stream.p == 1
        half = len(stream) // 2
        early, late = stream.x[:half][on[:half]].mean(), stream.x[half:][on[half:]].mean()
        assert record["caption"] == f"an edge moving {'right' if late > early else 'left'}"


@pytest.mark.parametrize("modality", MEDIA)
def test_media_reference_answers_score(media_dir: Path, modality: str) -> None:
    held = json.loads((media_dir / f"heldout_{modality}.json").read_text())
    assert [r["kind"] for r in held] == [
        list(MEDIA_KINDS[modality])[i % len(MEDIA_KINDS[modality])] for i in range(4)
    ]
    for record in held:
        question, answer = record["conversations"]
        assert question["value"].startswith(f"<{modality}>\n")
        assert score_reply_for(modality, answer["value"], record)


def video_sample(kind: str) -> dict[str, Any]:
    return {"kind": kind, "answer": {"color": "red", "shape": "circle", "direction": "left"}}


@pytest.mark.parametrize(
    ("modality", "reply", "sample", "expected"),
    [
        ("video", "It is moving left.", video_sample("direction"), True),
        ("video", "It moves left, then right.", video_sample("direction"), False),
        ("video", "A red circle moving left.", video_sample("describe"), True),
        ("video", "A red circle moving right.", video_sample("describe"), False),
        ("video", "The shape is red.", video_sample("color"), True),
        ("audio", "It is a high tone.", {"kind": "pitch", "answer": {"pitch": "high"}}, True),
        ("audio", "Low or high.", {"kind": "pitch", "answer": {"pitch": "high"}}, False),
        ("audio", "It is below the line.", {"kind": "pitch", "answer": {"pitch": "low"}}, False),
        ("event", "The edge is moving right.", {"kind": "direction", "answer": {"direction": "right"}}, True),
        ("event", "left", {"kind": "direction", "answer": {"direction": "right"}}, False),
        ("image", "The shape is red.", held("color"), True),
    ],
)
def test_score_reply_for(modality: str, reply: str, sample: dict[str, Any], expected: bool) -> None:
    assert score_reply_for(modality, reply, sample) is expected


def test_score_reply_for_refuses_malformed_samples() -> None:
    with pytest.raises(InvalidArgumentError, match="modality: expected one of"):
        score_reply_for("smell", "red", held("color"))
    with pytest.raises(InvalidArgumentError, match="expected 'kind' in \\['pitch'\\]"):
        score_reply_for("audio", "high", {"kind": "color", "answer": {"pitch": "high"}})
    with pytest.raises(InvalidArgumentError, match="answer: expected known pitch"):
        score_reply_for("audio", "high", {"kind": "pitch", "answer": {"pitch": "shrill"}})


def test_modalities_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="modalities: expected 'image' and any of"):
        synthesize(tmp_path, train=1, heldout=0, modalities=("image", "smell"))
    with pytest.raises(InvalidArgumentError, match="modalities: expected 'image'"):
        synthesize(tmp_path, train=1, heldout=0, modalities=("video",))
