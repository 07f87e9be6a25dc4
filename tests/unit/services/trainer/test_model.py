"""The model being trained: features written at their spans, the zero-weighted dummy forward that
gives an absent modality's connector a gradient, bidirectional spans (E.T. Chat's stage 3) per
row of a padded batch, LoRA targets and injection, and the one place that decides what trains
(freezing, learning rate per group, refusal of empty or overlapping groups)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from services.common.presets import LoraSpec
from services.models.connectors.connector import build_connector
from services.models.lm.model import FeatureLayout
from services.trainer.loop import MediaInExample, TimeInExample, TrainExample, collate
from services.trainer.model import ParamGroup, TrainingModel, add_lora, lora_target_names, select_trainable

CPU = torch.device("cpu")
TOKENS, FEAT_DIM, WIDTH, VOCAB = 4, 16, 32, 64


@pytest.fixture(scope="module")
def base_lm() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()  # eval: no dropout, so two forwards agree exactly


def make_model(
    base_lm: nn.Module,
    modalities: tuple[str, ...] = ("image",),
    seed: int = 1,
    bidirectional: frozenset[str] = frozenset(),
) -> TrainingModel:
    torch.manual_seed(seed)
    connectors = {m: build_connector("mlp2x_gelu", in_dim=FEAT_DIM, out_dim=WIDTH) for m in modalities}
    layouts = {m: FeatureLayout(m, tokens_per_frame=1, dim=FEAT_DIM, frames=TOKENS) for m in modalities}
    return TrainingModel(copy.deepcopy(base_lm), connectors, layouts, bidirectional=bidirectional)


def example(length: int = 12, media: list[tuple[int, str, torch.Tensor]] | None = None) -> TrainExample:
    ids = [(7 * i + 3) % VOCAB for i in range(length)]
    labels = [-100] * 6 + ids[6:]  # the prompt (with its media span) is not supervised
    items = [MediaInExample(start, TOKENS, m, f) for start, m, f in media or []]
    return TrainExample(input_ids=ids, labels=labels, media=items)


def batch(*examples: TrainExample) -> dict[str, Any]:
    return collate(examples, pad_id=0, device=CPU)


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


# -- forward --------------------------------------------------------------------------------------


def test_features_are_written_at_their_spans_and_nowhere_else(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    f0, f1, f2 = (torch.randn(TOKENS, FEAT_DIM) for _ in range(3))
    b = batch(
        example(10, [(1, "image", f0)]),
        example(12, [(0, "image", f1), (6, "image", f2)]),  # two items in one row
    )
    seen: dict[str, torch.Tensor] = {}

    def capture(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.lm.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**b)
            expected = model.lm.get_input_embeddings()(b["input_ids"])  # (B, L, D)
            projected = model.connectors["image"](torch.stack([f0, f1, f2]))  # (3, T, D)
    finally:
        handle.remove()
    for row, start, proj in [(0, 1, projected[0]), (1, 0, projected[1]), (1, 6, projected[2])]:
        expected[row, start : start + TOKENS] = proj
    assert torch.allclose(seen["embeds"], expected, atol=1e-6)
    assert not torch.allclose(seen["embeds"][0, 1:5], model.lm.get_input_embeddings()(b["input_ids"])[0, 1:5])


def test_the_loss_follows_the_features_written_at_a_span(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    feats = torch.randn(TOKENS, FEAT_DIM)
    with torch.no_grad():
        with_span = model(**batch(example(media=[(1, "image", feats)])))
        other_features = model(**batch(example(media=[(1, "image", feats + 1.0)])))
        without_media = model(**batch(example()))
    assert not torch.isclose(with_span, other_features)
    assert not torch.isclose(with_span, without_media)


def test_with_media_the_connector_gets_a_real_gradient(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    loss = model(**batch(example(media=[(2, "image", torch.randn(TOKENS, FEAT_DIM))])))
    loss.backward()
    connector_grads = grads(model.connectors["image"])
    assert all(g is not None for g in connector_grads)
    assert any(g.abs().sum() > 0 for g in connector_grads if g is not None)


def test_without_media_the_dummy_forward_gives_a_zero_gradient_and_adds_nothing(base_lm: nn.Module) -> None:
    trainable = make_model(base_lm)
    frozen = make_model(base_lm)
    frozen.connectors.requires_grad_(False)  # no dummy forward for a frozen connector
    b = batch(example(), example(9))
    loss = trainable(**b)
    reference = frozen(**b)
    assert torch.equal(loss, reference)  # 0.0 * dummy adds exactly nothing
    loss.backward()
    reference.backward()
    connector_grads = grads(trainable.connectors["image"])
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in connector_grads)
    assert all(g is None for g in grads(frozen.connectors["image"]))


def test_only_the_absent_modality_takes_the_dummy_path(base_lm: nn.Module) -> None:
    model = make_model(base_lm, modalities=("image", "audio"))
    loss = model(**batch(example(media=[(1, "image", torch.randn(TOKENS, FEAT_DIM))])))
    loss.backward()
    image, audio = grads(model.connectors["image"]), grads(model.connectors["audio"])
    assert any(g is not None and g.abs().sum() > 0 for g in image)
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in audio)


# -- bidirectional spans ---------------------------------------------------------------------------


def lm_inputs(model: TrainingModel, b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss and the keyword arguments the LM got."""
    seen: dict[str, Any] = {}
    handle = model.lm.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            loss = model(**b)
    finally:
        handle.remove()
    return loss, seen


