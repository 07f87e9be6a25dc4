"""Trainer datasets: both formats, skip-and-count of bad samples, dataset-level errors, label
masking with prompt parity against serving's PromptBuilder, and collation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from services.common.content import MediaPart, TextPart, Turn
from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.models.prompt.builder import MediaSlot, ModalitySlots, PromptBuilder, placeholder_token_id
from services.models.prompt.templates import MediaRef, get_template
from services.trainer.datasets import (
    IGNORE_INDEX,
    BadSampleError,
    DatasetSpec,
    EncodedSample,
    MediaFile,
    Sample,
    SupervisedEncoder,
    collate,
    load_samples,
    load_supervised,
    modality_slots,
    render_supervised,
    sniff,
)

VICUNA = get_template("vicuna_v1")
PLAIN = get_template("plain")


@pytest.fixture(scope="module")
def tokenizer(tiny_preset: Preset) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_preset.llm.checkpoint)


@pytest.fixture(scope="module")
def encoder(tiny_preset: Preset, tokenizer: Any) -> SupervisedEncoder:
    return SupervisedEncoder(tokenizer, VICUNA, modality_slots(tiny_preset, tokenizer), max_length=1024)


def tok(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def media(folder: Path, name: str = "a.png", data: bytes = b"\x89PNG fake") -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def write(folder: Path, records: Any, name: str = "data.json", *, jsonl: bool = False) -> Path:
    path = folder / name
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def qa(
    question: str = "<image>\nWhat is this?", answer: str = "A red circle.", **extra: Any
) -> dict[str, Any]:
    convs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": convs, **extra}


def llava(path: Path, **kw: Any) -> tuple[list[Sample], Any]:
    return load_samples(DatasetSpec(format="llava", path=path), **kw)


# Formats -------------------------------------------------------------------------------------


def test_llava_json_sample(tmp_path: Path) -> None:
    image = media(tmp_path, "img/a.png")
    path = write(tmp_path, [qa(id="s1", image=image), qa("Hello there", "Hi.")])
    samples, report = llava(path)
    assert (report.total, report.kept, report.bad) == (2, 2, 0)
    first, second = samples
    assert first.id == "s1"
    assert first.media == (MediaFile("image", tmp_path / "img/a.png"),)
    assert first.turns == (
        Turn("user", (MediaPart(MediaFile("image", tmp_path / "img/a.png")), TextPart("What is this?"))),
        Turn("assistant", (TextPart("A red circle."),)),
    )
    assert second.id == "1"  # no id: the index
    assert second.media == ()


def test_llava_image_list_placeholders_where_they_stand(tmp_path: Path) -> None:
    a, b = media(tmp_path, "a.png"), media(tmp_path, "b.png")
    path = write(tmp_path, [qa("Compare <image> and\n<image>", "Same.", image=[a, b])])
    [sample], _ = llava(path)
    a_part, b_part = (MediaPart(MediaFile("image", tmp_path / n)) for n in ("a.png", "b.png"))
    assert sample.turns[0].parts == (TextPart("Compare"), a_part, TextPart("and"), b_part)
    assert [m.path.name for m in sample.media] == ["a.png", "b.png"]


def test_llava_without_placeholder_puts_media_first(tmp_path: Path) -> None:
    a, b = media(tmp_path, "a.png"), media(tmp_path, "b.png")
    path = write(tmp_path, [qa("What is this?", "A dog.", image=[a, b])])
    [sample], _ = llava(path)
    a_part, b_part = (MediaPart(MediaFile("image", tmp_path / n)) for n in ("a.png", "b.png"))
    assert sample.turns[0].parts == (a_part, b_part, TextPart("What is this?"))


def test_llava_roles_user_assistant_and_system(tmp_path: Path) -> None:
    convs = [
        {"from": "system", "value": "Be short."},
        {"from": "user", "value": "<image>\nColor?"},
        {"from": "assistant", "value": "Red."},
        {"from": "Human", "value": "Shape?"},
        {"from": "GPT", "value": "Circle."},
    ]
    path = write(tmp_path, [{"image": media(tmp_path), "conversations": convs}])
    [sample], _ = llava(path)
    assert [t.role for t in sample.turns] == ["system", "user", "assistant", "user", "assistant"]


def test_jsonl_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, [qa(image=media(tmp_path)), qa("Hi", "Hello.")], "d.jsonl", jsonl=True)
    path.write_text(path.read_text().replace("\n", "\n\n"))
    samples, report = llava(path)
    assert (report.total, len(samples)) == (2, 2)


def test_single_line_jsonl_is_one_sample(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(qa("Hi", "Hello.")))
    assert len(llava(path)[0]) == 1


def test_media_root_and_absolute_paths(tmp_path: Path) -> None:
    root = tmp_path / "media"
    elsewhere = tmp_path / "elsewhere"
    absolute = str(elsewhere / media(elsewhere, "abs.png"))
    path = write(tmp_path, [qa(image=media(root, "x/r.png")), qa(image=absolute)])
    samples, _ = load_samples(DatasetSpec(format="llava", path=path, media_root=root))
    assert [s.media[0].path for s in samples] == [root / "x/r.png", Path(absolute)]


def test_captions_with_image_or_media_key(tmp_path: Path) -> None:
    records = [
        {"image": media(tmp_path, "a.png"), "caption": " a red circle "},
        {"media": media(tmp_path, "b.png"), "caption": "a blue square"},
    ]
    path = write(tmp_path, records, "c.jsonl", jsonl=True)
    samples, report = load_samples(DatasetSpec(format="captions", path=path))
    assert report.bad == 0
    assert samples[0].turns == (
        Turn("user", (MediaPart(MediaFile("image", tmp_path / "a.png")),)),
        Turn("assistant", (TextPart("a red circle"),)),
    )
    assert samples[1].media == (MediaFile("image", tmp_path / "b.png"),)


def test_spec_forbids_unknown_fields(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        DatasetSpec.model_validate({"format": "llava", "path": "x.json", "root": "y"})
    with pytest.raises(ValidationError):
        DatasetSpec.model_validate({"format": "csv", "path": "x.json"})
    assert DatasetSpec(format="llava", path=tmp_path / "d.json").root == tmp_path


# Bad samples ---------------------------------------------------------------------------------


def _human(value: Any) -> dict[str, Any]:
    return {"from": "human", "value": value}


def _gpt(value: Any) -> dict[str, Any]:
    return {"from": "gpt", "value": value}


LLAVA_BAD: list[tuple[str, Any, str]] = [
    ("media_missing", qa(image="nope.png"), "expected a file, found nothing"),
    ("media_missing", qa(image="adir"), "found a directory"),
    ("media_empty", qa(image="empty.png"), "empty file"),
    ("no_assistant", {"conversations": [_human("Hi")]}, "at least one assistant turn"),
    ("roles", {"conversations": [_gpt("Hi"), _human("Yo")]}, "expected 'user', got 'assistant'"),
    ("roles", {"conversations": [_human("a"), _human("b"), _gpt("c")]}, "expected 'assistant'"),
    ("roles", {"conversations": [_human("a"), _gpt("b"), _human("c")]}, "last turn"),
    ("roles", {"conversations": [{"from": "bot", "value": "x"}, _gpt("y")]}, "'bot'"),
    ("empty_text", qa("Hi", "   "), "assistant message is empty"),
    ("empty_text", qa("", "Hi."), "user message is empty"),
    ("placeholder_count", qa("<image> <image>", "x", image="a.png"), "expected 1 '<image>'"),
    ("placeholder_count", qa("<image> what?", "x"), "expected 0 '<image>'"),
    ("too_many_media", qa("x", "y", image=["a.png"] * 5), "at most 4 image items, got 5"),
    ("bad_field", {"conversations": 3}, "expected a list of messages, got an integer"),
    ("bad_field", qa(image=7), "expected a path or a list of paths"),
    ("bad_field", {"conversations": [_human(["x"]), _gpt("y")]}, "value: expected a string, got a list"),
    ("bad_field", qa(image="a.png", media="a.png"), "got several: ['image', 'media']"),
    ("missing_field", {"image": "a.png"}, "conversations: expected a list"),
    ("reserved_placeholder", qa("Hi", "see <image>"), "contains '<image>'"),
    ("not_object", ["not", "an", "object"], "expected a JSON object, got a list"),
]


@pytest.mark.parametrize(("reason", "record", "message"), LLAVA_BAD)
def test_llava_bad_sample_is_counted(
    tmp_path: Path, reason: str, record: Any, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    media(tmp_path, "a.png")
    media(tmp_path, "empty.png", b"")
    (tmp_path / "adir").mkdir()
    path = write(
        tmp_path,
        [qa(id="good", image="a.png"), record if not isinstance(record, dict) else {"id": "x7", **record}],
    )
    with caplog.at_level(logging.WARNING, logger="services.trainer.datasets"):
        samples, report = llava(path, max_bad_ratio=0.5)
    assert [s.id for s in samples] == ["good"]
    assert (report.total, report.kept, report.bad) == (2, 1, 1)
    assert report.reasons == {reason: 1}
    [example] = report.examples
    assert example.startswith("data.json[1]")
    assert message in example
    assert reason in caplog.text and "data.json[1]" in caplog.text


CAPTION_BAD: list[tuple[str, Any]] = [
    ("missing_field", {"image": "a.png"}),
    ("missing_field", {"caption": "x"}),
    ("bad_field", {"image": "a.png", "caption": 3}),
    ("bad_field", {"image": ["a.png", "a.png"], "caption": "x"}),
    ("empty_text", {"image": "a.png", "caption": " "}),
    ("reserved_placeholder", {"image": "a.png", "caption": "<image> x"}),
    ("media_missing", {"image": "b.png", "caption": "x"}),
]


@pytest.mark.parametrize(("reason", "record"), CAPTION_BAD)
def test_caption_bad_sample_is_counted(tmp_path: Path, reason: str, record: Any) -> None:
    media(tmp_path, "a.png")
    path = write(tmp_path, [{"image": "a.png", "caption": "ok"}, record])
    samples, report = load_samples(DatasetSpec(format="captions", path=path), max_bad_ratio=0.5)
    assert (len(samples), dict(report.reasons)) == (1, {reason: 1})


def test_jsonl_bad_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(qa("Hi", "Yo.", id="ok")) + '\n{"id": 1,\n[1, 2]\n')
    samples, report = llava(path, max_bad_ratio=1.0)
    assert len(samples) == 1
    assert report.reasons == {"invalid_json": 1, "not_object": 1}
    assert "line 2: not valid JSON" in report.examples[0]


def test_unreadable_media_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Faked: the tests may run as root, which reads any file.
    monkeypatch.setattr("services.trainer._samples.os.access", lambda path, mode: False)
    path = write(tmp_path, [qa("Hi", "Yo."), qa(image=media(tmp_path))])
    _, report = llava(path, max_bad_ratio=1.0)
    assert report.reasons == {"media_unreadable": 1}
    assert "not readable (permission denied)" in report.examples[0]


def test_bad_ratio_over_the_limit_raises_with_counts_and_examples(tmp_path: Path) -> None:
    records = [qa("Hi", "Yo.")] * 8 + [qa(image="gone.png", id="g1"), qa("Hi", "")]
    path = write(tmp_path, records)
    with pytest.raises(InvalidArgumentError) as e:
        llava(path)
    msg = e.value.message
    assert "2 of 10 samples are bad (20.0%)" in msg
    assert "expected at most 5.0% (max_bad_ratio)" in msg
    assert "media_missing 1" in msg and "empty_text 1" in msg
    assert "data.json[8] (g1): media[0]:" in msg


def test_bad_ratio_at_the_limit_passes(tmp_path: Path) -> None:
    path = write(tmp_path, [qa("Hi", "Yo.")] * 19 + [qa("Hi", "")])
    samples, report = llava(path)
    assert (len(samples), report.bad_ratio) == (19, 0.05)
    assert "kept 19 of 20 samples; bad by reason: empty_text 1" in report.summary()


def test_all_bad_raises_even_when_tolerated(tmp_path: Path) -> None:
    path = write(tmp_path, [qa("Hi", "")])
    with pytest.raises(InvalidArgumentError, match=r"1 of 1 samples are bad .*none is usable"):
        llava(path, max_bad_ratio=1.0)


# Dataset-level errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "expected a JSON list of samples or JSONL (one object per line), got an empty file"),
        ("  \n ", "got an empty file"),
        ("[]", "got no samples"),
        (
            '[\n {"a": 1},\n {"b": 2} {\n]',
            "not valid JSON (line 3 column 11: Expecting ',' delimiter); expected a JSON list",
        ),
        ('"just a string"', "got a JSON string instead of a list"),
        ("42", "got a JSON int instead of a list"),
        ("id,image\n1,a.png", "not valid JSON (line 1 column 1"),
        ('{\n "data": []\n}', "got one JSON object spanning several lines (keys 'data')"),
    ],
)
def test_dataset_level_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError) as e:
        llava(path)
    assert e.value.message.startswith(f"dataset {path}: ")
    assert message in e.value.message


def test_missing_file_directory_and_bad_utf8(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"nope\.json: expected a file, found nothing"):
        llava(tmp_path / "nope.json")
    with pytest.raises(InvalidArgumentError, match="found a directory"):
        llava(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"[\xff]")
    with pytest.raises(InvalidArgumentError, match="expected UTF-8 text, got byte 0xff at offset 1"):
        llava(tmp_path / "bin.json")


def test_max_bad_ratio_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"max_bad_ratio: expected a value in \[0, 1\]"):
        llava(write(tmp_path, [qa("a", "b")]), max_bad_ratio=1.5)


def test_sniff(tmp_path: Path) -> None:
    good = write(tmp_path, [qa("a", "b")])
    sniff(DatasetSpec(format="llava", path=good))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('\ufeff  {"a": 1}\n')
    sniff(DatasetSpec(format="llava", path=jsonl))
    cases = {
        tmp_path / "missing.json": "expected a file, found nothing",
        tmp_path: "expected a file, found a directory",
        tmp_path / "empty.json": "got an empty file",
        tmp_path / "csv.json": "got text starting with 'i'",
    }
    (tmp_path / "empty.json").write_text(" \n")
    (tmp_path / "csv.json").write_text("id,image\n")
    for path, message in cases.items():
        with pytest.raises(InvalidArgumentError, match=message):
            sniff(DatasetSpec(format="llava", path=path))
    with pytest.raises(InvalidArgumentError, match=r"media_root .*: expected a directory"):
        sniff(DatasetSpec(format="llava", path=good, media_root=tmp_path / "nope"))


# Encoding and label masking ------------------------------------------------------------------


def serving_builder(tiny_preset: Preset, tokenizer: Any) -> PromptBuilder:
    """A PromptBuilder built as services.models.lm.loading builds it (connectors keep token counts)."""
    slots = {
        m: ModalitySlots(
            s.placeholder, placeholder_token_id(tokenizer, s.placeholder), s.max_per_prompt, lambda n: n
        )
        for m, s in tiny_preset.modalities.items()
    }
    return PromptBuilder(tokenizer, slots, max_context_tokens=tiny_preset.llm.max_context_tokens)


def sample(*turns: Turn) -> Sample:
    return Sample("s", tuple(turns))


def image(i: int) -> MediaPart[MediaFile]:
    """A new part holding the image file "<i>.png"."""
    return MediaPart(MediaFile("image", Path(f"{i}.png")))


def user(*parts: str | int | MediaPart[MediaFile]) -> Turn:
    """A user turn: a string is text, a number i a new part of the image "<i>.png"."""
    return Turn(
        "user",
        tuple(TextPart(p) if isinstance(p, str) else image(p) if isinstance(p, int) else p for p in parts),
    )


def assistant(text: str) -> Turn:
    return Turn("assistant", (TextPart(text),))


def supervised(encoded: EncodedSample) -> list[int]:
    return [t for t in encoded.labels if t != IGNORE_INDEX]


def test_one_turn_prompt_matches_serving_and_only_the_reply_is_supervised(
    tiny_preset: Preset, tokenizer: Any, encoder: SupervisedEncoder
) -> None:
    question = user(0, "What is this?")
    encoded = encoder.encode(sample(question, assistant("A red circle.")))
    prompt = serving_builder(tiny_preset, tokenizer).build(
        VICUNA.render([question]), [MediaSlot(question.parts[0], 16)]
    )
    n = len(prompt.input_ids)
    assert encoded.input_ids[:n] == prompt.input_ids
    assert encoded.media_spans == prompt.media_spans == [(32, 16)]
    reply = tok(tokenizer, " A red circle.</s>")
    assert reply[-1] == tokenizer.eos_token_id
    assert encoded.input_ids[n:] == reply
    assert encoded.labels == [IGNORE_INDEX] * n + reply
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_multi_turn_supervises_each_reply_and_prefixes_match_serving(
    tiny_preset: Preset, tokenizer: Any, encoder: SupervisedEncoder
) -> None:
    turns = [user(0, "Color?"), assistant("Red."), user("Shape?"), assistant("A circle.")]
    encoded = encoder.encode(sample(*turns))
    assert supervised(encoded) == tok(tokenizer, " Red.</s>") + tok(tokenizer, " A circle.</s>")
    builder = serving_builder(tiny_preset, tokenizer)
    second = builder.build(VICUNA.render(turns[:3]), [MediaSlot(turns[0].parts[0], 16)]).input_ids
    # Everything up to the second reply is what serving feeds for the second question.
    assert encoded.input_ids[: len(second)] == second
    first_reply = tok(tokenizer, " Red.</s>")
    masked = [i for i, label in enumerate(encoded.labels[: len(second)]) if label != IGNORE_INDEX]
    assert [encoded.input_ids[i] for i in masked] == first_reply  # only the first reply before it
    assert encoded.labels[len(second) :] == encoded.input_ids[len(second) :]


def test_plain_template_for_captions(tiny_preset: Preset, tokenizer: Any) -> None:
    plain = SupervisedEncoder(tokenizer, PLAIN, modality_slots(tiny_preset, tokenizer), max_length=64)
    question = user(0)
    encoded = plain.encode(sample(question, assistant("a red circle")))
    caption = tok(tokenizer, "a red circle\n")
    assert encoded.input_ids == [tokenizer.bos_token_id, *[4] * 16, *caption]
    assert encoded.labels == [IGNORE_INDEX] * 17 + caption
    prompt = serving_builder(tiny_preset, tokenizer).build(
        PLAIN.render([question]), [MediaSlot(question.parts[0], 16)]
    )
    assert encoded.input_ids[:17] == prompt.input_ids


def test_system_turn_replaces_the_template_system() -> None:
    pieces = render_supervised(
        VICUNA, [Turn("system", (TextPart("Be brief."),)), user("Hi"), assistant("Yo")]
    )
    assert pieces == [("Be brief. USER: Hi ASSISTANT:", False), (" Yo</s>", True)]
    turns = [user(0, "Hi"), assistant("Yo")]
    pieces = render_supervised(VICUNA, turns)
    assert pieces[1] == (MediaRef(turns[0].parts[0]), False)
    assert pieces[2] == ("\nHi ASSISTANT:", False)


def test_render_refuses_bad_conversations_and_templates() -> None:
    with pytest.raises(InvalidArgumentError, match="expected the last turn to be 'assistant'"):
        render_supervised(VICUNA, [user("Hi")])
    with pytest.raises(InvalidArgumentError, match="expected 'user'"):
        render_supervised(VICUNA, [assistant("Hi")])
    odd = VICUNA.__class__(**{**VICUNA.__dict__, "generation_prompt": "BOT:"})
    with pytest.raises(InvalidArgumentError, match="to start with the generation prompt 'BOT:'"):
        render_supervised(odd, [user("Hi"), assistant("Yo")])


SAME = image(0)  # one part written twice: one item referenced twice


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ((user("look <image>"), assistant("x")), "reserved_placeholder"),
        ((user(SAME, "x", SAME), assistant("y")), "placeholder_count"),
        ((user(SAME), assistant("y"), user(SAME), assistant("z")), "placeholder_count"),
        ((user("x"), Turn("assistant", (image(0),))), "roles"),
        ((assistant("y"),), "roles"),
    ],
)
def test_encode_refusals(encoder: SupervisedEncoder, turns: tuple[Turn, ...], reason: str) -> None:
    with pytest.raises(BadSampleError) as e:
        encoder.encode(sample(*turns))
    assert e.value.reason == reason


def test_the_same_file_in_two_parts_is_two_items(encoder: SupervisedEncoder) -> None:
    encoded = encoder.encode(sample(user(0, 0, "x"), assistant("y")))
    assert [m.path.name for m in encoded.media] == ["0.png", "0.png"] and len(set(encoded.media_spans)) == 2


def test_unknown_modality_is_refused(encoder: SupervisedEncoder) -> None:
    bad = Sample("s", (user(MediaPart(MediaFile("audio", Path("a.wav")))), assistant("x")))
    with pytest.raises(BadSampleError) as e:
        encoder.encode(bad)
    assert e.value.reason == "unknown_modality"


def test_too_long_is_a_bad_sample(tmp_path: Path, tiny_preset: Preset, tokenizer: Any) -> None:
    short = SupervisedEncoder(tokenizer, VICUNA, modality_slots(tiny_preset, tokenizer), max_length=60)
    with pytest.raises(BadSampleError, match=r"expected at most 60 tokens, got \d+") as e:
        short.encode(sample(user(0, "What is this?"), assistant("A red circle.")))
    assert e.value.reason == "too_long"
    path = write(tmp_path, [qa("Hi", "Yo.")] * 3 + [qa(image=media(tmp_path))])
    dataset = load_supervised(DatasetSpec(format="llava", path=path), short, max_bad_ratio=0.5)
    assert (len(dataset), dict(dataset.report.reasons)) == (3, {"too_long": 1})
    assert "expected at most 60 tokens" in dataset.report.examples[0]


def test_load_supervised(tmp_path: Path, encoder: SupervisedEncoder) -> None:
    path = write(tmp_path, [qa(image=media(tmp_path), id="a"), qa("Hi", "Yo.", id="b")])
    dataset = load_supervised(DatasetSpec(format="llava", path=path), encoder)
    assert len(dataset) == 2 and [s.id for s in dataset.samples] == ["a", "b"]
    assert dataset[0].media == [MediaFile("image", tmp_path / "a.png")]
    assert dataset[0].media_spans == [(32, 16)]
    with pytest.raises(InvalidArgumentError, match=r"modality: expected one of \['image'\], got 'audio'"):
        load_supervised(DatasetSpec(format="llava", path=path, modality="audio"), encoder)


def test_modality_slots(tiny_preset: Preset, tokenizer: Any) -> None:
    slots = modality_slots(tiny_preset, tokenizer)["image"]
    assert (slots.placeholder, slots.placeholder_id, slots.num_tokens, slots.max_per_prompt) == (
        "<image>",
        4,
        16,
        4,
    )
    assert modality_slots(tiny_preset, tokenizer, llm_tokens={"image": 4})["image"].num_tokens == 4


# Collation -----------------------------------------------------------------------------------


def test_collate_pads_right_and_flattens_media() -> None:
    a, b = MediaFile("image", Path("a.png")), MediaFile("image", Path("b.png"))
    batch = collate(
        [
            EncodedSample("x", [1, 4, 4, 7, 8], [-100, -100, -100, 7, 8], [(1, 2)], [a]),
            EncodedSample("y", [1, 9, 2], [-100, 9, 2], [], []),
            EncodedSample("z", [1, 4, 4, 5], [-100, -100, -100, 5], [(1, 1), (2, 1)], [a, b]),
        ],
        pad_id=3,
    )
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 4, 4, 7, 8], [1, 9, 2, 3, 3], [1, 4, 4, 5, 3]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 7, 8],
        [-100, 9, 2, -100, -100],
        [-100, -100, -100, 5, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch["media"] == [(0, 0, a, 1, 2), (2, 0, a, 1, 1), (2, 1, b, 2, 1)]
    assert batch["media"][2].file == b and batch["ids"] == ["x", "y", "z"]


def test_collate_refuses_an_empty_batch() -> None:
    with pytest.raises(InvalidArgumentError, match="expected at least one sample"):
        collate([], pad_id=0)
