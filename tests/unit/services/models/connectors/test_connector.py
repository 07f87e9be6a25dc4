"""Connectors: shapes and token counts per type, parameter names, frozen bases, bad inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from services.common.errors import InvalidArgumentError
from services.common.presets import ConnectorSpec, EncoderSpec, Preset, QFormerSpec
from services.models.connectors.connector import (
    CONNECTORS,
    build_connector,
    bundle_state,
    cast_connector,
    connector_from_spec,
)
from services.models.connectors.eva_qformer import etchat_qformer, videochat_qformer
from services.models.lm.tiny import write_tiny_qformer_tokenizer

QSIZES = {"width": 32, "layers": 2, "heads": 2, "mlp_dim": 64, "num_query_tokens": 4}


def connector_spec(**kw: object) -> ConnectorSpec:
    """A ConnectorSpec from keyword fields (validated; the defaults of the others apply)."""
    return ConnectorSpec.model_validate(kw)


def linears(module: torch.nn.Module, *names: str) -> list[torch.nn.Linear]:
    """A module's named nn.Linear children."""
    found = [getattr(module, n) for n in names]
    assert all(isinstance(m, torch.nn.Linear) for m in found)
    return found


def encoder(**kw: object) -> EncoderSpec:
    return EncoderSpec.model_validate(
        {"backbone": "eva_vit", "checkpoint": "/x", "tokens": 5, "dim": 32} | kw
    )


@pytest.mark.parametrize(
    ("kind", "frames", "tokens"),
    [("linear", 3, 15), ("mlp2x_gelu", 3, 15), ("event_adaptor", 3, 3 + 5)],
)
def test_simple_connectors_map_frames_into_the_llm_width(kind: str, frames: int, tokens: int) -> None:
    conn = build_connector(kind, in_dim=32, out_dim=48, tokens_per_frame=5)
    x = torch.randn(2, frames, 5, 32)  # (B, F, T, D)
    assert conn(x).shape == (2, tokens, 48)
    assert conn.num_tokens(frames) == tokens
    assert torch.allclose(conn(x.flatten(1, 2)), conn(x))  # (B, F*T, D) is the same item