def test_bidirectional_spans_attend_both_ways_per_row_of_a_padded_batch(base_lm: nn.Module) -> None:
    """Each row's own span is open both ways, padding stays hidden, and a row's loss is what it
    is alone (the batch loss is the token-weighted mean of the rows')."""
    bi = make_model(base_lm, bidirectional=frozenset({"image"}))
    causal = make_model(base_lm)
    f0, f1 = torch.randn(TOKENS, FEAT_DIM), torch.randn(TOKENS, FEAT_DIM)
    rows = [example(12, [(1, "image", f0)]), example(9, [(3, "image", f1)])]
    loss, seen = lm_inputs(bi, batch(*rows))
    mask = seen["attention_mask"]
    assert mask.shape == (2, 1, 12, 12)
    for row, (length, start) in enumerate([(12, 1), (9, 3)]):
        allowed = torch.ones(12, 12, dtype=torch.bool).tril()
        allowed[start : start + TOKENS, start : start + TOKENS] = True
        allowed[:, length:] = False  # padding columns
        assert torch.equal(mask[row, 0] == 0, allowed)
    alone = [lm_inputs(bi, batch(r))[0] for r in rows]
    supervised = [len(r.labels) - 6 for r in rows]
    expected = sum(a * n for a, n in zip(alone, supervised, strict=True)) / sum(supervised)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.isclose(loss, lm_inputs(causal, batch(*rows))[0])  # the span's block matters


def test_a_batch_without_bidirectional_items_keeps_the_padding_mask(base_lm: nn.Module) -> None:
    bi = make_model(base_lm, modalities=("image", "audio"), bidirectional=frozenset({"image"}))
    causal = make_model(base_lm, modalities=("image", "audio"))
    b = batch(example(10, [(1, "audio", torch.randn(TOKENS, FEAT_DIM))]), example(8))
    loss, seen = lm_inputs(bi, b)
    assert seen["attention_mask"].dim() == 2 and torch.equal(loss, lm_inputs(causal, b)[0])


# -- LoRA -----------------------------------------------------------------------------------------


def test_lora_target_names_are_full_paths_of_the_llms_linear_modules(base_lm: nn.Module) -> None:
    names = lora_target_names(base_lm, ["q_proj", "down_proj"])
    assert sorted(names) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert all(isinstance(base_lm.get_submodule(n), nn.Linear) for n in names)


def test_a_lora_target_that_matches_nothing_is_named(base_lm: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"LoRA targets \['qkv', 'wq'\] match no Linear module .* 'q_proj'"):
        lora_target_names(base_lm, ["q_proj", "wq", "qkv"])
    with pytest.raises(ValueError, match=r"\['embed_tokens'\]"):  # an Embedding is not a Linear
        lora_target_names(base_lm, ["embed_tokens"])


def test_add_lora_wraps_only_the_targets_and_starts_as_the_base_model(base_lm: nn.Module) -> None:
    lm = copy.deepcopy(base_lm)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    peft_lm = add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"]))
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_lm.named_parameters() if ".lora_A." in n}
    assert len(lora_modules) == 4
    assert {m.rsplit(".", 1)[-1] for m in lora_modules} == {"q_proj", "v_proj"}
    peft_lm.eval()
    with torch.no_grad():
        after = peft_lm(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-6)  # lora_B starts at zero


# -- select_trainable -----------------------------------------------------------------------------


def test_select_trainable_freezes_everything_else_with_a_learning_rate_per_group(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    model.lm = add_lora(model.lm, LoraSpec(r=2, alpha=4, dropout=0.0, targets=["q_proj"]))
    groups, counts = select_trainable(
        model,
        [
            ParamGroup("connectors", ("connectors.*",), 2e-5),
            ParamGroup("lora", ("*.lora_A.*", "*.lora_B.*"), 2e-4),
        ],
        weight_decay=0.01,
    )
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("connectors", 2e-5, 0.01),
        ("lora", 2e-4, 0.01),
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.startswith("connectors.") or ".lora_" in n
    }
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)
    connector_numel = sum(p.numel() for p in model.connectors.parameters())
    lora_numel = 2 * (2 * WIDTH + 2 * WIDTH)  # 2 layers x q_proj x (A: r x in + B: out x r), r=2
    assert counts == {"connectors": connector_numel, "lora": lora_numel}
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [connector_numel, lora_numel]


