"""Label masking for the prefix-style and phi3 templates: training's prompt part of each round
is what serving's PromptBuilder builds, and only each reply plus its end-of-turn marker is
supervised. (vicuna_v1 and plain are covered in test_datasets.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.content import MediaPart, TextPart, Turn
from services.common.presets import Preset
from services.models.prompt.builder import MediaSlot, ModalitySlots, PromptBuilder, placeholder_token_id
from services.models.prompt.templates import MediaRef, Template, get_template, merge_text
from services.trainer.datasets import (
    IGNORE_INDEX,
    BadSampleError,
    MediaFile,
    MediaSlots,
    Sample,
    SupervisedEncoder,
    render_supervised,
)

TOKENS = {"image": 16, "video": 8}  # LLM tokens per item in these tests
PLACEHOLDERS = {"image": "<image>", "video": "<video>"}

# (template, modality of the media item, end-of-turn marker supervised after each reply)
CASES = [("vicuna_v0", "image", "\n###"), ("videochat", "video", "###"), ("phi3", "image", "<|end|>")]
# Texts between the generation prompt and the reply (the rest of the assistant prefix).
LEAD = {"vicuna_v0": " ", "videochat": " ", "phi3": ""}


@pytest.fixture(scope="module")
def tokenizer(tiny_preset: Preset) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_preset.llm.checkpoint)


def tok(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(*parts: Any) -> Turn:
    return Turn("user", tuple(TextPart(p) if isinstance(p, str) else MediaPart(p) for p in parts))


def assistant(text: str) -> Turn:
    return Turn("assistant", (TextPart(text),))


def conversation(modality: str = "image", path: str = "0.bin") -> tuple[Turn, ...]:
    """Two rounds, the first question about one media file."""
    item = MediaFile(modality, Path(path))
    return (
        user(item, "What is this?"),
        assistant("A red circle."),
        user("And its color?"),
        assistant("Red."),
    )


def encoder(tokenizer: Any, template: Template) -> SupervisedEncoder:
    slots = {
        m: MediaSlots(p, placeholder_token_id(tokenizer, p), TOKENS[m], max_per_prompt=4)
        for m, p in PLACEHOLDERS.items()
    }
    return SupervisedEncoder(tokenizer, template, slots, max_length=1024)


def serving(tokenizer: Any) -> PromptBuilder:
    slots = {
        m: ModalitySlots(p, placeholder_token_id(tokenizer, p), 4, lambda n: n)
        for m, p in PLACEHOLDERS.items()
    }
    return PromptBuilder(tokenizer, slots, max_context_tokens=1024)


@pytest.mark.parametrize(("name", "modality", "end"), CASES)
def test_each_rounds_prompt_matches_serving_and_only_replies_are_supervised(
    tokenizer: Any, name: str, modality: str, end: str
) -> None:
    template = get_template(name)
    turns = conversation(modality)
    sample = Sample("s", turns)
    encoded = encoder(tokenizer, template).encode(sample)
    builder, media = serving(tokenizer), [MediaSlot(turns[0].parts[0], TOKENS[modality])]
    replies = [tok(tokenizer, LEAD[name] + "A red circle." + end), tok(tokenizer, LEAD[name] + "Red." + end)]
    for round_, n_turns in enumerate((1, 3)):
        segments = template.render(turns[:n_turns])
        prompt = builder.build(segments, media, bos=template.bos)
        n = len(prompt.input_ids)
        # Everything up to this round's reply is what serving feeds for its question, with
        # only the earlier replies supervised ...
        assert encoded.input_ids[:n] == prompt.input_ids
        assert [t for t in encoded.labels[:n] if t != IGNORE_INDEX] == [
            t for r in replies[:round_] for t in r
        ]
        # ... and the reply with its end-of-turn marker follows, supervised.
        reply = replies[round_]
        assert encoded.input_ids[n : n + len(reply)] == reply
        assert encoded.labels[n : n + len(reply)] == reply
    assert encoded.media_spans == prompt.media_spans
    assert [t for t in encoded.labels if t != IGNORE_INDEX] == replies[0] + replies[1]
    assert len(encoded.input_ids) == n + len(replies[1])
    assert encoded.input_ids.count(tokenizer.bos_token_id) == (1 if template.bos else 0)  # phi3: none


@pytest.mark.parametrize(("name", "modality", "end"), CASES)
def test_training_text_is_the_full_serving_rendering(name: str, modality: str, end: str) -> None:
    template = get_template(name)
    turns = conversation(modality)
    pieces = render_supervised(template, turns)
    full = template.render(turns, add_generation_prompt=False)
    assert merge_text([seg for seg, _ in pieces]) == full
    assert [seg for seg, supervised in pieces if supervised] == [
        LEAD[name] + "A red circle." + end,
        LEAD[name] + "Red." + end,
    ]


def test_vicuna_v0_pieces() -> None:
    turns = conversation("image")
    pieces = render_supervised(get_template("vicuna_v0"), turns)
    assert pieces == [
        ("### Human: <Img>", False),
        (MediaRef(turns[0].parts[0]), False),
        ("</Img> What is this?\n### Assistant:", False),
        (" A red circle.\n###", True),
        (" Human: And its color?\n### Assistant:", False),
        (" Red.\n###", True),
    ]


def test_videochat_pieces() -> None:
    turns = conversation("video")
    pieces = render_supervised(get_template("videochat"), turns)
    assert pieces == [
        ("###Human: <Video>", False),
        (MediaRef(turns[0].parts[0]), False),
        ("</Video>\n###Human: What is this?\n###Assistant:", False),
        (" A red circle.###", True),
        ("Human: And its color?\n###Assistant:", False),
        (" Red.###", True),
    ]


def test_phi3_pieces() -> None:
    turns = conversation("image")
    pieces = render_supervised(get_template("phi3"), turns)
    assert pieces == [
        ("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n", False),
        (MediaRef(turns[0].parts[0]), False),
        ("\nWhat is this?<|end|>\n<|assistant|>\n", False),
        ("A red circle.<|end|>", True),
        ("\n<|user|>\nAnd its color?<|end|>\n<|assistant|>\n", False),
        ("Red.<|end|>", True),
    ]


def test_a_modality_the_template_cannot_wrap_is_a_bad_sample(tokenizer: Any) -> None:
    sample = Sample("s", conversation("audio", "0.wav"))
    with pytest.raises(BadSampleError) as e:
        encoder(tokenizer, get_template("videochat")).encode(sample)
    assert e.value.reason == "unknown_modality"
    assert "got 'audio'" in e.value.message
