"""`modalmesh embed-captions`: caption embeddings + a t2x dataset from the tiny decoders, and
bad input reported on one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modalmesh.cli import main


@pytest.fixture(scope="module")
def nextgpt_cache(tiny_cache_dir: Path) -> Path:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated

    ensure_generated(load_preset("tiny-nextgpt", cache_dir=tiny_cache_dir))
    return tiny_cache_dir


def captions(path: Path) -> Path:
    rows = [{"caption": "a red circle", "name": "red"}, {"caption": "a high tone", "name": "high"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("modality", "shape"), [("image", (77, 32)), ("audio", (16,)), ("video", (77, 48))])
def test_embed_captions_writes_embeddings_and_a_t2x_dataset(
    modality: str,
    shape: tuple[int, ...],
    nextgpt_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = [
        "embed-captions", "--preset", "tiny-nextgpt", "--modality", modality,
        "--captions", str(captions(tmp_path / "c.jsonl")), "--out", str(out),
        "--batch-size", "1", "--cache-dir", str(nextgpt_cache),
    ]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote 2 {modality} caption embeddings {shape}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "t2x.jsonl").read_text().splitlines()]
    assert [r["output_modality"] for r in rows] == [modality, modality]
    assert [np.load(out / r["embedding"]).shape for r in rows] == [shape, shape]


def test_a_preset_without_that_output_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "embed-captions", "--preset", "tiny", "--modality", "image",
        "--captions", str(captions(tmp_path / "c.jsonl")), "--out", str(tmp_path / "o"),
        "--cache-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 2
    assert "preset tiny produces text only, got 'image'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_bad_caption_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"caption": "a red circle"}\n{"caption": ""}\n')
    argv = [
        "embed-captions", "--preset", "tiny-nextgpt", "--modality", "audio",
        "--captions", str(bad), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"captions {bad} line 2: expected a non-empty 'caption' string" in err
    missing = [*argv[:6], str(tmp_path / "absent.jsonl"), *argv[7:]]
    assert main(missing) == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err


def test_an_unknown_modality_is_refused_by_the_parser(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "embed-captions",
                "--preset",
                "tiny-nextgpt",
                "--modality",
                "smell",
                "--captions",
                "c",
                "--out",
                "o",
            ]
        )
    assert info.value.code == 2
