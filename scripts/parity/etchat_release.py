"""The key layout of E.T. Chat's full model folder, from the seed's own model class.

Builds `ETChatPhi3ForCausalLM` (etchat/model/language_model/phi3.py) at reduced sizes (a 2-layer
Phi-3, a 2-layer BERT Q-Former, one EVA block) with the stage-3 flags (`use_matching`,
`bi_attention`) and records the names of its `state_dict()`: what `gather_and_save_model`
(etchat/train/etchat_trainer.py:187-205) saves with `--save_full_model True` (LoRA merged, so
no LoRA names; persistent buffers included). tests/unit/parity/test_etchat_release.py checks
that the release our tests write (tests/helpers/releases.py) has exactly these names.

Run in the scratch environment with transformers 4.44 (E.T. Chat's version):

    PYTHONPATH=/work/scratch/overlay-<name> /work/scratch/venv/bin/python \
        scripts/parity/etchat_release.py --repo /work/seeds/ETBench

It needs `bert-base-uncased` (the seed reads its config and vocabulary by that name): a tiny
stand-in folder of that name is written into a temporary working directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "etchat" / "release.json"
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
PHI3 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _bert_stand_in(folder: Path) -> None:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(507)]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    config = {"model_type": "bert", "vocab_size": len(words), "max_position_embeddings": 64, **BERT}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="the ETBench checkout (never committed)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    import torch
    import transformers
    from etchat.model.language_model.phi3 import ETChatPhi3Config, ETChatPhi3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        _bert_stand_in(Path(tmp) / "bert-base-uncased")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            config = ETChatPhi3Config(
                **PHI3, num_key_value_heads=2, vocab_size=600, pad_token_id=0, bos_token_id=1, eos_token_id=2
            )
            # train.py:408 writes the model arguments into the config; vision_output_layer 0 builds
            # one EVA block (the script's -2 builds 39 at width 1408: the same names, block by block)
            config.update(
                {"vision_tower": "eva_vit", "vision_output_layer": 0, "vision_output_token": "patch",
                 "mm_projector": "qformer", "use_matching": True, "bi_attention": True}
            )  # fmt: skip
            model = ETChatPhi3ForCausalLM(config)
        finally:
            os.chdir(cwd)
    names = sorted(model.state_dict())
    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    record = {
        "what": "state_dict() names of ETChatPhi3ForCausalLM: the keys of a --save_full_model folder",
        "seed": "ETBench (PolyU-ChenLab/ETBench)",
        "seed_commit": commit,
        "made_by": "scripts/parity/etchat_release.py --repo <ETBench checkout>",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sizes": {"phi3": PHI3, "bert": BERT, "eva_blocks": 1},
        "names": names,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    sys.stdout.write(f"wrote {args.out}: {len(names)} names\n")


if __name__ == "__main__":
    main()
