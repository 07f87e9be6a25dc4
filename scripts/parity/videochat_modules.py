"""VideoChat module fixtures: EVA-ViT-g cut at the penultimate block with Global MHRA taps,
ln_vision, the BLIP-2 Q-Former with extra queries and `llama_proj`, run by VideoChat's own
`VideoChat` class (video_chat/models/videochat.py) at reduced sizes.

    /work/scratch/venv/bin/python scripts/parity/videochat_modules.py --repo /path/to/Ask-Anything

`VideoChat(config)` is built from a config shaped like configs/config_7b.json (no_lmhra,
temporal_downsample off, gmhra_dropout 0.5, fp32 ViT, frozen Q-Former) with small sizes; its
`encode_img` gives the outputs, on a video (B, T, 3, H, W) and on an image (B, 1, 3, H, W) as
conversation.py passes them. Shims, each only around what the sizes need or what is fetched
from the hub:
- `eva_vit.VisionTransformer` is built with EVA_WIDTH / EVA_HEADS / EVA_DEPTH instead of the
  1408 / 16 / 39 that `create_eva_vit_g` hard-codes (eva_vit.py:569-571); its mlp_ratio 4.3637,
  patch 14, qkv bias, LayerNorm eps and Global MHRA wiring are the seed's;
- `BertConfig.from_pretrained("bert-base-uncased")` (blip2.py:51) returns a small BERT config;
  `BertTokenizer.from_pretrained` reads a local vocab (the tokenizer is not used by encode_img);
- the LLaMA tokenizer is a stub (not used by encode_img); the LLaMA is a tiny local folder
  built with the seed's own modeling_llama.py;
- `q_former_model_path` is an empty {'model': {}} file: the Q-Former keeps the random weights
  given below.

Writes tests/fixtures/parity/videochat/modules.{safetensors,json}; weights named as VideoChat's
state dict names them (`visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, `query_tokens`,
`extra_query_tokens`, `llama_proj.*`; the LLaMA left out).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _modules_common import bert_vocab, parse_args, patched, randn, randomize, state, versions, write_fixture

EVA_WIDTH, EVA_HEADS, EVA_DEPTH = 32, 4, 4  # seed: 1408, 16, 39 (of EVA-g's 40 blocks)
IMAGE = 42  # px (config img_size; seed 224): a 3 x 3 patch grid + CLS = 10 tokens
GMHRA_LAYERS = 2  # seed 8
QFORMER = {  # seed: bert-base-uncased
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}
NUM_QUERY, EXTRA_QUERY = 4, 3  # seed 32 + 64
LLM_HIDDEN = 24
BATCH, FRAMES = 2, 3
WORDS = [f"w{i}" for i in range(QFORMER["vocab_size"] - 5)]


def build(repo: Path, work: Path) -> Any:
    sys.path.insert(0, str(repo / "video_chat"))
    import models.blip2 as blip2
    import models.eva_vit as eva_vit
    import models.videochat as videochat
    from models.modeling_llama import LlamaForCausalLM
    from transformers import BertConfig, BertTokenizer, LlamaConfig

    vocab = bert_vocab(work / "bert", WORDS)
    llama_dir = work / "llama"
    llama_cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=LLM_HIDDEN,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    LlamaForCausalLM(llama_cfg).save_pretrained(llama_dir)
    qformer_ckpt = work / "blip2_empty.pth"
    torch.save({"model": {}}, qformer_ckpt)

    original_vit = eva_vit.VisionTransformer

    def tiny_vit(**kw: Any) -> Any:
        assert (kw["embed_dim"], kw["depth"], kw["num_heads"]) == (1408, 39, 16), kw
        return original_vit(**{**kw, "embed_dim": EVA_WIDTH, "depth": EVA_DEPTH, "num_heads": EVA_HEADS})

    class TinyBertConfig:
        @staticmethod
        def from_pretrained(name: str) -> BertConfig:
            assert name == "bert-base-uncased"
            return BertConfig(**QFORMER)

    class LocalBertTokenizer:
        @staticmethod
        def from_pretrained(name: str, **kw: Any) -> Any:
            return BertTokenizer(str(vocab / "vocab.txt"), **kw)

    class StubLlamaTokenizer:
        eos_token = "</s>"

        @classmethod
        def from_pretrained(cls, path: str, use_fast: bool = False) -> Any:
            return cls()

    config = {  # configs/config_7b.json, small
        "vit_model": "eva_clip_g",
        "vit_model_path": None,
        "q_former_model_path": str(qformer_ckpt),
        "llama_model_path": str(llama_dir),
        "videochat_model_path": "",
        "img_size": IMAGE,
        "num_query_token": NUM_QUERY,
        "drop_path_rate": 0.0,
        "use_grad_checkpoint": False,
        "vit_precision": "fp32",
        "freeze_vit": True,
        "freeze_mhra": False,
        "freeze_qformer": True,
        "low_resource": False,
        "max_txt_len": 320,
        "temporal_downsample": False,
        "no_lmhra": True,
        "double_lmhra": False,
        "lmhra_reduction": 2.0,
        "gmhra_layers": GMHRA_LAYERS,
        "gmhra_drop_path_rate": 0.0,
        "gmhra_dropout": 0.5,
        "extra_num_query_token": EXTRA_QUERY,
    }
    with (
        patched(eva_vit, "VisionTransformer", tiny_vit),
        patched(blip2, "BertConfig", TinyBertConfig),
        patched(blip2, "BertTokenizer", LocalBertTokenizer),
        patched(videochat, "LlamaTokenizer", StubLlamaTokenizer),
    ):
        model = videochat.VideoChat(config)
    return model.float().eval()


def main() -> None:
    args = parse_args("videochat", __doc__)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.repo, Path(tmp))
    vit = model.visual_encoder
    assert len(vit.blocks) == EVA_DEPTH and vit.gmhra_layer_idx == list(
        range(EVA_DEPTH - 1, EVA_DEPTH - 1 - GMHRA_LAYERS, -1)
    )
    randomize(model, gen)

    inputs = {
        "video": randn(gen, BATCH, FRAMES, 3, IMAGE, IMAGE),  # (B, T, C, H, W) as upload_video
        "image": randn(gen, 1, 1, 3, IMAGE, IMAGE),  # (1, 1, C, H, W) as upload_img
    }
    taps: list[torch.Tensor] = []
    hooks = [
        vit.blocks[i].register_forward_hook(lambda _m, _a, out: taps.append(out.detach().clone()))
        for i in sorted(vit.gmhra_layer_idx)
    ]
    outputs: dict[str, torch.Tensor] = {}
    notes: dict[str, Any] = {}
    with torch.no_grad():
        for name, pixels in inputs.items():
            taps.clear()
            b, t = pixels.shape[:2]
            z = vit(pixels.permute(0, 2, 1, 3, 4))  # what encode_img feeds ln_vision: (B, T*N + 1, C)
            outputs[f"{name}.eva_taps"] = torch.stack(taps, 1).reshape(b, t, len(taps), *taps[0].shape[1:])
            outputs[f"{name}.visual_encoder"] = z
            inputs_llama, _ = model.encode_img(pixels)
            outputs[f"{name}.inputs_llama"] = inputs_llama
            notes[f"{name}.eva_taps"] = {
                "from": "video_chat/models/eva_vit.py VisionTransformer blocks[gmhra_layer_idx] outputs "
                "(forward hooks), as (B, T, K, N, C), blocks in order"
            }
            notes[f"{name}.visual_encoder"] = {
                "from": "video_chat/models/eva_vit.py VisionTransformer.forward_features: "
                "cat(last block's tokens of every frame, Global MHRA token)"
            }
            notes[f"{name}.inputs_llama"] = {"from": "video_chat/models/videochat.py VideoChat.encode_img"}
    for h in hooks:
        h.remove()

    weights = state(model, skip=("llama_model.",))
    write_fixture(
        args,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
        record={
            "seed": "VideoChat (Ask-Anything video_chat)",
            "repo": "Ask-Anything",
            "versions": versions("torch", "transformers", "timm"),
            "sizes": {
                "eva_width": EVA_WIDTH,
                "eva_heads": EVA_HEADS,
                "eva_depth": EVA_DEPTH,
                "eva_full_depth": EVA_DEPTH + 1,
                "eva_mlp": int(EVA_WIDTH * 4.3637),
                "gmhra_mlp": round(EVA_WIDTH * 4.3637),
                "image_size": IMAGE,
                "patch": 14,
                "gmhra_layers": GMHRA_LAYERS,
                "qformer": QFORMER,
                "cross_attention_freq": 2,
                "num_query_token": NUM_QUERY,
                "extra_num_query_token": EXTRA_QUERY,
                "llm_hidden": LLM_HIDDEN,
            },
            "shims": [
                f"eva_vit.VisionTransformer built with embed_dim {EVA_WIDTH}, depth {EVA_DEPTH}, num_heads "
                f"{EVA_HEADS} instead of create_eva_vit_g's 1408, 39, 16 (eva_vit.py:569-571)",
                "blip2.BertConfig.from_pretrained('bert-base-uncased') -> a small BertConfig (blip2.py:51)",
                "blip2.BertTokenizer and videochat.LlamaTokenizer read a local vocab / a stub (hub "
                "downloads; encode_img uses neither)",
                "llama_model_path: a tiny folder saved by the seed's modeling_llama.LlamaForCausalLM",
            ],
            "weight_files": {
                "videochat .pth {'model': ...}": "every key here (VideoChat's state dict without llama_model.*)",
            },
            "outputs": notes,
        },
    )


if __name__ == "__main__":
    main()
