"""E.T. Chat module fixtures: EVA-ViT-g (patch tokens of the selected block), the
instruction-aware Q-Former frame compressor (`compress_image_qformer`: InstructBLIP Q-Former,
attention pooling, projector; one token per frame) and the `frm_head` / `vid_head` matching
heads, run by ETBench's own `ETChatPhi3ForCausalLM` at reduced sizes.

    PYTHONPATH=/work/scratch/overlay-modules /work/scratch/venv/bin/python \\
        scripts/parity/etchat_modules.py --repo /path/to/ETBench

Needs transformers 4.44 (ETBench's requirements.txt pins 4.44.2; Phi-3, DynamicCache): an
overlay installed with `pip install --no-deps --target /work/scratch/overlay-modules
transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.24.6`.

`ETChatPhi3ForCausalLM(config)` (etchat/model/language_model/phi3.py) is built from a small
Phi-3 config with the stage-3 settings of scripts/train_stage_3.sh (eva_vit, patch tokens,
qformer projector, use_matching) and `vision_output_layer` VISION_LAYER (E.T. Chat's own rule:
depth = idx + 1 for idx >= 0). Its `encode_image(image, img_cnt, query, tag)` gives the
per-sample frame tokens, as infer_etbench.py calls it (`query=[[q]]`, tag None). Shims:
- `eva_vit.VisionTransformer` is built with EVA_WIDTH / EVA_HEADS / IMAGE px instead of the
  1408 / 16 / 224 that `EVAVisionTransformer` hard-codes (eva_vit.py:415-427), and its
  `hidden_size` property (eva_vit.py:453, the constant 1408) reads the tower's width;
- `BertTokenizer.from_pretrained('bert-base-uncased')` reads a local vocab (WORDS) and
  `BertConfig.from_pretrained('bert-base-uncased')` gives a small BERT config
  (etchat_arch.py:39-42); `[DEC]` is added and the embeddings resized as the seed does.

Writes tests/fixtures/parity/etchat/modules.{safetensors,json}; weights named as the seed's
state dict names them (`model.vision_tower.vision_tower.*`, `model.qformer_*`, `frm_head.*`,
`vid_head.*`; the Phi-3 left out); the JSON also holds the vocab and the queries.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _modules_common import bert_vocab, parse_args, patched, randn, randomize, state, versions, write_fixture

EVA_WIDTH, EVA_HEADS, IMAGE = 32, 4, 42  # seed: 1408, 16, 224 (patch 14 kept: 3 x 3 patches)
VISION_LAYER = 2  # -> 3 blocks (seed: -2 -> 39 of 40)
QFORMER = {  # seed: bert-base-uncased (+ [DEC])
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 512,
}
PHI3 = {
    "vocab_size": 64,
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
}
WORDS = [
    "what", "happens", "in", "the", "video", "when", "does", "man", "open", "door", "find", "moment",
    "current", "time", "s", ":", ".", "?", "0", "1", "2", "3",
]  # fmt: skip
QUERIES = [
    "When does the man open the door?",
    " ".join(["what happens in the video"] * 60) + " find the moment.",  # > 256 ids: truncated from the left
]
FRAMES = [3, 2]


def build(repo: Path, work: Path) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    sys.path.insert(0, str(repo))
    import etchat.model.etchat_arch as arch
    import etchat.model.vision_encoder.eva_vit as eva_vit
    from etchat.model.language_model.phi3 import ETChatPhi3Config, ETChatPhi3ForCausalLM
    from transformers import BertConfig, BertTokenizer

    vocab = bert_vocab(work / "bert", WORDS)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    class RecordingTokenizer(BertTokenizer):
        """The seed's tokenizer, recording what `compress_image_qformer` gets from it."""

        def __call__(self, *args: Any, **kw: Any) -> Any:
            out = super().__call__(*args, **kw)
            calls.append((out["input_ids"].clone(), out["attention_mask"].clone()))
            return out

    class LocalBertTokenizer:
        @staticmethod
        def from_pretrained(name: str, **kw: Any) -> Any:
            assert name == "bert-base-uncased", name
            return RecordingTokenizer(str(vocab / "vocab.txt"), **kw)

    class TinyBertConfig:
        @staticmethod
        def from_pretrained(name: str) -> Any:
            assert name == "bert-base-uncased", name
            return BertConfig(vocab_size=len(WORDS) + 5, **QFORMER)

    original_vit = eva_vit.VisionTransformer

    def tiny_vit(**kw: Any) -> Any:
        assert (kw["img_size"], kw["embed_dim"], kw["num_heads"]) == (224, 1408, 16), kw
        return original_vit(**{**kw, "img_size": IMAGE, "embed_dim": EVA_WIDTH, "num_heads": EVA_HEADS})

    config = ETChatPhi3Config(
        **PHI3,
        vision_tower="eva_vit",
        vision_processor="clip_center_224",
        vision_output_layer=VISION_LAYER,
        vision_output_token="patch",
        mm_projector="qformer",
        use_matching=True,
        use_time_tag=False,
        bi_attention=False,
        alpha=2.0,
    )
    with (
        patched(eva_vit, "VisionTransformer", tiny_vit),
        patched(
            eva_vit.EVAVisionTransformer, "hidden_size", property(lambda self: self.vision_tower.embed_dim)
        ),
        patched(arch, "BertTokenizer", LocalBertTokenizer),
        patched(arch, "BertConfig", TinyBertConfig),
    ):
        model = ETChatPhi3ForCausalLM(config)
    return model.float().eval(), calls


