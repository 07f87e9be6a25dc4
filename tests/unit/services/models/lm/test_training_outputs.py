"""The output projectors in training: the distance loss at the signal tokens, its weights, and
the zero-weighted dummy forward that gives every projector a gradient on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.models.lm.output_projector import OutputProjector, signal_distance
from services.models.lm.training_outputs import OutputHeads, SignalInBatch, SignalSpec

D = 8
IMG = (90, 91)  # signal ids of the test's "image" (2 tokens) and "audio" (1 token)
AUD = (95,)


def heads() -> OutputHeads:
    torch.manual_seed(0)
    small = {"hidden_dim": 8, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "ffn_dim": 16}
    return OutputHeads(
        {"image": OutputProjector(D, 6, 2, 3, **small), "audio": OutputProjector(D, 4, 1, 1, **small)},
        {"image": SignalSpec(IMG, -1, 1.0, "img_head"), "audio": SignalSpec(AUD, -1, 2.0, "aud_head")},
    )


def batch() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.tensor([[1, 5, 6, 90, 91, 2], [1, 7, 95, 2, 0, 0]])  # (B, L)
    hidden = [torch.randn(2, 6, D) for _ in range(3)]  # embeddings + 2 layers
    return hidden, nn.Embedding(100, D)(ids).detach(), ids  # (B, L, D) input embeddings


def test_the_loss_is_lm_plus_weighted_distances_at_the_signal_tokens() -> None:
    h = heads()
    hidden, embeds, ids = batch()
    target_img, target_aud = torch.randn(3, 6), torch.randn(1, 4)
    signals = [SignalInBatch(0, "image", target_img), SignalInBatch(1, "audio", target_aud)]
    lm = torch.tensor(1.5)
    total, distances = h.loss(lm, hidden, embeds, ids, signals)
    img = h.projectors["image"](hidden[-1][0:1, 3:5], embeds[0:1, 3:5])  # AT the tokens
    aud = h.projectors["audio"](hidden[-1][1:2, 2:3], embeds[1:2, 2:3])
    expected_img, expected_aud = (
        signal_distance(img, target_img[None]),
        signal_distance(aud, target_aud[None]),
    )
    assert distances["image"].item() == pytest.approx(expected_img.item(), rel=1e-5)
    assert total.item() == pytest.approx(1.5 + expected_img.item() + 2.0 * expected_aud.item(), rel=1e-5)
    assert h.head_names == {"image": "img_head", "audio": "aud_head"}


def test_an_absent_modality_still_gets_a_zero_gradient() -> None:
    h = heads()
    hidden, embeds, ids = batch()
    total, distances = h.loss(
        torch.tensor(0.0), hidden, embeds, ids, [SignalInBatch(0, "image", torch.randn(3, 6))]
    )
    assert set(distances) == {"image"}
    total.backward()
    for name, p in h.named_parameters():
        assert p.grad is not None, name
    assert all(float(p.grad.abs().sum()) == 0.0 for p in h.projectors["audio"].parameters())  # type: ignore[union-attr]
    assert any(float(p.grad.abs().sum()) > 0.0 for p in h.projectors["image"].parameters())  # type: ignore[union-attr]


def test_a_signal_of_a_modality_without_projector_is_refused() -> None:
    hidden, embeds, ids = batch()
    with pytest.raises(ValueError, match=r"caption embeddings of \['video'\]: no output projector"):
        heads().loss(torch.tensor(0.0), hidden, embeds, ids, [SignalInBatch(0, "video", torch.randn(3, 6))])
