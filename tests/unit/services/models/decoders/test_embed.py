"""Caption embeddings for stage 2: each tiny decoder's text-encoder conditioning per output
modality, in the seed's stored shapes, the t2x dataset file, and bad input named by line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.presets import Preset, load_preset
from services.models.decoders.embed import (
    CaptionEmbedder,
    embed_captions,
    file_shape,
    load_caption_embedding,
    read_captions,
)

SHAPES = {"image": (77, 32), "audio": (16,), "video": (77, 48)}  # tiny-nextgpt's conditioning


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Preset:
    """tiny-nextgpt whose decoder folders (only those) are written under a private cache."""
    from services.models.decoders.tiny import write_tiny_decoder

    cache = tmp_path_factory.mktemp("embed-cache")
    loaded = load_preset("tiny-nextgpt", cache_dir=cache)
    for modality, spec in loaded.outputs.items():
        write_tiny_decoder(str(modality), spec.decoder.checkpoint)
    return loaded


@pytest.fixture(scope="module")
def embedders(preset: Preset) -> dict[str, CaptionEmbedder]:
    return {m: CaptionEmbedder(preset, m) for m in ("image", "audio", "video")}


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_each_modality_gives_the_seed_shape_and_distinct_captions_differ(
    modality: str, embedders: dict[str, CaptionEmbedder]
) -> None:
    out = embedders[modality].encode(["a red circle", "a high tone", "a red circle"])
    assert out.shape == (3, *SHAPES[modality]) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert not np.allclose(out[0], out[1]) and np.allclose(out[0], out[2])
    if modality == "audio":  # AudioLDM's CLAP text_embeds are L2-normalised
        np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)


def test_batches_give_the_same_embeddings_as_one_call(
    embedders: dict[str, CaptionEmbedder], tmp_path: Path
) -> None:
    captions = write_lines(
        tmp_path / "caps.jsonl",
        *(
            json.dumps({"caption": f"a {c} square", "name": f"s{i}"})
            for i, c in enumerate(["red", "blue", "green"])
        ),
    )
    embedder = embedders["image"]
    report = embed_captions(embedder, read_captions(captions), tmp_path / "out", batch_size=2)
    assert (report.count, report.shape) == (3, (77, 32))
    rows = [json.loads(line) for line in report.dataset.read_text().splitlines()]
    assert rows[0] == {
        "id": "s0",
        "caption": "a red square",
        "output_modality": "image",
        "embedding": "s0.npy",
    }
    whole = embedder.encode(["a red square", "a blue square", "a green square"])
    for i, row in enumerate(rows):
        np.testing.assert_allclose(
            np.load(tmp_path / "out" / row["embedding"]), whole[i], rtol=1e-5, atol=1e-6
        )


def test_stored_audio_is_width_only_and_loads_as_one_row(
    embedders: dict[str, CaptionEmbedder], tmp_path: Path
) -> None:
    assert file_shape("audio", (1, 16)) == (16,) and file_shape("image", (77, 32)) == (77, 32)
    captions = write_lines(tmp_path / "c.jsonl", json.dumps({"caption": "a low tone", "audio": "x/low.wav"}))
    report = embed_captions(embedders["audio"], read_captions(captions), tmp_path / "o")
    assert np.load(tmp_path / "o" / "low.wav.npy").shape == (16,)  # NExT-GPT's <media name>.npy
    assert report.count == 1
    assert load_caption_embedding(tmp_path / "o" / "low.wav.npy", "audio", (1, 16)).shape == (1, 16)


def test_a_modality_the_preset_cannot_produce_is_refused(tmp_path: Path) -> None:
    tiny = load_preset("tiny", cache_dir=tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"preset tiny produces text only, got 'image'"):
        CaptionEmbedder(tiny, "image")


def test_a_decoder_of_other_conditioning_than_the_preset_is_refused(preset: Preset) -> None:
    image = preset.outputs["image"]
    other = preset.model_copy(
        update={"outputs": {"image": image.model_copy(update={"conditioning": (77, 64)})}}
    )
    with pytest.raises(FailedPreconditionError, match=r"conditioning \(77, 32\), expected \(77, 64\)"):
        CaptionEmbedder(other, "image")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"caption": "a"}', '{"caption": "b"'], r"line 2: not valid JSON"),
        (['{"caption": "a"}', "", '{"caption": "  "}'], r"line 3: expected a non-empty 'caption' string"),
        (['{"name": "x"}'], r"line 1: expected a non-empty 'caption' string, got None"),
        (['{"caption": "a"}', '["a"]'], r"line 2: expected a JSON object, got list"),
        (
            ['{"caption": "a", "name": "x"}', '{"caption": "b", "name": "x"}'],
            r"line 2: name 'x' repeats line 1",
        ),
        (['{"caption": "a", "name": "../x"}'], r"line 1: name '../x': expected letters"),
    ],
)
def test_bad_caption_files_name_the_line(lines: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        read_captions(write_lines(tmp_path / "c.jsonl", *lines))


def test_a_missing_caption_file_and_empty_captions_are_refused(
    embedders: dict[str, CaptionEmbedder], tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgumentError, match=r"no such file"):
        read_captions(tmp_path / "absent.jsonl")
    with pytest.raises(InvalidArgumentError, match=r"captions\[1\]: expected non-empty text"):
        embedders["image"].encode(["a", " "])


def test_a_json_list_is_read_and_names_come_from_the_line_without_one(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"caption": "a  red\ncircle"}, {"caption": "b", "id": 7}]))
    records = read_captions(path)
    assert [(r.line, r.name, r.caption) for r in records] == [(1, "000001", "a red circle"), (2, "7", "b")]


def test_stored_embeddings_are_checked_against_the_conditioning(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((77, 31), dtype=np.float32))
    with pytest.raises(
        InvalidArgumentError,
        match=r"bad.npy: expected shape \(77, 32\) \(the image decoder's conditioning\), got \(77, 31\)",
    ):
        load_caption_embedding(tmp_path / "bad.npy", "image", (77, 32))
    np.save(tmp_path / "nan.npy", np.full((1, 16), np.nan, dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match=r"NaN or infinity"):
        load_caption_embedding(tmp_path / "nan.npy", "audio", (1, 16))
    with pytest.raises(InvalidArgumentError, match=r"absent.npy: no such file"):
        load_caption_embedding(tmp_path / "absent.npy", "audio", (1, 16))