def main() -> None:
    args = parse_args("etchat", __doc__)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, calls = build(args.repo, Path(tmp))
    tower = model.model.vision_tower.vision_tower
    assert len(tower.blocks) == VISION_LAYER + 1
    randomize(model, gen)

    image = randn(
        gen, sum(FRAMES), 3, IMAGE, IMAGE
    )  # frames of both samples, as prepare_multimodal_data cats them
    heads_in = randn(gen, 2, 5, PHI3["hidden_size"])
    inputs: dict[str, torch.Tensor] = {"frames": image, "heads": heads_in}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        outputs["vision_tower"] = model.model.vision_tower(image)  # (F, 1 + N, D): CLS + patches
        per_sample = model.encode_image(
            image, img_cnt=FRAMES, query=[[q] for q in QUERIES], tag=[None] * len(FRAMES)
        )
        outputs["frm_head"] = model.frm_head(heads_in)
        outputs["vid_head"] = model.vid_head(heads_in)
    assert len(calls) == len(QUERIES)
    for i, (emb, (ids, mask)) in enumerate(zip(per_sample, calls, strict=True)):
        outputs[f"sample{i}.frames"] = emb  # (1, T_i, hidden)
        inputs[f"sample{i}.input_ids"] = ids
        inputs[f"sample{i}.attention_mask"] = mask
    assert calls[1][0].shape[1] == 256, calls[1][0].shape  # the long query hit max_length=256

    notes = {
        "vision_tower": {
            "from": "etchat/model/vision_encoder/eva_vit.py EVAVisionTransformer.forward (CLS + patches)"
        },
        "frm_head": {"from": "etchat/model/etchat_arch.py ETChatMetaForCausalLM.post_init frm_head"},
        "vid_head": {"from": "etchat/model/etchat_arch.py ETChatMetaForCausalLM.post_init vid_head"},
    } | {
        f"sample{i}.frames": {
            "from": "etchat/model/etchat_arch.py encode_image -> compress_image_qformer (query=[[q]], tag None)",
            "frames": FRAMES[i],
            "query": q if len(q) < 80 else q[:60] + "...",
        }
        for i, q in enumerate(QUERIES)
    }
    weights = state(model, skip=("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))
    write_fixture(
        args,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
        record={
            "seed": "E.T. Chat (ETBench etchat)",
            "repo": "ETBench",
            "versions": versions("torch", "transformers", "tokenizers"),
            "sizes": {
                "eva_width": EVA_WIDTH,
                "eva_heads": EVA_HEADS,
                "eva_mlp": int(EVA_WIDTH * 4.3637),
                "image_size": IMAGE,
                "patch": 14,
                "vision_output_layer": VISION_LAYER,
                "qformer": {**QFORMER, "vocab_size": len(WORDS) + 6, "cross_attention_freq": 2},
                "num_query_tokens": 32,
                "max_text_tokens": 256,
                "llm_hidden": PHI3["hidden_size"],
                "frames": FRAMES,
            },
            "vocab": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS],
            "added_tokens": {"bos_token": "[DEC]"},
            "queries": QUERIES,
            "shims": [
                f"eva_vit.VisionTransformer built with img_size {IMAGE}, embed_dim {EVA_WIDTH}, num_heads "
                f"{EVA_HEADS} instead of EVAVisionTransformer's 224, 1408, 16 (eva_vit.py:415-427); "
                "EVAVisionTransformer.hidden_size reads the tower's width (eva_vit.py:453)",
                "etchat_arch.BertTokenizer / BertConfig .from_pretrained('bert-base-uncased') -> a local "
                "vocab and a small BertConfig (etchat_arch.py:39-42); [DEC] added and embeddings resized "
                "by the seed's code",
            ],
            "weight_files": {
                "E.T. Chat model folder (merged; pytorch_model.safetensors of a partial save)": (
                    "model.qformer_*, frm_head.*, vid_head.*"
                ),
                "model.vision_tower.vision_tower.*": "E.T. Chat's EVA (from eva_vit_g.pth, frozen)",
            },
            "outputs": notes,
        },
    )


if __name__ == "__main__":
    main()
