"""Text-to-X records (stage 2): the seed's sequence through the preset's template, the reply
and its signal tokens supervised, the caption embedding attached, bad records counted by reason;
and the synthetic t2x set that feeds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from services.common.errors import InvalidArgumentError
from services.trainer._supervised import IGNORE_INDEX, SupervisedEncoder, modality_slots
from services.trainer._t2x import load_t2x
from services.trainer.dataspec import DatasetSpec


@pytest.fixture(scope="module")
def nextgpt(tiny_cache_dir: Path) -> Any:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated

    preset = load_preset("tiny-nextgpt", cache_dir=tiny_cache_dir)
    ensure_generated(preset)
    return preset


@pytest.fixture(scope="module")
def synth(nextgpt: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.trainer.synth import synthesize

    out = tmp_path_factory.mktemp("t2x")
    synthesize(out, train=4, heldout=1, seed=2, modalities=["image", "t2x"], output_preset=nextgpt)
    return out


@pytest.fixture(scope="module")
def tokenizer(nextgpt: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(nextgpt.llm.checkpoint)


def load(path: Path, preset: Any, tokenizer: Any, **kw: Any):  # -> T2XDataset
    from services.models.lm.output_projector import signal_token_ids
    from services.models.prompt.templates import get_template

    encoder = SupervisedEncoder(
        tokenizer, get_template(preset.llm.template), modality_slots(preset, tokenizer), max_length=256
    )
    ids = {m: tuple(signal_token_ids(tokenizer, s.signal_tokens)) for m, s in preset.outputs.items()}
    spec = DatasetSpec(format="t2x", path=path, **kw)
    return load_t2x(spec, encoder, dict(preset.outputs), ids, max_bad_ratio=0.05)


def test_synth_writes_every_output_modality_with_its_embeddings(synth: Path) -> None:
    rows = [json.loads(line) for line in (synth / "t2x.jsonl").read_text().splitlines()]
    assert sorted({r["output_modality"] for r in rows}) == ["audio", "image", "video"] and len(rows) == 12
    shapes = {r["output_modality"]: np.load(synth / r["embedding"]).shape for r in rows}
    assert shapes == {"image": (77, 32), "audio": (16,), "video": (77, 48)}
    meta = json.loads((synth / "meta.json").read_text())
    assert meta["t2x"]["train"] == 12 and meta["t2x"]["heldout"] == 3
    assert len((synth / "t2x_heldout.jsonl").read_text().splitlines()) == 3


def test_the_seed_sequence_is_built_with_the_reply_supervised(
    synth: Path, nextgpt: Any, tokenizer: Any
) -> None:
    data = load(synth / "t2x.jsonl", nextgpt, tokenizer)
    assert data.modalities == {"image": 4, "audio": 4, "video": 4} and data.report.bad == 0
    row = json.loads((synth / "t2x.jsonl").read_text().splitlines()[0])
    example = data.examples[0]
    text = tokenizer.decode(example.input_ids)
    caption = row["caption"]
    signals = "".join(nextgpt.outputs["image"].signal_tokens)
    assert text == f"<s>### Human: {caption}\n### Assistant: {caption}{signals}\n###"
    supervised = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(supervised) == f" {caption}{signals}\n###"
    assert example.signal is not None and example.signal.modality == "image"
    assert tuple(example.signal.target.shape) == (77, 32)
    audio = next(e for e in data.examples if e.signal is not None and e.signal.modality == "audio")
    assert tuple(audio.signal.target.shape) == (1, 16)  # type: ignore[union-attr]  # stored (16,)


def test_bad_records_are_counted_by_reason(synth: Path, nextgpt: Any, tokenizer: Any, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (synth / "t2x.jsonl").read_text().splitlines()]
    np.save(tmp_path / "wrong.npy", np.zeros((16,), dtype=np.float32))
    rows[0]["embedding"] = str(tmp_path / "wrong.npy")  # an audio-shaped embedding for an image
    rows[1]["embedding"] = "t2x/image/absent.npy"
    rows[2]["output_modality"] = "smell"
    rows[3]["caption"] = "a [IMG0] circle"
    del rows[4]["embedding"]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvalidArgumentError) as info:
        load(path, nextgpt, tokenizer, media_root=synth)
    message = info.value.message
    assert "5 of 12 samples are bad" in message
    for reason in (
        "embedding_invalid",
        "embedding_missing",
        "unknown_output_modality",
        "signal_tokens",
        "missing_field",
    ):
        assert f"{reason} 1" in message, message
    assert "expected shape (77, 32) (the image decoder's conditioning), got (16,)" in message
    assert (
        "output_modality: expected one of ['audio', 'image', 'video'] (the preset's outputs), got 'smell'"
        in message
    )


def test_instruction_records_place_the_signal_tokens_in_the_reply(
    synth: Path, nextgpt: Any, tokenizer: Any, tmp_path: Path
) -> None:
    """NExT-GPT's new code base's generation records and the legacy gpt-turn output_modality."""
    image = json.loads((synth / "t2x.jsonl").read_text().splitlines()[0])["embedding"]
    audio = next(
        json.loads(line)["embedding"]
        for line in (synth / "t2x.jsonl").read_text().splitlines()
        if '"audio"' in line
    )
    rows = [
        {
            "output_image": "x.jpg",
            "image_caption_embeddings": image,
            "conversations": [
                {"from": "human", "value": "Can you draw a red circle?"},
                {"from": "gpt", "value": "Sure thing! <image>"},
            ],
        },
        {
            "embedding": audio,
            "conversations": [
                {"from": "human", "value": "Play a high tone."},
                {"from": "gpt", "value": "Here it is.", "output_modality": "audio"},
            ],
        },
        {  # no place for the signal tokens
            "output_modality": "image",
            "embedding": image,
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    path = tmp_path / "instruct.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InvalidArgumentError, match=r"expected one <image> \(or output_modality 'image'\)"):
        load(path, nextgpt, tokenizer, media_root=synth)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    data = load(path, nextgpt, tokenizer, media_root=synth)
    assert data.modalities == {"image": 1, "audio": 1}
    img = "".join(nextgpt.outputs["image"].signal_tokens)
    aud = "".join(nextgpt.outputs["audio"].signal_tokens)
    first, second = (tokenizer.decode(e.input_ids) for e in data.examples)
    assert first == f"<s>### Human: Can you draw a red circle?\n### Assistant: Sure thing! {img}\n###"
    assert second == f"<s>### Human: Play a high tone.\n### Assistant: Here it is.{aud}\n###"
