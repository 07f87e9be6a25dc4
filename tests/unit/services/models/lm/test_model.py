"""MultimodalLM.embed: the vectorised scatter against a plain concatenation loop, and validation."""

from __future__ import annotations

import pytest
import torch

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.errors import InvalidArgumentError
from services.models.lm.loading import LoadedModel
from services.models.lm.model import MultimodalLM
from services.models.prompt.builder import MediaSlot, Prompt
from services.models.prompt.templates import MediaRef, Segment, get_template


def image(seed: int, tokens: int = 16) -> MediaFeatures:
    return MediaFeatures("image", torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed)))


def reference_embed(model: MultimodalLM, prompt: Prompt, media: list[MediaFeatures]) -> torch.Tensor:
    """LLaVA's way: embed each text chunk, then append each item's connector output, in order."""
    table = model.lm.get_input_embeddings()
    order = sorted(range(len(media)), key=lambda i: prompt.media_spans[i][0])
    chunks, cursor = [], 0
    for i in order:
        start, length = prompt.media_spans[i]
        chunks.append(table(torch.tensor(prompt.input_ids[cursor:start], dtype=torch.long)))  # (t, D)
        feats = media[i].features.unsqueeze(0)  # (1, T, D_in)
        chunks.append(model.connectors[media[i].modality](feats)[0])  # (T, D)
        cursor = start + length
    chunks.append(table(torch.tensor(prompt.input_ids[cursor:], dtype=torch.long)))
    return torch.cat(chunks).unsqueeze(0)  # (1, L, D)


VICUNA = get_template("vicuna_v1")
P = [MediaPart(image(seed)) for seed in range(3)]  # the parts of items 0, 1, 2 in the layouts
LAYOUTS: dict[str, tuple[list[Segment], int]] = {
    "no media": (VICUNA.render([Turn("user", [TextPart("Hi")])]), 0),
    "media first": ([MediaRef(P[0]), "What is it?"], 1),
    "media middle": (VICUNA.render([Turn("user", [P[0], TextPart("What is this?")])]), 1),
    "media last": (["Describe", MediaRef(P[0])], 1),
    "adjacent media": (["Compare", MediaRef(P[0]), MediaRef(P[1]), MediaRef(P[2]), "now"], 3),
    "out of order": (["a", MediaRef(P[2]), "b", MediaRef(P[0]), MediaRef(P[1])], 3),
    "multiple turns": (
        VICUNA.render(
            [
                Turn("user", [P[0], TextPart("What is this?")]),
                Turn("assistant", [TextPart("A square.")]),
                Turn("user", [TextPart("And this?"), P[1]]),
            ]
        ),
        2,
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scatter_matches_reference_loop(loaded: LoadedModel, layout: str) -> None:
    segments, n_media = LAYOUTS[layout]
    media = [p.media for p in P[:n_media]]
    prompt = loaded.prompt_builder.build(segments, [MediaSlot(p, 1) for p in P[:n_media]])
    with torch.inference_mode():
        got = loaded.model.embed(prompt.input_ids, prompt.media_spans, media)  # (1, L, D)
        expected = reference_embed(loaded.model, prompt, media)
    assert got.shape == (1, len(prompt.input_ids), 64)
    torch.testing.assert_close(got, expected)


def test_text_positions_keep_their_token_embeddings(loaded: LoadedModel) -> None:
    prompt = loaded.prompt_builder.build(["x", MediaRef(P[0]), "y"], [MediaSlot(P[0], 1)])
    with torch.inference_mode():
        got = loaded.model.embed(prompt.input_ids, prompt.media_spans, [P[0].media])[0]  # (L, D)
        plain = loaded.model.lm.get_input_embeddings()(torch.tensor(prompt.input_ids))  # (L, D)
    start, length = prompt.media_spans[0]
    text = [i for i in range(len(prompt.input_ids)) if not start <= i < start + length]
    assert torch.equal(got[text], plain[text])
    assert not torch.equal(got[start : start + length], plain[start : start + length])


def test_lower_precision_features_are_cast(loaded: LoadedModel) -> None:
    prompt = loaded.prompt_builder.build([MediaRef(P[0])], [MediaSlot(P[0], 1)])
    half = MediaFeatures("image", image(0).features.to(torch.bfloat16))
    with torch.inference_mode():
        out = loaded.model.embed(prompt.input_ids, prompt.media_spans, [half])
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            image(0, tokens=15),
            "media[0]: image features: expected (16, 64) = 1 frame(s) x 16 rows, got (15, 64)",
        ),
        (
            MediaFeatures("image", torch.zeros(16, 64, 1)),
            "expected (16, 64) = 1 frame(s) x 16 rows, got (16, 64, 1)",
        ),
        (MediaFeatures("image", torch.zeros(16, 64, dtype=torch.int32)), "expected a floating-point dtype"),
        (MediaFeatures("image", torch.full((16, 64), float("nan"))), "contain NaN or infinity"),
        (
            MediaFeatures("audio", torch.zeros(16, 64)),
            "media[0].modality: expected one of ['image'], got 'audio'",
        ),
    ],
)
def test_feature_validation(loaded: LoadedModel, item: MediaFeatures, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        loaded.model.embed([1] + [4] * 16, [(1, 16)], [item])
    assert message in e.value.message


def test_spans_must_match_items(loaded: LoadedModel) -> None:
    with pytest.raises(InvalidArgumentError, match="1 items but 0 spans"):
        loaded.model.embed([1, 4], [], [image(0)])
    with pytest.raises(InvalidArgumentError, match="span of 8 tokens, connector gave 16"):
        loaded.model.embed([1] + [4] * 16, [(1, 8)], [image(0)])
    with pytest.raises(InvalidArgumentError, match="outside the prompt"):
        loaded.model.embed([1] + [4] * 10, [(1, 16)], [image(0)])
