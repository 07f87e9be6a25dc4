"""`modalmesh add-tokens`: a base LLM folder -> the preset's LLM folder, holding its new tokens.

    modalmesh add-tokens SRC --preset NAME [--out DIR] [--special] [--init mean|normal]
        [--seed N] [--rows-from PATH ...]

Adds each of the preset's `llm.added_tokens` that the tokenizer of SRC does not hold yet,
grows the embeddings, and writes the result to the preset's `llm.checkpoint` (or --out).
The new rows start at the mean of the existing rows, or N(0, initializer_range) with --init
normal; --rows-from takes the trained embedding matrices of a seed checkpoint instead
(E.T. Chat's and LLaVA's deltas hold them). Run it before `modalmesh import`: bundles are
fingerprinted with the LLM folder they are imported against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `add-tokens` subcommand to the `modalmesh` parser (imports nothing heavy)."""
    p = sub.add_parser(
        "add-tokens",
        help="write the preset's LLM folder: a base model plus the preset's new tokens",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    p.add_argument("src", type=Path, metavar="SRC", help="the base model's Hugging Face folder")
    p.add_argument("--preset", required=True, help="preset name or YAML path (its llm.added_tokens)")
    p.add_argument(
        "--out", type=Path, default=None, help="folder to write (default: the preset's llm.checkpoint)"
    )
    p.add_argument(
        "--special",
        action="store_true",
        help="add them as special tokens (E.T. Chat); default plain (NExT-GPT)",
    )
    p.add_argument("--init", choices=["mean", "normal"], default="mean", help="new rows (default mean)")
    p.add_argument("--seed", type=int, default=0, help="seed of --init normal (default 0)")
    p.add_argument(
        "--rows-from", type=Path, nargs="+", default=None, metavar="PATH",
        help="seed checkpoint file(s) or folder whose embed_tokens/lm_head matrices to use",
    )  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=None, help="MODALMESH_CACHE_DIR")
    p.add_argument("--presets-dir", type=Path, default=None, help="MODALMESH_PRESETS_DIR")
    p.set_defaults(func=cmd_add_tokens)


def cmd_add_tokens(args: argparse.Namespace) -> int:
    """Run `modalmesh add-tokens`; errors are modalmesh errors (one line, exit 2)."""
    from transformers.utils import logging as hf_logging

    from services.common.errors import InvalidArgumentError
    from services.common.presets import load_preset
    from services.common.settings import Settings
    from services.models.lm.tokens import add_tokens

    hf_logging.disable_progress_bar()
    overrides = {k: getattr(args, k) for k in ("cache_dir", "presets_dir") if getattr(args, k) is not None}
    settings = Settings(**overrides)
    preset = load_preset(args.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    if not preset.llm.added_tokens:
        raise InvalidArgumentError(f"preset {preset.name}: expected llm.added_tokens to add, got none")
    report = add_tokens(
        args.src,
        args.out or preset.llm.checkpoint,
        list(preset.llm.added_tokens),
        special=args.special,
        init=args.init,
        seed=args.seed,
        rows_from=args.rows_from,
    )
    sys.stdout.write("\n".join(report.lines()) + "\n")
    return 0
