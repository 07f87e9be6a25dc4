"""EVA-ViT-g backbone (seeds' layer rule against `output_hidden_states`, frames, taps), Global MHRA,
VideoChat's Q-Former compressor and E.T. Chat's instruction-aware pooler, all at tiny sizes; the
real sizes are only built on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.models.connectors.eva_qformer import (
    EvaVisionBackbone,
    InstructQFormerPooler,
    QFormerCompressor,
    TemporalGMHRA,
    etchat_qformer,
    eva_depth,
    eva_vit_g,
    videochat_qformer,
)

WIDTH, LAYERS = 32, 3
TINY_EVA = dict(num_layers=LAYERS, width=WIDTH, heads=2, mlp_dim=64, image_size=28, patch_size=14)
TINY_QFORMER = dict(vision_width=WIDTH, out_dim=40, width=24, layers=2, heads=2, mlp_dim=48)


def _pixels(*lead: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*lead, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def full_tower() -> EvaVisionBackbone:
    torch.manual_seed(0)
    return eva_vit_g(select_layer=-1, **TINY_EVA)  # all 3 blocks


def _trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


# --- EVA backbone ---------------------------------------------------------------------------


def test_eva_depth_is_the_seeds_rule() -> None:
    assert eva_depth(-2) == 39  # E.T. Chat vision_output_layer=-2; VideoChat/BLIP-2 depth=39
    assert eva_depth(-1) == 40
    assert eva_depth(0) == 1
    assert eva_depth(38) == 39
    for bad in (40, -41):
        with pytest.raises(InvalidArgumentError, match="block index"):
            eva_depth(bad)


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
@pytest.mark.parametrize("select_feature", ["cls_patch", "patch"])
def test_selected_block_is_hidden_states_at_depth(full_tower, select_layer: int, select_feature: str) -> None:
    pixels = _pixels(2)
    with torch.no_grad():
        hidden = full_tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == LAYERS + 1  # embeddings + every block
    backbone = EvaVisionBackbone(
        copy.deepcopy(full_tower.model),
        select_layer=select_layer,
        num_layers=LAYERS,
        select_feature=select_feature,  # type: ignore[arg-type]
    )
    depth = eva_depth(select_layer, LAYERS)
    assert len(backbone.model.encoder.layers) == depth  # blocks past the selected one are dropped
    want = hidden[depth]
    if select_layer < 0:  # negative indices agree with LLaVA's hidden_states indexing
        assert want is hidden[select_layer]
    if select_feature == "patch":
        want = want[:, 1:]
    got = backbone(pixels)
    assert got.shape == (2, backbone.tokens, WIDTH) == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_image_and_video_shapes_and_frames_are_independent() -> None:
    backbone = eva_vit_g(**TINY_EVA)
    assert (backbone.image_size, backbone.tokens, backbone.dim, backbone.depth) == (28, 5, WIDTH, 2)
    video = _pixels(2, 3)  # (B, T, 3, H, W)
    frames = backbone(video)
    assert frames.shape == (2, 3, 5, WIDTH)
    torch.testing.assert_close(frames[1, 2], backbone(video[1, 2][None])[0], atol=1e-5, rtol=0)
    patches = eva_vit_g(select_feature="patch", **TINY_EVA)
    assert patches(_pixels(2)).shape == (2, 4, WIDTH)
    assert patches(video).shape == (2, 3, 4, WIDTH)


def test_taps_end_at_the_selected_block(full_tower) -> None:
    backbone = EvaVisionBackbone(copy.deepcopy(full_tower.model), num_layers=LAYERS, tap_layers=2)
    video = _pixels(2, 3)
    taps = backbone.forward_taps(video)
    assert taps.shape == (2, 3, 2, 5, WIDTH)  # (B, T, K, N, D)
    torch.testing.assert_close(taps[:, :, -1], backbone(video))
    with torch.no_grad():
        hidden = full_tower.model(pixel_values=video.flatten(0, 1), output_hidden_states=True).hidden_states
    torch.testing.assert_close(taps[:, :, 0].flatten(0, 1), hidden[1], atol=1e-6, rtol=0)
    assert backbone.forward_taps(_pixels(2)).shape == (2, 1, 2, 5, WIDTH)  # an image is one frame


def test_ln_vision_option_is_blip2s_layer_norm(full_tower) -> None:
    raw = EvaVisionBackbone(copy.deepcopy(full_tower.model), num_layers=LAYERS)
    normed = EvaVisionBackbone(copy.deepcopy(full_tower.model), num_layers=LAYERS, ln_vision=True)
    assert normed.ln_vision is not None and normed.ln_vision.eps == 1e-5  # LAVIS's nn.LayerNorm default
    with torch.no_grad():
        normed.ln_vision.weight.normal_()
    pixels = _pixels(2)
    torch.testing.assert_close(normed(pixels), normed.ln_vision(raw(pixels)))


def test_backbone_is_frozen_and_stays_in_eval() -> None:
    backbone = eva_vit_g(ln_vision=True, **TINY_EVA)
    backbone.train()
    assert not backbone.training and not backbone.model.training
    assert not _trainable(backbone)


def test_backbone_rejects_bad_inputs_and_settings(full_tower) -> None:
    backbone = eva_vit_g(**TINY_EVA)
    with pytest.raises(InvalidArgumentError, match=r"expected \(batch, 3, 28, 28\).*got \(2, 3, 32, 32\)"):
        backbone(torch.zeros(2, 3, 32, 32))
    with pytest.raises(InvalidArgumentError, match="needs 3 blocks, the model has 2"):
        EvaVisionBackbone(copy.deepcopy(backbone.model), select_layer=-1, num_layers=LAYERS)
    with pytest.raises(InvalidArgumentError, match="tap_layers"):
        EvaVisionBackbone(copy.deepcopy(full_tower.model), num_layers=LAYERS, tap_layers=3)


# --- VideoChat: Global MHRA + Q-Former with extra queries -----------------------------------


def test_gmhra_starts_at_its_video_token_and_reads_every_frame() -> None:
    torch.manual_seed(0)
    gmhra = TemporalGMHRA(WIDTH, 2, num_layers=2).eval()
    taps = _tokens(2, 3, 2, 5, WIDTH)  # (B, T, K, N, D)
    out = gmhra(taps)
    assert out.shape == (2, 3 * 5 + 1, WIDTH)
    torch.testing.assert_close(out[:, :-1], taps[:, :, -1].reshape(2, 15, WIDTH))
    torch.testing.assert_close(out[:, -1], torch.zeros(2, WIDTH))  # zero-init out-proj and MLP
    with torch.no_grad():
        for layer in gmhra.layers:
            nn.init.normal_(layer.attn.out_proj.weight)
    before = gmhra(taps)[:, -1]
    changed = taps.clone()
    changed[0, 2] += _tokens(2, 5, WIDTH, seed=3)  # the last frame of the first video only
    after = gmhra(changed)[:, -1]
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    with pytest.raises(InvalidArgumentError, match=r"expected \(batch, frames, 2, tokens, 32\)"):
        gmhra(taps[:, :, :1])


def test_qformer_compressor_shapes_and_zero_extra_queries() -> None:
    torch.manual_seed(0)
    compressor = videochat_qformer(
        num_query_tokens=4, num_extra_query_tokens=6, gmhra_layers=0, **TINY_QFORMER
    )
    assert compressor.gmhra is None and compressor.num_tokens(123) == 10
    assert torch.count_nonzero(compressor.extra_query_tokens) == 0  # VideoChat zero-initialises them
    assert torch.count_nonzero(compressor.query_tokens) > 0
    image = compressor(_tokens(2, 5, WIDTH))  # (B, N, D)
    video = compressor(_tokens(2, 3, 5, WIDTH))  # (B, T, N, D): all frames read together
    assert image.shape == video.shape == (2, 10, 40)
    with pytest.raises(InvalidArgumentError, match="q-former input"):
        compressor(_tokens(2, 5, WIDTH + 1))


def test_videochat_path_from_pixels_trains_only_its_parts() -> None:
    torch.manual_seed(0)
    backbone = eva_vit_g(tap_layers=2, **TINY_EVA)
    compressor = videochat_qformer(
        num_query_tokens=4, num_extra_query_tokens=6, gmhra_layers=2, gmhra_heads=2, **TINY_QFORMER
    )
    assert isinstance(compressor, QFormerCompressor) and compressor.gmhra is not None
    trainable = _trainable(compressor)
    assert (
        "extra_query_tokens" in trainable and "proj.weight" in trainable and "ln_vision.weight" in trainable
    )
    assert any(name.startswith("gmhra.layers.1.") for name in trainable) and "gmhra.cls_token" in trainable
    assert "query_tokens" not in trainable and not any(name.startswith("qformer.") for name in trainable)
    compressor.train()
    assert compressor.training and compressor.gmhra.training and not compressor.qformer.training
    taps = backbone.forward_taps(_pixels(2, 3))  # inference tensors from the frozen backbone
    out = compressor(taps)
    assert out.shape == (2, 10, 40)
    out.square().mean().backward()
    assert compressor.extra_query_tokens.grad is not None and compressor.proj is not None
    assert compressor.proj.weight.grad is not None
    assert all(p.grad is None for p in compressor.qformer.parameters())


# --- E.T. Chat: instruction-aware Q-Former + attention pooling, one token per frame -----------


@pytest.fixture(scope="module")
def pooler() -> InstructQFormerPooler:
    torch.manual_seed(0)
    return etchat_qformer(
        num_query_tokens=4, vocab_size=50, max_text_positions=32, dropout=0.0, **TINY_QFORMER
    )


def test_pooler_gives_one_token_per_frame(pooler) -> None:
    frames = _tokens(2, 3, 4, WIDTH)  # (B, T, N, D) patches
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    out = pooler(frames, ids)
    assert out.shape == (2, 3, 40) and pooler.num_tokens(4) == 1
    assert pooler(frames[:, 0], ids).shape == (2, 1, 40)  # an image is one frame
    torch.testing.assert_close(pooler(frames[:1, 1:2], ids[:1]), out[:1, 1:2], atol=1e-5, rtol=0)


def test_pooler_uses_the_instruction(pooler) -> None:
    frames = _tokens(1, 2, 4, WIDTH)
    ids = torch.tensor([[5, 6, 7, 8]])
    other = torch.tensor([[9, 10, 11, 12]])
    assert not torch.allclose(pooler(frames, ids), pooler(frames, other))
    per_frame = torch.stack([ids, other], dim=1)  # (B, T, L): E.T. Chat's per-frame time tags
    mixed = pooler(frames, per_frame)
    torch.testing.assert_close(mixed[:, 0], pooler(frames, ids)[:, 0])
    torch.testing.assert_close(mixed[:, 1], pooler(frames, other)[:, 1])
    padded, mask = torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    torch.testing.assert_close(pooler(frames, padded, mask), pooler(frames, ids), atol=1e-5, rtol=0)
    with pytest.raises(
        InvalidArgumentError, match=r"input_ids: expected \(batch, length\) or \(batch, 2, length\)"
    ):
        pooler(frames, torch.ones(1, 3, 4, dtype=torch.long))


def test_pooler_freezing_follows_the_stage() -> None:
    stage1 = etchat_qformer(num_query_tokens=4, vocab_size=50, max_text_positions=32, **TINY_QFORMER)
    trainable = _trainable(stage1)
    assert {"qformer_proj.weight", "q_proj.1.weight", "k_proj.1.weight", "v_proj.1.weight"} <= trainable
    assert not any(n.startswith(("qformer.", "ln_vision")) or n == "query_tokens" for n in trainable)
    stage1.train()
    assert not stage1.qformer.training and stage1.v_proj.training
    stage2 = etchat_qformer(
        num_query_tokens=4, vocab_size=50, max_text_positions=32, freeze_qformer=False, **TINY_QFORMER
    )
    assert {"query_tokens", "ln_vision.weight"} <= _trainable(stage2)
    assert all(p.requires_grad for p in stage2.qformer.parameters())


# --- real sizes, on the meta device (no memory) -----------------------------------------------


def test_real_sizes_on_the_meta_device() -> None:
    with torch.device("meta"):
        eva = eva_vit_g()
        videochat = videochat_qformer()
        etchat = etchat_qformer()
    params = sum(p.numel() for p in eva.parameters())
    assert 0.95e9 < params < 1.05e9  # EVA-ViT-g, 39 of its 40 blocks
    assert (eva.depth, eva.tokens, eva.dim, eva.image_size) == (39, 257, 1408, 224)
    assert next(eva.parameters()).is_meta
    assert videochat.num_tokens(8 * 257) == 96
    assert 0.09e9 < sum(p.numel() for p in videochat.qformer.parameters()) < 0.12e9  # BERT-base, query-only
    assert videochat.gmhra is not None and len(videochat.gmhra.layers) == 8
    assert etchat.query_tokens.shape == (1, 32, 768) and etchat.v_proj[1].out_features == 3072
