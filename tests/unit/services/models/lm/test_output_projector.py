"""NExT-GPT output projectors: the TextFcLayer layout, signal-token capture, the stage-2 loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.models.lm.output_projector import (
    LEGACY_INFERENCE_POSITION,
    SEED_OUTPUTS,
    TRAIN_POSITION,
    OutputProjector,
    bundle_heads,
    find_signal_spans,
    gather_signal_input,
    load_output_projector,
    signal_distance,
    signal_token_ids,
    stage2_loss,
)

SIG = [50, 51, 52]  # a modality's three signal ids
TINY = {"hidden_dim": 16, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1}


def tiny(n_in: int = 3, n_out: int = 5, in_dim: int = 8, out_dim: int = 6, **kw: object) -> OutputProjector:
    torch.manual_seed(0)
    return OutputProjector(in_dim, out_dim, n_in, n_out, **{**TINY, **kw})  # type: ignore[arg-type]


# ---- the projector ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_seed_sizes_and_key_layout(modality: str) -> None:
    seed = SEED_OUTPUTS[modality]
    with torch.device("meta"):
        p = OutputProjector(4096, seed.out_dim, seed.num_signal_tokens, seed.num_output_tokens)
    sd = p.state_dict()
    assert sd["fc.weight"].shape == (512, 4096)
    assert sd["model.weight"].shape == (seed.out_dim, 512)
    assert sd["query_embs"].shape == (1, seed.num_output_tokens, 512)
    assert sd["tfm.encoder.layers.3.linear1.weight"].shape == (2048, 512)  # 4 layers, ffn 4*512
    assert sd["tfm.decoder.layers.3.multihead_attn.in_proj_weight"].shape == (3 * 512, 512)
    assert "tfm.encoder.layers.4.linear1.weight" not in sd
    assert {"tfm.encoder.norm.weight", "tfm.decoder.norm.weight", "fc.bias", "model.bias"} <= set(sd)
    assert p.tfm.encoder.layers[0].norm_first and p.tfm.encoder.layers[0].self_attn.num_heads == 4
    assert p.tfm.encoder.layers[0].self_attn.batch_first
    assert p.tfm.encoder.layers[0].dropout.p == 0.0


@pytest.mark.parametrize(("n_in", "n_out", "out_dim"), [(4, 7, 6), (2, 1, 5)])
def test_output_shape(n_in: int, n_out: int, out_dim: int) -> None:
    p = tiny(n_in=n_in, n_out=n_out, out_dim=out_dim)
    h, e = torch.randn(3, n_in, 8), torch.randn(3, n_in, 8)
    assert p(h, e).shape == (3, n_out, out_dim)


def test_forward_is_fc_of_the_sum_then_transformer_then_linear() -> None:
    p = tiny().eval()
    h, e = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    ref = p.model(p.tfm(p.fc(h + e), p.query_embs.repeat(2, 1, 1)))  # TextFcLayer.forward, spelled out
    torch.testing.assert_close(p(h, e), ref)
    torch.testing.assert_close(p(h, e), p(h + e, torch.zeros_like(e)))  # only the sum matters


def test_output_is_the_last_linear_by_hand() -> None:
    p = tiny()
    with torch.no_grad():
        p.model.weight.zero_()
        p.model.bias.copy_(torch.arange(6.0))
    out = p(torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    torch.testing.assert_close(out, torch.arange(6.0).expand(2, 5, 6))


def test_query_init_and_bad_sizes() -> None:
    assert tiny(query_init="zeros").query_embs.abs().sum() == 0
    assert tiny().query_embs.abs().sum() > 0
    with pytest.raises(InvalidArgumentError, match="divide"):
        OutputProjector(8, 6, 3, 5, hidden_dim=15, num_heads=2)
    with pytest.raises(InvalidArgumentError, match="positive"):
        OutputProjector(8, 6, 0, 5)


def test_forward_refuses_wrong_shapes() -> None:
    p = tiny()
    with pytest.raises(InvalidArgumentError, match=r"expected \(B, 3, 8\), got \(2, 4, 8\)"):
        p(torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    with pytest.raises(InvalidArgumentError, match="differ"):
        p(torch.randn(2, 3, 8), torch.randn(1, 3, 8))


def test_half_inputs_meet_a_float_projector() -> None:
    p = tiny()
    out = p(torch.randn(1, 3, 8).half(), torch.randn(1, 3, 8).half())
    assert out.dtype == torch.float32


# ---- capture -----------------------------------------------------------------------------------


def test_find_spans() -> None:
    assert find_signal_spans([1, 50, 51, 52, 2], SIG) == [1]
    assert find_signal_spans(torch.tensor([50, 51, 52, 7, 50, 51, 52]), SIG) == [0, 4]
    assert find_signal_spans([1, 2, 3], SIG) == []


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([1, 50, 51, 2], r"expected ids \[50, 51, 52\], got \[50, 51, 2\]"),  # interrupted
        ([1, 50, 51], "cut off"),
        ([1, 50, 52, 51], "got \\[50, 52, 51\\]"),  # reordered
        ([1, 51, 52, 2], "position 1 is outside a span"),  # stray later token
        ([50, 51, 52, 52], "position 3 is outside a span"),
    ],
)
def test_find_spans_refuses_malformed(ids: list[int], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        find_signal_spans(ids, SIG)


def _sequence() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    # positions:          0  1   2   3   4  5
    ids = torch.tensor([[7, 8, 50, 51, 52, 9], [50, 51, 52, 9, 9, 9]])
    # layer l, row r, position j -> value 100*l + 10*r + j (width 2)
    layers = tuple(
        (100 * lay + 10 * torch.arange(2)[:, None] + torch.arange(6)[None]).float()[..., None].expand(2, 6, 2)
        for lay in range(3)
    )
    embeds = -(10 * torch.arange(2)[:, None] + torch.arange(6)[None]).float()[..., None].expand(2, 6, 2)
    return ids, layers, embeds


def test_gather_at_the_signal_tokens_last_layer() -> None:
    ids, layers, embeds = _sequence()
    got = gather_signal_input(layers, embeds, ids, SIG, position="at")
    assert got.rows == [0, 1] and got.starts == [2, 0]
    assert got.hidden[:, :, 0].tolist() == [[202, 203, 204], [210, 211, 212]]  # layer -1 = 2
    assert got.embeds[:, :, 0].tolist() == [[-2, -3, -4], [-10, -11, -12]]


def test_gather_before_is_the_legacy_off_by_one_and_layer_is_chosen() -> None:
    ids, layers, embeds = _sequence()
    ids, layers, embeds = ids[:1], tuple(x[:1] for x in layers), embeds[:1]
    got = gather_signal_input(layers, embeds, ids, SIG, layer=1, position=LEGACY_INFERENCE_POSITION)
    assert got.hidden[0, :, 0].tolist() == [101, 102, 103]  # the states that predict 50, 51, 52
    assert got.embeds[0, :, 0].tolist() == [-2, -3, -4]  # the signal tokens' own embeddings
    assert TRAIN_POSITION == "at"


def test_gather_with_the_embedding_table_and_one_tensor() -> None:
    ids, layers, _ = _sequence()
    table = nn.Embedding(60, 2)
    got = gather_signal_input(layers[2], table, ids, SIG)
    torch.testing.assert_close(got.embeds[1], table(torch.tensor(SIG)))
    assert got.hidden[1, :, 0].tolist() == [210, 211, 212]


def test_gather_refuses() -> None:
    ids, layers, embeds = _sequence()
    with pytest.raises(InvalidArgumentError, match="position expected one of"):
        gather_signal_input(layers, embeds, ids, SIG, position="after")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="no state before it"):  # row 1 starts at 0
        gather_signal_input(layers, embeds, ids, SIG, position="before")
    with pytest.raises(InvalidArgumentError, match="row 0: expected one signal span, got 0"):
        gather_signal_input(layers, embeds, torch.tensor([[1, 2, 3, 4, 5, 6]] * 2), SIG)
    with pytest.raises(InvalidArgumentError, match="layer 5 is out of range"):
        gather_signal_input(layers, embeds, ids, SIG, layer=5)
    with pytest.raises(InvalidArgumentError, match="input embeddings expected"):
        gather_signal_input(layers, embeds[:, :4], ids, SIG)
    bad = ids.clone()
    bad[0, 4] = 9
    with pytest.raises(InvalidArgumentError, match="signal span at position 2"):
        gather_signal_input(layers, embeds, bad, SIG)


def test_gather_in_generation_states_may_stop_short() -> None:
    ids, layers, embeds = _sequence()
    short = tuple(x[:1, :4] for x in layers)  # the last signal token (position 4) was never fed
    with pytest.raises(InvalidArgumentError, match="feed the last signal token"):
        gather_signal_input(short, embeds[:1], ids[:1], SIG, position="at")
    got = gather_signal_input(short, embeds[:1], ids[:1], SIG, position="before")
    assert got.hidden[0, :, 0].tolist() == [201, 202, 203]


def test_gather_any_per_row() -> None:
    ids = torch.tensor([[50, 51, 52, 1, 50, 51, 52], [1, 1, 1, 1, 1, 1, 1]])
    states = torch.arange(14.0).view(2, 7, 1)
    got = gather_signal_input(states, states, ids, SIG, per_row="any")
    assert got.rows == [0, 0] and got.starts == [0, 4] and got.hidden.shape == (2, 3, 1)
    none = gather_signal_input(states[1:], states[1:], ids[1:], SIG, per_row="any")
    assert none.hidden.shape == (0, 3, 1) and none.rows == []


def test_signal_token_ids() -> None:
    vocab = {"[IMG0]": [5], "[IMG1]": [6], "[IMGX]": [1, 2], "[DUP]": [5]}

    def tok(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": vocab[text]}

    assert signal_token_ids(tok, ["[IMG0]", "[IMG1]"]) == [5, 6]
    with pytest.raises(FailedPreconditionError, match="expected one token"):
        signal_token_ids(tok, ["[IMGX]"])
    with pytest.raises(FailedPreconditionError, match="distinct"):
        signal_token_ids(tok, ["[IMG0]", "[DUP]"])


# ---- losses ------------------------------------------------------------------------------------


def test_signal_distance_by_hand() -> None:
    out = torch.zeros(2, 2, 2)
    target = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]])
    # per-token distances 5, 0, 1, 2 -> mean 2; a squared MSE would give 30/8 = 3.75
    assert signal_distance(out, target).item() == pytest.approx(2.0)


def test_signal_distance_audio_target_and_shapes() -> None:
    out = torch.zeros(2, 1, 3)
    target = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 4.0]])  # (B, 512)-style, distances 3 and 4
    assert signal_distance(out, target).item() == pytest.approx(3.5)
    with pytest.raises(InvalidArgumentError, match=r"expected \(2, 1, 3\).*got \(2, 1, 4\)"):
        signal_distance(out, torch.zeros(2, 1, 4))
    with pytest.raises(InvalidArgumentError, match="caption embeddings expected"):
        signal_distance(torch.zeros(2, 2, 3), torch.zeros(2, 3))


def test_signal_distance_gradient_is_finite_at_zero() -> None:
    out = torch.zeros(1, 2, 3, requires_grad=True)
    signal_distance(out, torch.zeros(1, 2, 3)).backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()


def test_stage2_loss_weights() -> None:
    lm = torch.tensor(1.5)
    d = {"image": torch.tensor(2.0), "video": torch.tensor(0.5)}
    assert stage2_loss(lm, d).item() == pytest.approx(4.0)
    assert stage2_loss(lm, d, {"video": 2.0, "audio": 9.0}).item() == pytest.approx(4.5)
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        stage2_loss(lm, d, {"image": -1.0})
    with pytest.raises(InvalidArgumentError, match="scalar"):
        stage2_loss(lm, {"image": torch.zeros(2)})


def test_a_tiny_projector_fits_a_fixed_caption_embedding() -> None:
    torch.manual_seed(0)
    p = tiny(n_in=3, n_out=4, in_dim=8, out_dim=6)
    h, e = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    target = torch.randn(4, 4, 6)
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = stage2_loss(torch.tensor(0.0), {"image": signal_distance(p(h, e), target)})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


# ---- bundle heads ------------------------------------------------------------------------------


def test_bundle_heads_round_trip_in_the_seed_layout() -> None:
    src = tiny()
    heads = bundle_heads({"image": src}, {"image": SEED_OUTPUTS["image"].head})
    assert set(heads) == {"gen_text_hidden_fcs"}
    assert "0.fc.weight" in heads["gen_text_hidden_fcs"] and "0.query_embs" in heads["gen_text_hidden_fcs"]
    flat = {
        f"{h}.{k}": v for h, sd in heads.items() for k, v in sd.items()
    }  # as heads.safetensors holds them
    dst = load_output_projector(flat, "gen_text_hidden_fcs", tiny(query_init="zeros"))
    assert not dst.training and not any(q.requires_grad for q in dst.parameters())
    h, e = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    torch.testing.assert_close(dst(h, e), src.eval()(h, e))


def test_load_output_projector_refuses() -> None:
    flat = {f"gen_text_hidden_fcs.0.{k}": v for k, v in tiny().state_dict().items()}
    with pytest.raises(
        FailedPreconditionError, match=r"0\.query_embs: expected shape \(1, 7, 16\), got \(1, 5, 16\)"
    ):
        load_output_projector(flat, "gen_text_hidden_fcs", tiny(n_out=7))
    missing = {k: v for k, v in flat.items() if not k.endswith("query_embs")}
    with pytest.raises(FailedPreconditionError, match=r"missing key gen_text_hidden_fcs\.0\.query_embs"):
        load_output_projector(missing, "gen_text_hidden_fcs", tiny())
    second = {**flat, "gen_text_hidden_fcs.1.fc.weight": torch.zeros(1)}
    with pytest.raises(FailedPreconditionError, match="one projector per modality"):
        load_output_projector(second, "gen_text_hidden_fcs", tiny())
    with pytest.raises(InvalidArgumentError, match="no head name"):
        bundle_heads({"audio": tiny()}, {})


def test_the_real_nextgpt_presets_projectors_have_the_seeds_sizes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Built on the meta device at Vicuna-7B's width (nothing allocated): each maps its signal
    tokens' (N, 4096) states to the decoder's conditioning (SEEDS_SPEC 2.A table), through the
    seed's TextFcLayer sizes (Linear 4096->512, learned (1, n_out, 512) queries)."""
    from services.common.presets import load_preset
    from services.models.lm.output_projector import build_projector

    preset = load_preset("nextgpt", cache_dir=tmp_path)
    expected = {"image": (4, (77, 768)), "video": (24, (77, 1024)), "audio": (8, (1, 512))}
    assert {m: (len(s.signal_tokens), tuple(s.conditioning)) for m, s in preset.outputs.items()} == expected
    assert {m: s.position for m, s in preset.outputs.items()} == dict.fromkeys(expected, "before")
    for modality, (n_sig, shape) in expected.items():
        with torch.device("meta"):
            projector = build_projector(preset.outputs[modality], 4096)
            states = torch.zeros(2, n_sig, 4096)
            out = projector(states, states)
        assert tuple(out.shape) == (2, *shape)
        state = projector.state_dict()
        assert tuple(state["fc.weight"].shape) == (512, 4096)
        assert tuple(state["query_embs"].shape) == (1, shape[0], 512)
        assert 31e6 < sum(v.numel() for v in state.values()) < 33e6  # ~32M parameters each
