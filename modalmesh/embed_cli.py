"""`modalmesh embed-captions`: a caption set -> the decoder's text-encoder embeddings (stage 2 data).

    modalmesh embed-captions --preset NAME --modality image|audio|video --captions FILE --out DIR
        [--batch-size N]

Loads the preset's decoder pipeline for that output modality once, encodes the captions in
batches with its own text encoder (NExT-GPT's process_embeddings.py) and writes
DIR/<name>.npy per record plus DIR/t2x.jsonl, the `format: t2x` dataset a stage-2 job names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `embed-captions` subcommand to the `modalmesh` parser (imports nothing heavy)."""
    p = sub.add_parser(
        "embed-captions",
        help="precompute a decoder's text-encoder embeddings of captions (stage-2 t2x data)",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    p.add_argument("--preset", required=True, help="preset name or YAML path (one with outputs)")
    p.add_argument("--modality", required=True, choices=["image", "audio", "video"], help="output modality")
    p.add_argument("--captions", required=True, type=Path, help='JSONL or JSON list of {"caption", "name"?}')
    p.add_argument("--out", required=True, type=Path, help="folder for <name>.npy and t2x.jsonl")
    p.add_argument(
        "--batch-size", type=_positive, default=None, help="captions per encoder call (default 32)"
    )
    p.add_argument("--device", default="cpu", help="where the text encoder runs (default cpu)")
    p.add_argument("--cache-dir", type=Path, default=None, help="MODALMESH_CACHE_DIR")
    p.add_argument("--presets-dir", type=Path, default=None, help="MODALMESH_PRESETS_DIR")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    """Run `modalmesh embed-captions`; errors are modalmesh errors (one line, exit 2)."""
    from services.common.presets import load_preset
    from services.common.settings import Settings
    from services.models.decoders.embed import (
        DEFAULT_BATCH,
        CaptionEmbedder,
        embed_captions,
        output_spec,
        read_captions,
    )
    from services.models.tiny import ensure_generated

    overrides = {k: getattr(args, k) for k in ("cache_dir", "presets_dir") if getattr(args, k) is not None}
    settings = Settings(**overrides)
    preset = load_preset(args.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    output_spec(preset, args.modality)  # refuse a modality the preset cannot produce before loading
    records = read_captions(args.captions)  # and a bad caption file
    ensure_generated(preset)
    embedder = CaptionEmbedder(preset, args.modality, device=args.device)
    report = embed_captions(embedder, records, args.out, batch_size=args.batch_size or DEFAULT_BATCH)
    sys.stdout.write(
        f"wrote {report.count} {args.modality} caption embeddings {report.shape} under {args.out}\n"
        f"  {report.dataset}  (format t2x, stage2)\n"
    )
    return 0
