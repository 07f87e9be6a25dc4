"""E.T. Chat's modules against the seed's own outputs (tests/fixtures/parity/etchat/modules.*).

The fixture (scripts/parity/etchat_modules.py) ran ETBench's `ETChatPhi3ForCausalLM` at reduced
sizes on random weights: EVA-ViT-g cut after block `vision_output_layer` (E.T. Chat's depth
rule) with the CLS token dropped, `encode_image` -> `compress_image_qformer` (the
instruction-aware Q-Former reading ln'd patches and the user's query, `qformer_proj`,
attention pooling over the raw patches, `qformer_v_proj`: one LLM token per frame) for two
samples (one query truncated from the left at 256 ids), and the `frm_head` / `vid_head`
matching heads.

Here: EVA from a `model.vision_tower.vision_tower.`-prefixed file through the encoder service's
loader; the Q-Former tokenizer written from the fixture's vocab (+ `[DEC]`) and read by the
connector as a preset names it; the `model.qformer_*` tensors renamed by the importer's
`etchat` key map into the LLM service's connector loader; `frm_head` / `vid_head` stored under
the bundle head `timestamps` as the importer writes them and read by the LLM service's loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from services.models.backbones.build import build_backbone
from services.models.checkpoints.importers import LAYOUTS, read_state_dict
from services.models.lm.loading import load_connectors
from services.models.lm.timestamps import HEAD_NAME, load_timestamp_heads
from tests.helpers.module_parity import (
    assert_matches,
    load_fixture,
    preset_from_dict,
    save_seed_file,
    shipped_preset_dict,
)

FIX = load_fixture("etchat")
SIZES = FIX.meta["sizes"]
Q = SIZES["qformer"]
EVA_PREFIX = "model.vision_tower.vision_tower."
BUFFERS = {"qformer.embeddings.position_ids"}  # LAVIS BERT's persistent buffer, no parameter of ours


def _tokenizer_folder(folder: Path) -> Path:
    """bert-base-uncased + [DEC] as E.T. Chat builds it (etchat_arch.py build_mm_projector), at
    the fixture's vocab."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(FIX.meta["vocab"]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), truncation_side="left")
    tokenizer.add_special_tokens(FIX.meta["added_tokens"])
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("etchat")
    eva_file = save_seed_file(tmp / "etchat_vision_tower.pth", FIX.weights_under(EVA_PREFIX))
    raw = shipped_preset_dict("etchat")
    video = raw["modalities"]["video"]
    video["encoder"] = {
        **video["encoder"],
        "checkpoint": str(eva_file),
        "config": {
            "num_layers": SIZES["vision_output_layer"] + 2,
            "width": SIZES["eva_width"],
            "heads": SIZES["eva_heads"],
            "mlp_dim": SIZES["eva_mlp"],
            "image_size": SIZES["image_size"],
            "patch_size": SIZES["patch"],
        },
        "select_layer": SIZES["vision_output_layer"],  # E.T. Chat's rule for idx >= 0: depth = idx + 1
        "tokens": (SIZES["image_size"] // SIZES["patch"]) ** 2,
        "dim": SIZES["eva_width"],
        "dtype": "float32",
    }
    assert video["encoder"]["select_feature"] == "patch"  # the shipped value
    connector = {k: v for k, v in video["connector"].items() if k != "base"}  # every tensor from the release
    connector["tokenizer"] = str(_tokenizer_folder(tmp / "qformer_tokenizer"))
    connector["qformer"] = {
        "width": Q["hidden_size"],
        "layers": Q["num_hidden_layers"],
        "heads": Q["num_attention_heads"],
        "mlp_dim": Q["intermediate_size"],
        "cross_attention_every": Q["cross_attention_freq"],
        "num_query_tokens": SIZES["num_query_tokens"],
        "vocab_size": Q["vocab_size"],
        "max_text_positions": Q["max_position_embeddings"],
        "max_text_tokens": SIZES["max_text_tokens"],
    }
    video["connector"] = connector
    preset = preset_from_dict(raw, tmp)

    # etchat_trainer.py's partial save (pytorch_model.safetensors); a merged folder holds the same names
    release_file = tmp / "pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in FIX.weights.items()}, str(release_file))
    release = read_state_dict(release_file)
    layout = LAYOUTS["etchat"]
    rename = layout.connector["instruct_qformer"]
    skipped = tuple(prefix for prefix, _why in layout.skip)
    renamed = {
        rename.target(k): v
        for k, v in release.items()
        if k.startswith("model.qformer_") and not k.startswith(skipped)
    }
    assert set(renamed) & BUFFERS == BUFFERS
    trained = {k: v for k, v in renamed.items() if k not in BUFFERS}
    (name,) = set(preset.connector_names().values())
    hidden = SIZES["llm_hidden"]
    return {
        "backbone": build_backbone(preset.modalities["video"].encoder, modalities=("video",), device="cpu"),
        "connector": load_connectors(preset, {name: trained}, llm_dim=hidden, dtype=torch.float32)[name],
        "heads": {f"{HEAD_NAME}.{k}": v for k, v in release.items() if k.startswith(layout.heads)},
    }


def test_eva_gives_the_seeds_patch_tokens(setup) -> None:  # type: ignore[no-untyped-def]
    ours = setup["backbone"].encode("video", FIX.inputs["frames"])  # (F, N, D): patches only
    assert_matches("etchat eva patches", ours, FIX.outputs["vision_tower"][:, 1:])


@pytest.mark.parametrize("sample", [0, 1])
def test_instruction_is_tokenized_as_the_seed(setup, sample: int) -> None:  # type: ignore[no-untyped-def]
    ids, mask = setup["connector"].encode_instructions([FIX.meta["queries"][sample]])
    assert ids.tolist() == FIX.inputs[f"sample{sample}.input_ids"].tolist()
    assert mask.tolist() == FIX.inputs[f"sample{sample}.attention_mask"].tolist()


@pytest.mark.parametrize("sample", [0, 1])
def test_frames_to_one_llm_token_each_as_compress_image_qformer(setup, sample: int) -> None:  # type: ignore[no-untyped-def]
    counts = SIZES["frames"]
    start = sum(counts[:sample])
    pixels = FIX.inputs["frames"][start : start + counts[sample]]
    features = setup["backbone"].encode("video", pixels)[None]  # (1, T, N, D), as the encoder service
    instruction = (FIX.inputs[f"sample{sample}.input_ids"], FIX.inputs[f"sample{sample}.attention_mask"])
    with torch.no_grad():
        ours = setup["connector"](features.clone(), instruction)  # (1, T, hidden)
    assert_matches(f"etchat frame compressor sample {sample}", ours, FIX.outputs[f"sample{sample}.frames"])


def test_matching_heads_are_the_seeds(setup) -> None:  # type: ignore[no-untyped-def]
    heads = load_timestamp_heads(setup["heads"], hidden_size=SIZES["llm_hidden"])
    x = FIX.inputs["heads"]
    with torch.no_grad():
        assert_matches("etchat frm_head", heads.keys(x), FIX.outputs["frm_head"])
        assert_matches("etchat vid_head", heads.queries(x), FIX.outputs["vid_head"])