def test_mlp2x_gelu_is_linear_gelu_linear() -> None:
    conn = build_connector("mlp2x_gelu", in_dim=8, out_dim=16)
    x = torch.randn(1, 3, 8)
    fc1, fc2 = linears(conn, "fc1", "fc2")
    expected = fc2(torch.nn.functional.gelu(fc1(x)))
    assert torch.allclose(conn(x), expected)
    assert [n for n, _ in conn.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_event_adaptor_is_eventgpts_mlp_adaptor_and_spatio_temporal_means() -> None:
    conn = build_connector("event_adaptor", in_dim=8, out_dim=16, tokens_per_frame=3)
    names = [n for n, _ in conn.named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "adaptor.weight", "adaptor.bias"]
    x = torch.randn(1, 5, 3, 8)  # 5 event frames of 3 tokens
    fc1, fc2, adaptor = linears(conn, "fc1", "fc2", "adaptor")
    per_frame = [adaptor(fc2(torch.nn.functional.gelu(fc1(x[0, f])))) for f in range(5)]
    stacked = torch.stack(per_frame)  # (5, 3, 16), EventGPT's loop then stack
    expected = torch.cat([stacked.mean(1), stacked.mean(0)])  # temporal (5) then spatial (3)
    assert torch.allclose(conn(x)[0], expected, atol=1e-6)
    assert conn.num_tokens(5) == 8


def test_videochat_qformer_reads_taps_and_gives_the_query_count() -> None:
    spec = connector_spec(
        type="qformer", qformer=QFormerSpec(**QSIZES, num_extra_query_tokens=8, gmhra_layers=2, gmhra_heads=2)
    )
    conn = connector_from_spec(spec, encoder(taps=2, select_feature="cls_patch"), 48)
    assert conn.tokens_per_frame == 10 and conn.num_tokens(4) == conn.num_tokens(1) == 12
    taps = torch.randn(1, 4, 10, 32)  # 4 frames x [tap 0: 5 tokens, tap 1: 5 tokens]
    assert conn(taps).shape == (1, 12, 48)
    core = videochat_qformer(
        vision_width=32, out_dim=48, num_query_tokens=4, num_extra_query_tokens=8, width=32, layers=2,
        heads=2, mlp_dim=64, gmhra_layers=2, gmhra_heads=2,
    )  # fmt: skip
    assert list(conn.state_dict()) == list(core.state_dict())  # the contract's names
    core.load_state_dict(conn.state_dict())
    assert torch.allclose(conn(taps), core(taps.view(1, 4, 2, 5, 32)), atol=1e-6)  # (B, T, K, N, D)


@pytest.mark.parametrize("ln_dtype", ["float32", None])
def test_videochat_ln_vision_dtype_in_a_half_connector(ln_dtype: str | None) -> None:
    """VideoChat's ln_vision is a float32 LayerNorm that casts its input up and its output
    back under autocast (models/blip2.py LayerNorm); `ln_vision_dtype: float32` keeps that in a
    float16 connector, None gives E.T. Chat's plain LayerNorm in the connector's dtype."""
    spec = connector_spec(
        type="qformer", qformer=QFormerSpec(**QSIZES, num_extra_query_tokens=2), ln_vision_dtype=ln_dtype
    )
    conn = connector_from_spec(spec, encoder(), 48)
    torch.nn.init.normal_(conn.ln_vision.weight, 1.0, 0.3)  # weights float16 cannot hold exactly
    torch.nn.init.normal_(conn.ln_vision.bias, 0.0, 0.3)
    weight, bias = conn.ln_vision.weight.detach().clone(), conn.ln_vision.bias.detach().clone()
    cast_connector(conn, spec, torch.float16)
    assert conn.proj.weight.dtype == conn.query_tokens.dtype == torch.float16
    assert conn.ln_vision.weight.dtype == (torch.float32 if ln_dtype else torch.float16)
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["tokens"] = kwargs["encoder_hidden_states"]

    conn.qformer.register_forward_pre_hook(grab, with_kwargs=True)
    x = (torch.randn(1, 1, 5, 32) * 3 + 1).half()
    assert conn(x).dtype == torch.float16
    assert seen["tokens"].dtype == torch.float16  # cast back for the float16 Q-Former
    seeds = torch.nn.functional.layer_norm(x.view(1, 5, 32).float(), (32,), weight, bias).half()
    if ln_dtype:
        torch.testing.assert_close(seen["tokens"], seeds, atol=0, rtol=0)
    else:
        assert not torch.equal(seen["tokens"], seeds)  # the float16 weights round


def test_ln_vision_dtype_is_for_the_qformer_types() -> None:
    with pytest.raises(ValueError, match="ln_vision_dtype: only the Q-Former types"):
        connector_spec(type="linear", ln_vision_dtype="float32")


def test_image_through_videochat_qformer_is_one_frame() -> None:
    spec = connector_spec(type="qformer", qformer=QFormerSpec(**QSIZES, num_extra_query_tokens=2))
    conn = connector_from_spec(spec, encoder(), 48)  # no temporal layers: plain frame tokens
    assert conn(torch.randn(2, 1, 5, 32)).shape == (2, 6, 48)


def test_qformer_bundle_holds_only_the_trained_tensors() -> None:
    spec = connector_spec(type="qformer", qformer=QFormerSpec(**QSIZES, gmhra_layers=2, gmhra_heads=2))
    conn = connector_from_spec(spec, encoder(taps=2, select_feature="cls_patch"), 48)
    kept = bundle_state(conn)
    assert {k.split(".")[0] for k in kept} == {"extra_query_tokens", "gmhra", "proj"}
    assert not any(
        p.requires_grad for n, p in conn.named_parameters() if n.startswith(("qformer.", "query_"))
    )
    trained = bundle_state(conn, include=["ln_vision.weight", "ln_vision.bias"])
    assert set(trained) - set(kept) == {"ln_vision.weight", "ln_vision.bias"}


@pytest.fixture(scope="module")
def qformer_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qtok") / "tok"
    write_tiny_qformer_tokenizer(folder, 512)
    return folder


def instruct_spec(tokenizer: Path, **kw: int) -> ConnectorSpec:
    q = QFormerSpec(
        **QSIZES, vocab_size=512, max_text_positions=64, max_text_tokens=kw.get("max_text_tokens", 32)
    )
    return connector_spec(type="instruct_qformer", qformer=q, tokenizer=tokenizer)


def test_instruct_qformer_reads_the_instruction_and_gives_one_token_per_frame(
    qformer_tokenizer: Path,
) -> None:
    conn = connector_from_spec(instruct_spec(qformer_tokenizer), encoder(tokens=4), 48).eval()
    assert conn.reads_text and conn.num_tokens(7) == 7
    frames = torch.randn(1, 7, 4, 32)
    when = conn(frames, conn.encode_instructions(["when does the red square move?"]))
    assert when.shape == (1, 7, 48)
    other = conn(frames, conn.encode_instructions(["describe the video"]))
    assert not torch.allclose(when, other)  # the text matters
    core = etchat_qformer(
        vision_width=32, out_dim=48, num_query_tokens=4, width=32, layers=2, heads=2, mlp_dim=64,
        vocab_size=512, max_text_positions=64,
    )  # fmt: skip
    assert list(conn.state_dict()) == list(core.state_dict())
    core.load_state_dict(conn.state_dict())
    ids, mask = conn.encode_instructions(["describe the video"])
    assert torch.allclose(other, core.eval()(frames, ids, mask), atol=1e-6)
    assert conn(frames).shape == (1, 7, 48)  # no instruction: empty text


def test_instruct_qformer_truncates_the_instruction_from_the_left(qformer_tokenizer: Path) -> None:
    conn = connector_from_spec(instruct_spec(qformer_tokenizer, max_text_tokens=6), encoder(tokens=4), 48)
    ids, _ = conn.encode_instructions(["a b c d e f g h the end"])
    tokens = cast(Any, conn).tokenizer.convert_ids_to_tokens(ids[0])
    assert ids.shape == (1, 6) and tokens[0] == "[CLS]" and tokens[-3:] == ["the", "end", "[SEP]"]


def test_wrong_input_shapes_are_refused() -> None:
    conn = build_connector("linear", in_dim=8, out_dim=8, tokens_per_frame=4)
    with pytest.raises(
        InvalidArgumentError,
        match=r"expected \(batch, frames, 4, 8\) or \(batch, frames \* 4, 8\), got \(1, 6, 8\)",
    ):
        conn(torch.randn(1, 6, 8))  # 6 rows do not divide into frames of 4
    with pytest.raises(InvalidArgumentError, match=r"got \(1, 4, 7\)"):
        conn(torch.randn(1, 4, 7))
    with pytest.raises(InvalidArgumentError, match=r"got \(1, 2, 3, 8\)"):
        conn(torch.randn(1, 2, 3, 8))


def test_unknown_types_are_refused() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"expected one of \['event_adaptor', 'linear', 'mlp2x_gelu'\]"
    ):
        build_connector("qformer", in_dim=8, out_dim=8)
    assert sorted(CONNECTORS) == ["event_adaptor", "instruct_qformer", "linear", "mlp2x_gelu", "qformer"]


@pytest.mark.parametrize(
    ("name", "tokens"),
    [("tiny", {"image": 16}), ("tiny-videochat", {"video": 12, "image": 12}), ("tiny-etchat", {"video": 3}),
     ("tiny-eventgpt", {"event": 22}), ("tiny-pandagpt", {"image": 1, "video": 1, "audio": 1, "thermal": 1})],
)  # fmt: skip
def test_token_counts_of_the_tiny_twins(
    twin: Callable[[str], Preset], tiny_preset: Preset, name: str, tokens: dict[str, int]
) -> None:
    preset = tiny_preset if name == "tiny" else twin(name)
    for modality, spec in preset.modalities.items():
        conn = connector_from_spec(spec.connector, spec.encoder, 32)
        frames = spec.encoder.sampling.frames_per_item(modality) if spec.encoder.sampling else None
        frames = 3 if spec.encoder.sampling and spec.encoder.sampling.fps else frames or 1
        if spec.encoder.backbone == "imagebind":
            frames = 1
        assert conn.num_tokens(frames) == tokens[modality], modality