def test_select_trainable_refreezes_what_an_earlier_call_unfroze(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    select_trainable(model, [ParamGroup("all", ("*",), 1.0)], weight_decay=0.0)
    select_trainable(model, [ParamGroup("connectors", ("connectors.*",), 1e-3)], weight_decay=0.0)
    assert not any(p.requires_grad for p in model.lm.parameters())
    assert all(p.requires_grad for p in model.connectors.parameters())


def test_a_group_that_selects_nothing_is_refused(base_lm: nn.Module) -> None:
    model = make_model(base_lm)  # no LoRA injected: the stage-3 bug of training nothing
    with pytest.raises(
        ValueError, match=r"trainable group 'lora': patterns \['\*lora_\*'\] select no parameter"
    ):
        select_trainable(
            model,
            [ParamGroup("connectors", ("connectors.*",), 1e-3), ParamGroup("lora", ("*lora_*",), 2e-4)],
            weight_decay=0.0,
        )


def test_a_parameter_in_two_groups_is_refused(base_lm: nn.Module) -> None:
    model = make_model(base_lm)
    with pytest.raises(
        ValueError, match=r"parameter connectors\.image\.\S+ is selected by groups all and connectors"
    ):
        select_trainable(
            model,
            [ParamGroup("all", ("*",), 1e-4), ParamGroup("connectors", ("connectors.*",), 1e-3)],
            weight_decay=0.0,
        )


# -- media_combine sum and E.T. Chat's time tokens -------------------------------------------------


def test_items_sharing_a_span_are_summed_there(base_lm: nn.Module) -> None:
    model = make_model(base_lm, modalities=("image", "audio"))
    fa, fb = torch.randn(TOKENS, FEAT_DIM), torch.randn(TOKENS, FEAT_DIM)
    ex = TrainExample(
        input_ids=[3] * 10, labels=[-100] * 6 + [3] * 4,
        media=[MediaInExample(1, TOKENS, "image", fa), MediaInExample(1, TOKENS, "audio", fb)],
    )  # fmt: skip
    seen: dict[str, torch.Tensor] = {}
    handle = model.lm.register_forward_pre_hook(
        lambda _m, _a, kw: seen.__setitem__("e", kw["inputs_embeds"].detach()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch(ex))
            summed = model.connectors["image"](fa[None]) + model.connectors["audio"](fb[None])  # (1, T, D)
    finally:
        handle.remove()
    assert torch.allclose(seen["e"][0, 1 : 1 + TOKENS], summed[0], atol=1e-6)


def test_time_tokens_get_their_frame_and_train_the_heads(base_lm: nn.Module) -> None:
    from services.models.lm.timestamps import TimestampHeads

    torch.manual_seed(3)
    model = make_model(base_lm)  # mlp2x_gelu over 1 row per frame: one token per frame, like E.T. Chat
    model.heads = TimestampHeads(WIDTH)
    feats = torch.randn(TOKENS, FEAT_DIM)
    ids = [5] * 12
    ex = TrainExample(
        input_ids=ids, labels=[-100] * 8 + ids[8:], media=[MediaInExample(1, TOKENS, "image", feats)],
        times=[TimeInExample(6, 0, 2.0, False), TimeInExample(9, 0, 3.4, True)],
    )  # fmt: skip
    seen: dict[str, torch.Tensor] = {}
    handle = model.lm.register_forward_pre_hook(
        lambda _m, _a, kw: seen.__setitem__("e", kw["inputs_embeds"].detach()), with_kwargs=True
    )
    try:
        loss = model(**batch(ex))
    finally:
        handle.remove()
    with torch.no_grad():
        frames = model.connectors["image"](feats[None])[0]  # (F, D)
        text = model.lm.get_input_embeddings()(torch.tensor(ids))
    assert torch.allclose(seen["e"][0, 6], text[6] + frames[2], atol=1e-6)  # the question's time: frame 2
    assert torch.allclose(seen["e"][0, 9], text[9] + frames[3], atol=1e-6)  # 3.4 rounds to frame 3
    plain = copy.deepcopy(model)
    plain.heads = None
    with torch.no_grad():
        assert loss.item() > plain(**batch(ex)).item()  # + the matching loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())


def test_heads_without_targets_get_zero_gradients(base_lm: nn.Module) -> None:
    from services.models.lm.timestamps import TimestampHeads

    model = make_model(base_lm)
    model.heads = TimestampHeads(WIDTH)
    model(**batch(example(media=[(1, "image", torch.randn(TOKENS, FEAT_DIM))]))).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.heads.parameters())
