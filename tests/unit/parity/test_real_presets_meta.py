"""The five real presets, built on the meta device, against the hyperparameters of the seeds' builders.

The module parity fixtures (test_<seed>_modules.py) check the math at reduced sizes; this
checks the sizes: each shipped preset's encoders, connectors and heads are built through the
same builders the services use (no memory: the meta device) and every width, depth, head
count, patch size, token count, query count, projector size and selected layer is compared
with what the seed's builder uses. Each expected value names the seed file and line it comes
from (paths inside the seed repositories: PandaGPT 9b77e04, NExT-GPT 60d618b (legacy code),
Ask-Anything 4dd8210 (video_chat), ETBench 445f620 (etchat), EventGPT 4680549). The LLM
widths come from the base checkpoints' config.json the seeds load (Vicuna-7B v0, Phi-3-mini-4k,
the Vicuna-7B v1.5 EventGPT was tuned from); those folders are not in the seed repositories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from services.common.presets import Preset, load_preset
from services.models.backbones.base import ClipVisionBackbone
from services.models.backbones.eva import eva_vit_g
from services.models.backbones.imagebind import ImageBindBackbone, build_imagebind
from services.models.checkpoints.importers import lora_expected
from services.models.connectors.connector import connector_from_spec
from services.models.lm.lora import linear_shapes
from services.models.lm.output_projector import build_projector
from services.models.lm.timestamps import TimestampHeads

# The base LLMs' config.json (lmsys vicuna-7b v0 / v1.5, microsoft/Phi-3-mini-4k-instruct).
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
PHI3_MINI = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32064,
}
LLM_CONFIGS = {"llama": VICUNA_7B, "phi3": PHI3_MINI}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-presets")


def _preset(name: str, cache: Path) -> Preset:
    return load_preset(name, cache_dir=cache)


def _linear(module: Any) -> tuple[int, int]:
    return (int(module.in_features), int(module.out_features))


# --- ImageBind + llama_proj (PandaGPT, NExT-GPT) ----------------------------------------------


def _check_imagebind(preset: Preset) -> None:
    """ImageBind-Huge as `imagebind_model.imagebind_huge` builds it (PandaGPT's and NExT-GPT's
    copies of `code/model/ImageBind/models/imagebind_model.py` have the same lines)."""
    specs = {m: preset.modalities[m].encoder for m in ("image", "video", "audio")}  # type: ignore[index]
    assert {s.backbone for s in specs.values()} == {"imagebind"}
    assert all(s.config == {} for s in specs.values())  # the published architecture
    with torch.device("meta"):
        model = build_imagebind(towers=("vision", "audio"), **specs["image"].config)
    vision_conv = model.modality_preprocessors["vision"].rgbt_stem.proj[1]
    assert tuple(vision_conv.weight.shape) == (
        1280,
        3,
        2,
        14,
        14,
    )  # imagebind_model.py:496 (1280); :51-52 ((2, 14, 14), 2 frames)
    assert tuple(vision_conv.stride) == (2, 14, 14)  # imagebind_model.py:166 (stride=kernel_size)
    assert model.clip_shapes["vision"] == (
        3,
        2,
        224,
        224,
    )  # imagebind_model.py:172 (img_size=[3, video_frames, 224, 224])
    pos = model.modality_preprocessors["vision"].pos_embedding_helper.pos_embed
    assert tuple(pos.shape) == (1, 1 + 16 * 16, 1280)  # imagebind_model.py:173 (1 CLS token)
    vision = model.modality_trunks["vision"]
    assert len(vision.blocks) == 32  # imagebind_model.py:497
    assert vision.blocks[0].attn.num_heads == 16  # imagebind_model.py:498
    assert _linear(vision.blocks[0].mlp.fc1) == (1280, 4 * 1280)  # transformer.py:192 (mlp_ratio 4)
    assert isinstance(
        vision.pre_transformer_layer[0], nn.LayerNorm
    )  # imagebind_model.py:330 (pre_transformer_ln=True)
    assert vision.blocks[0].attn.bias_k is None  # imagebind_model.py:331 (add_bias_kv=False)
    audio_conv = model.modality_preprocessors["audio"].rgbt_stem.proj
    assert tuple(audio_conv.weight.shape) == (768, 1, 16, 16)  # imagebind_model.py:57 (768), :53 (kernel 16)
    assert tuple(audio_conv.stride) == (10, 10)  # imagebind_model.py:54
    assert model.clip_shapes["audio"] == (1, 128, 204)  # imagebind_model.py:62-63
    rows, cols = (128 - 16) // 10 + 1, (204 - 16) // 10 + 1
    audio_pos = model.modality_preprocessors["audio"].pos_embedding_helper.pos_embed
    assert tuple(audio_pos.shape) == (1, 1 + rows * cols, 768)  # imagebind_model.py:199-200
    audio = model.modality_trunks["audio"]
    assert len(audio.blocks) == 12 and audio.blocks[0].attn.num_heads == 12  # imagebind_model.py:60-61
    assert isinstance(
        audio.pre_transformer_layer[0], nn.Identity
    )  # imagebind_model.py:346 (pre_transformer_ln=False)
    assert audio.blocks[0].attn.bias_k is not None  # imagebind_model.py:347 (add_bias_kv=True)
    assert _linear(model.modality_heads["vision"][2]) == (
        1280,
        1024,
    )  # imagebind_model.py:392, :502 (out 1024)
    assert _linear(model.modality_heads["audio"][2]) == (768, 1024)  # imagebind_model.py:405
    assert model.modality_heads["vision"][0].eps == 1e-6  # imagebind_model.py:390
    # PandaGPT/NExT-GPT's forward applies only audio's Normalize, not its x20 logit scale (:476-479).
    assert model.audio_logit_scale is False
    backbone = ImageBindBackbone(model)
    for spec in specs.values():
        assert (spec.select_feature, spec.tokens, spec.dim) == (
            "embedding",
            1,
            backbone.dim,
        )  # imagebind_model.py:521 (1024)


def _check_llama_proj(preset: Preset, llm_dim: int) -> None:
    """One `llama_proj = nn.Linear(visual_hidden_size, hidden_size)` shared by every modality."""
    names = set(preset.connector_names().values())
    assert names == {"llama_proj"}
    spec = preset.modalities["image"]  # type: ignore[index]
    with torch.device("meta"):
        connector = connector_from_spec(spec.connector, spec.encoder, llm_dim)
    assert spec.connector.type == "linear"
    assert _linear(connector.proj) == (1024, llm_dim)
    assert all(connector.num_tokens(1) == 1 for _ in preset.modalities)  # one LLM token per item


def test_pandagpt_matches_imagebind_huge_and_openllama(cache: Path) -> None:
    preset = _preset("pandagpt", cache)
    _check_imagebind(preset)
    _check_llama_proj(preset, VICUNA_7B["hidden_size"])  # openllama.py:113-115
    assert preset.llm.architecture == "llama"
    lora = preset.lora
    assert (lora.r, lora.alpha, lora.dropout) == (32, 32, 0.1)  # code/config/openllama_peft.yaml:12-14
    assert lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]  # openllama.py:101


def test_nextgpt_matches_imagebind_huge_and_its_output_projectors(cache: Path) -> None:
    preset = _preset("nextgpt", cache)
    _check_imagebind(preset)
    _check_llama_proj(preset, VICUNA_7B["hidden_size"])  # anyToImageVideoAudio.py:103-105
    lora = preset.lora
    assert (lora.r, lora.alpha, lora.dropout) == (32, 32, 0.1)  # code/config/stage_3.yaml:2-4
    assert lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]  # anyToImageVideoAudio.py:83
    added = preset.llm.added_tokens
    assert added[:2] == ["<Img>", "</Img>"]  # anyToImageVideoAudio.py:189-190
    expected = {
        # modality: (head, signal tokens, output rows, width)
        "image": ("gen_text_hidden_fcs", 4, 77, 768),  # :114-121; config/base.yaml:23 (4), :10 (77)
        "video": ("gen_text_hidden_fcs_video", 24, 77, 1024),  # :136-143; config/base.yaml:29 (24)
        "audio": ("gen_text_hidden_fcs_audio", 8, 1, 512),  # :158-166 (num_output_tokens=1); base.yaml:35 (8)
    }
    prefix = {"image": "IMG", "video": "VID", "audio": "AUD"}
    for modality, (head, n_in, n_out, width) in expected.items():
        out = preset.outputs[modality]  # type: ignore[index]
        signals = [
            f"[{prefix[modality]}{i}]" for i in range(n_in)
        ]  # anyToImageVideoAudio.py:194-198, 211-215, 228-232
        assert (out.head, out.signal_tokens, tuple(out.conditioning)) == (head, signals, (n_out, width))
        assert all(t in added for t in signals)
        assert out.hidden_layer == -1  # config/base.yaml:22 (text_emb_to_img_layers: [-1])
        with torch.device("meta"):
            projector = build_projector(out, VICUNA_7B["hidden_size"])
        tfm = projector.tfm
        assert _linear(projector.fc) == (4096, 512)  # layers.py:42-43 (hidden_dim 512)
        assert tfm.d_model == 512 and tfm.nhead == 4  # layers.py:44-46
        assert len(tfm.encoder.layers) == 4 and len(tfm.decoder.layers) == 4  # layers.py:45
        layer = tfm.encoder.layers[0]
        assert _linear(layer.linear1) == (512, 2048) and layer.dropout.p == 0.0  # layers.py:46
        assert layer.norm_first and tfm.decoder.layers[0].norm_first  # layers.py:44 (norm_first=True)
        assert tuple(projector.query_embs.shape) == (1, n_out, 512)  # layers.py:48
        assert _linear(projector.model) == (512, width)  # layers.py:47
        assert projector.num_input_tokens == n_in


# --- EVA-ViT-g (VideoChat, E.T. Chat) ---------------------------------------------------------


def _eva(spec: Any) -> Any:
    with torch.device("meta"):
        return eva_vit_g(
            select_layer=spec.select_layer,
            select_feature=spec.select_feature,
            tap_layers=max(spec.taps, 1),
            **spec.config,
        )


def _check_eva_g(backbone: Any, *, seed: str) -> None:
    """EVA-ViT-g as VideoChat's `create_eva_vit_g` (eva_vit.py:565-575) and E.T. Chat's
    `EVAVisionTransformer` (eva_vit.py:415-430) build it."""
    vit = backbone.model
    layer = vit.encoder.layers[0]
    assert vit.config.hidden_size == 1408, seed  # VideoChat :569; E.T. Chat :417
    assert layer.self_attn.num_heads == 1408 // 88 == 16, seed  # VideoChat :571; E.T. Chat :426
    assert _linear(layer.mlp.fc1) == (1408, int(1408 * 4.3637)) == (1408, 6144), (
        seed
    )  # :572; :427 (mlp_ratio)
    assert (vit.config.image_size, vit.config.patch_size) == (224, 14), (
        seed
    )  # config_7b.json:8, :567; :415-416
    assert layer.self_attn.qkv.bias is not None, seed  # :573; :428 (qkv_bias=True: q and v biases)
    assert layer.layer_norm1.eps == 1e-6, seed  # :575; :430
    assert backbone.depth == 39, seed  # VideoChat :570 (depth=39); E.T. Chat :425 with idx -2 -> 40 - 2 + 1
    assert len(vit.encoder.layers) == 39, seed


def test_videochat_matches_create_eva_vit_g_gmhra_and_the_qformer(cache: Path) -> None:
    preset = _preset("videochat", cache)
    llm_dim = VICUNA_7B["hidden_size"]
    for modality in ("video", "image"):
        spec = preset.modalities[modality]  # type: ignore[index]
        enc = spec.encoder
        assert enc.config == {}  # the published architecture
        backbone = _eva(enc)
        _check_eva_g(backbone, seed="videochat")
        assert enc.select_feature == "cls_patch"  # eva_vit.py:484 (every token of the last block, CLS too)
        assert (backbone.tokens, enc.tokens, enc.dim) == (257, 257, 1408)
        # eva_vit.py:432: gmhra_layer_idx = [depth - 1 - i for i in range(8)] = blocks 38..31 (0-based)
        assert enc.taps == 8 and backbone.tap_layers == 8  # config_7b.json:22
        assert backbone.depth - backbone.tap_layers == 31
        assert enc.tokens_per_frame() == 8 * 257
        with torch.device("meta"):
            connector: Any = connector_from_spec(spec.connector, enc, llm_dim)
        q = connector.qformer.config
        assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size) == (
            768,
            12,
            12,
            3072,
        )  # blip2.py:51 (bert-base-uncased)
        assert q.cross_attention_frequency == 2  # blip2.py:55
        assert q.encoder_hidden_size == 1408  # videochat.py:88 (visual_encoder.num_features)
        assert tuple(connector.query_tokens.shape) == (1, 32, 768)  # config_7b.json:9
        assert tuple(connector.extra_query_tokens.shape) == (
            1,
            64,
            768,
        )  # config_7b.json:25; videochat.py:98-100
        assert (
            connector.num_tokens(8) == 96 == connector.num_tokens(1)
        )  # 32 + 64 per item, whatever the frames
        assert tuple(connector.ln_vision.normalized_shape) == (1408,)  # blip2.py:95
        assert _linear(connector.proj) == (768, llm_dim)  # videochat.py:133-135
        gmhra = connector.gmhra
        assert gmhra is not None and len(gmhra.layers) == 8  # config_7b.json:22
        g = gmhra.layers[0]
        assert g.attn.num_heads == 16  # eva_vit.py:440 (Global_MHRA(embed_dim, num_heads, ...))
        assert _linear(g.mlp.c_fc) == (1408, round(4.3637 * 1408))  # eva_vit.py:325 (round), :440 (mlp_ratio)
        assert g.mlp.dropout.p == 0.5  # config_7b.json:24
        assert tuple(g.dpe.weight.shape) == (1408, 1, 3, 3, 3)  # eva_vit.py:320 (depthwise 3x3x3)
        assert tuple(gmhra.cls_token.shape) == (1, 1, 1408)  # eva_vit.py:436
    assert preset.llm.architecture == "llama"


def test_etchat_matches_its_eva_qformer_compressor_and_matching_heads(cache: Path) -> None:
    preset = _preset("etchat", cache)
    spec = preset.modalities["video"]  # type: ignore[index]
    enc = spec.encoder
    assert enc.config == {}
    backbone = _eva(enc)
    assert enc.select_layer == -2  # scripts/train_stage_3.sh:19 (--vision_output_layer -2)
    _check_eva_g(backbone, seed="etchat")
    assert enc.select_feature == "patch"  # train_stage_3.sh:20; etchat_arch.py:112-113 (img_embed[:, 1:])
    assert (backbone.tokens, enc.tokens, enc.dim, enc.taps) == (256, 256, 1408, 0)
    sampling = enc.sampling
    assert sampling is not None and (sampling.fps, sampling.max_frames) == (
        1.0,
        350,
    )  # train_stage_3.sh:24, :33
    llm_dim = PHI3_MINI["hidden_size"]
    with torch.device("meta"):
        connector: Any = connector_from_spec(spec.connector, enc, llm_dim, tokenizer=())
        heads = TimestampHeads(llm_dim)
    q = connector.qformer.config
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    # etchat_arch.py:42 (bert-base-uncased), :39-40 + :48 (30522 + [DEC] = 30523 ids)
    assert q.vocab_size == 30523 and q.max_position_embeddings == 512
    assert q.cross_attention_frequency == 2  # etchat_arch.py:45
    assert q.encoder_hidden_size == 1408  # etchat_arch.py:43
    assert tuple(connector.query_tokens.shape) == (1, 32, 768)  # etchat_arch.py:49
    assert tuple(connector.ln_vision.normalized_shape) == (1408,)  # etchat_arch.py:51
    assert _linear(connector.qformer_proj) == (768, 1408)  # etchat_arch.py:53
    assert _linear(connector.q_proj[1]) == (1408, 1408)  # etchat_arch.py:54
    assert _linear(connector.k_proj[1]) == (1408, 1408)  # etchat_arch.py:55
    assert _linear(connector.v_proj[1]) == (1408, llm_dim)  # etchat_arch.py:56
    assert connector.max_text_tokens == 256  # etchat_arch.py:147 (max_length=256, truncation_side='left' :39)
    assert connector.num_tokens(350) == 350  # one LLM token per frame (etchat_arch.py:182 mean over queries)
    ts = preset.heads.timestamps
    assert ts is not None and (ts.token, ts.alpha) == ("<vid>", 2.0)  # constants.py:6; train_stage_3.sh:31
    assert ts.token in preset.llm.added_tokens
    for head in (heads.frm_head, heads.vid_head):  # etchat_arch.py:98-103
        assert tuple(head[0].normalized_shape) == (llm_dim,)
        assert _linear(head[1]) == (llm_dim, llm_dim // 2) and _linear(head[3]) == (llm_dim // 2, llm_dim)
    assert preset.llm.architecture == "phi3"  # train_stage_1.sh:12 (Phi-3-mini-4k-instruct)
    lora = preset.lora
    assert (lora.r, lora.alpha, lora.dropout) == (128, 256, 0.05)  # etchat/train/train.py:73-75
    assert lora.targets == ["qkv_proj", "o_proj"]  # train.py:268-270 (phi3, lora_type attention)


def test_eventgpt_matches_eventchatmodel(cache: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    preset = _preset("eventgpt", cache)
    spec = preset.modalities["event"]  # type: ignore[index]
    enc = spec.encoder
    # README.md:173: openai/clip-vit-large-patch14-336 (its config.json's vision_config below)
    clip = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    with torch.device("meta"):
        backbone = ClipVisionBackbone(
            CLIPVisionModel(clip), select_layer=enc.select_layer, select_feature=enc.select_feature
        )
    # EventChatModel.py:188 (outputs.last_hidden_state: the last layer, CLS kept, no post_layernorm)
    assert (enc.select_layer, enc.select_feature) == (-1, "cls_patch")
    assert (backbone.tokens, backbone.dim) == (enc.tokens, enc.dim) == (577, 1024)
    assert enc.sampling is not None and enc.sampling.event_frames == 5  # common/common.py:118
    llm_dim = VICUNA_7B["hidden_size"]
    with torch.device("meta"):
        connector: Any = connector_from_spec(spec.connector, enc, llm_dim)
    assert spec.connector.type == "event_adaptor"
    assert _linear(connector.fc1) == (
        1024,
        4096,
    )  # EventChatModel.py:67-69, :87-93 (mlp_depth 2: Linear, GELU, Linear)
    assert isinstance(connector.act, nn.GELU)  # EventChatModel.py:91
    assert _linear(connector.fc2) == (4096, 4096)  # EventChatModel.py:92
    assert _linear(connector.adaptor) == (4096, 4096)  # EventChatModel.py:76
    assert connector.num_tokens(5) == 5 + 577  # EventChatModel.py:27, :35-36 (frame means, then token means)
    assert preset.llm.architecture == "llama"


@pytest.mark.parametrize("name", ["pandagpt", "nextgpt", "etchat"])
def test_lora_targets_are_linear_layers_of_the_seed_llm(name: str, cache: Path) -> None:
    """The preset's LoRA targets name linear layers of the base LLM (built on the meta device at
    the base checkpoint's sizes): q/k/v/o_proj in each of Vicuna-7B's 32 layers, qkv_proj and
    o_proj in each of Phi-3-mini's 32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    preset = _preset(name, cache)
    arch = preset.llm.architecture
    config = AutoConfig.for_model(arch, **LLM_CONFIGS[arch])
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    expected = lora_expected(linear_shapes(lm), list(preset.lora.targets), preset.lora.r)
    assert len(expected) == 2 * len(preset.lora.targets) * 32
