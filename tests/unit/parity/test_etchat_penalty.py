"""The repetition penalty against E.T. Chat's own processor and Hugging Face's, on the figures
scripts/parity/etchat_penalty.py had them produce (tests/fixtures/parity/etchat/penalty.*).

E.T. Chat mode: the prompt's media placeholder (-200 in the seed) is expanded to a span of
placeholder ids, whose positions are skipped, and the match token <vid> is a skipped id; the
placeholder id also occurs as text, which both penalise. Hugging Face mode: nothing skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.llm.sampling import Penalties, SamplingParams, apply_penalties

FIXTURE = Path(__file__).parents[2] / "fixtures" / "parity" / "etchat"
META = json.loads((FIXTURE / "penalty.json").read_text())
TENSORS = load_file(str(FIXTURE / "penalty.safetensors"))
PLACEHOLDER, SPAN = 3, 4  # our expanded media: 4 positions of id 3 (an id the text uses too)


def ours(
    prompt: list[int],
    reply: list[int],
    penalty: float,
    logits: torch.Tensor,
    skip_spans: list[tuple[int, int]] | None = None,
    skip_ids: list[int] | None = None,
) -> torch.Tensor:
    params = SamplingParams(repetition_penalty=penalty)
    memory = Penalties(params, META["vocab"], prompt, skip_spans=skip_spans or (), skip_ids=skip_ids or ())
    for token in reply:
        memory.add(token)
    return apply_penalties(logits[None], [memory])[0]


@pytest.mark.parametrize("i", range(len(META["cases"])))
def test_skipping_media_positions_and_vid_equals_etchats_processor(i: int) -> None:
    case, media = META["cases"][i], META["media_token_id"]
    ids = TENSORS[f"case{i}.ids"].tolist()
    prompt, reply = ids[: case["prompt_len"]], ids[case["prompt_len"] :]
    expanded, spans = [], []
    for token in prompt:
        if token == media:
            spans.append((len(expanded), SPAN))
            expanded += [PLACEHOLDER] * SPAN
        else:
            expanded.append(token)
    assert spans and media not in reply
    got = ours(
        expanded,
        reply,
        case["penalty"],
        TENSORS[f"case{i}.logits"],
        skip_spans=spans,
        skip_ids=[META["match_token_id"]],
    )
    assert (got - TENSORS[f"case{i}.etchat"]).abs().max() <= 1e-5


@pytest.mark.parametrize("i", range(len(META["cases"])))
def test_without_skips_it_equals_hugging_faces_processor(i: int) -> None:
    case = META["cases"][i]
    ids = TENSORS[f"case{i}.hf_ids"].tolist()
    prompt_len = case["prompt_len"] - 1  # each case's prompt holds one media placeholder, gone here
    got = ours(ids[:prompt_len], ids[prompt_len:], case["penalty"], TENSORS[f"case{i}.logits"])
    assert (got - TENSORS[f"case{i}.hf"]).abs().max() <= 1e-5


def test_the_two_processors_differ_where_vid_is_penalised() -> None:
    """The fixture tells the modes apart: Hugging Face's penalises <vid>, E.T. Chat's does not."""
    differs = [
        not torch.equal(TENSORS[f"case{i}.etchat"], TENSORS[f"case{i}.hf"]) for i in range(len(META["cases"]))
    ]
    assert differs == [
        META["match_token_id"] in TENSORS[f"case{i}.ids"].tolist() for i in range(len(differs))
    ]
