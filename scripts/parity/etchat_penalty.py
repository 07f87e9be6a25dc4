"""Golden outputs of the repetition penalty: Hugging Face's processor and E.T. Chat's own.

Runs in the scratch environment against a checkout of the seed (never committed):

    /work/scratch/venv/bin/python scripts/parity/etchat_penalty.py --repo /path/to/ETBench \\
        --out tests/fixtures/parity/etchat

E.T. Chat's `RepetitionPenaltyLogitsProcessor` (etchat/utils/inference.py) penalises every id
of the prompt and the reply except its media placeholder -200 and the match token `<vid>`;
Hugging Face's penalises every id. On fixed logits and ids (prompt then reply, the prompt with
-200 where E.T. Chat's video goes) this writes both processors' outputs; the test
tests/unit/parity/test_etchat_penalty.py checks `services.llm.sampling` against each: with no
skipped positions or ids against Hugging Face's (on the ids without -200), and with the
expanded media span and `<vid>` skipped against E.T. Chat's.

Writes penalty.safetensors (per case: logits, ids, both outputs) and penalty.json (the cases,
the versions and the seed commit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 40
MATCH_TOKEN = 37  # stands for <vid>
MEDIA = -200  # E.T. Chat's IMAGE_TOKEN_INDEX
# (prompt ids, reply ids, penalty): the prompt holds the media placeholder and sometimes <vid>
# (E.T. Bench's `vid` tasks write it in the question); ids repeat, the reply repeats the prompt.
CASES = [
    ([1, 5, 6, MEDIA, 7, 8, 9], [10, 5, 11], 1.2),
    ([1, MEDIA, 3, 4, MATCH_TOKEN, 4, 12], [MATCH_TOKEN, 13, 3, MATCH_TOKEN], 1.2),
    ([2, 3, MEDIA, 3, 20, 21, 22, 23], [], 1.5),
    ([1, 14, MEDIA, 15, MATCH_TOKEN, 16], [17, 17, 18, 0, 39], 0.8),
    ([MEDIA, 25, 26, 27, 28, 29, 30, 31, 32, 33], [26, MATCH_TOKEN, 34], 3.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of the ETBench repository")
    parser.add_argument("--out", type=Path, required=True, help="tests/fixtures/parity/etchat")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    import transformers
    from etchat.utils.inference import RepetitionPenaltyLogitsProcessor as ETChatPenalty
    from transformers import RepetitionPenaltyLogitsProcessor as HFPenalty

    gen = torch.Generator().manual_seed(15)
    tensors, cases = {}, []
    for i, (prompt, reply, penalty) in enumerate(CASES):
        ids = torch.tensor([prompt + reply])  # (1, L)
        logits = torch.randn(1, VOCAB, generator=gen) * 3  # (1, V) both signs
        etchat = ETChatPenalty(penalty, MATCH_TOKEN)(ids.clone(), logits.clone())
        plain = ids[ids != MEDIA][None]  # Hugging Face's processor cannot gather -200
        hf = HFPenalty(penalty)(plain.clone(), logits.clone())
        tensors |= {
            f"case{i}.logits": logits,
            f"case{i}.ids": ids[0],
            f"case{i}.etchat": etchat[0],
            f"case{i}.hf_ids": plain[0],
            f"case{i}.hf": hf[0],
        }
        cases.append({"prompt_len": len(prompt), "penalty": penalty})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out / "penalty.safetensors"))
    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    meta = {
        "made_by": "scripts/parity/etchat_penalty.py --repo <ETBench checkout> --out tests/fixtures/parity/etchat",
        "seed": "ETBench (E.T. Chat)",
        "seed_commit": commit,
        "seed_module": "etchat/utils/inference.py RepetitionPenaltyLogitsProcessor",
        "reference": "transformers RepetitionPenaltyLogitsProcessor",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "vocab": VOCAB,
        "match_token_id": MATCH_TOKEN,
        "media_token_id": MEDIA,
        "cases": cases,
    }
    (args.out / "penalty.json").write_text(json.dumps(meta, indent=2) + "\n")
    sys.stdout.write(f"wrote {len(cases)} cases to {args.out}\n")


if __name__ == "__main__":
    main()
