"""`modalmesh import`: a seed system's release, as its save code writes it -> a modalmesh adapter bundle.

    modalmesh import SYSTEM PATH [PATH ...] [--preset NAME] [--out DIR] [--version V] [--name N]
                     [--llm-out DIR] [--base-out FILE]

SYSTEM is pandagpt, nextgpt, videochat, llava, etchat or eventgpt (a bundle for the preset:
connector + LoRA + heads, fingerprinted with the preset's LLM folder), or blip2-qformer /
instructblip-qformer (the frozen Q-Former base file a qformer / instruct_qformer connector
names as `base:`). An E.T. Chat full model folder also becomes the preset's LLM folder
(--llm-out) and its connector base (--base-out). The preset defaults to the system's own (llava
has none: pass --preset); the bundle goes to the preset's adapter folder, or its sibling folder
V with --version, or --out. Keys or shapes that do not fit the preset are listed by the seed's
names, expected against got, and nothing is written. docs/importing.md lists each release format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.errors import InvalidArgumentError

SYSTEM_HELP = {
    "pandagpt": "folder or pytorch_model.pt (llama_proj + PEFT LoRA; agent.py:49-63)",
    "nextgpt": "folder or pytorch_model.pt (llama_proj, LoRA, output projectors; agent.py:71-95)",
    "videochat": "ckpt_*.pth ({'model', 'optimizer', 'scheduler', 'scaler', 'config': EasyDict, ...})",
    "llava": "mm_projector.bin or non_lora_trainables.bin (+ PEFT adapter beside it)",
    "etchat": "full model folder (-> LLM folder + Q-Former base + bundle), adapter folder, or both",
    "eventgpt": "EventGPT-7b folder (model_type EventChat_llama) or .bin files",
    "blip2-qformer": "LAVIS BLIP-2 .pth -> the qformer connector's frozen base file",
    "instructblip-qformer": "LAVIS InstructBLIP .pth -> the instruct_qformer connector's frozen base file",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `import` subcommand to the `modalmesh` parser."""
    p = sub.add_parser(
        "import",
        help="convert a seed system's released checkpoint into an adapter bundle",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="systems:\n" + "\n".join(f"  {k:20s} {v}" for k, v in SYSTEM_HELP.items()),
    )
    p.add_argument("system", choices=list(SYSTEM_HELP), metavar="SYSTEM", help=", ".join(SYSTEM_HELP))
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="checkpoint file(s) or folder")
    p.add_argument("--preset", default=None, help="preset name or YAML path (default: the system's)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (blip2-qformer: the base file)")
    p.add_argument("--version", default=None, help="bundle version (default: the preset adapter's)")
    p.add_argument("--name", default=None, help="adapter name (default: the preset adapter's)")
    p.add_argument(
        "--llm-out",
        type=Path,
        default=None,
        help="etchat full folder: the LLM folder (default: llm.checkpoint)",
    )
    p.add_argument(
        "--base-out",
        type=Path,
        default=None,
        help="etchat full folder: the Q-Former base (default: connector base)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="MODALMESH_CACHE_DIR")
    p.add_argument("--presets-dir", type=Path, default=None, help="MODALMESH_PRESETS_DIR")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    """Run `modalmesh import`; errors are modalmesh errors (printed on one line, exit 2)."""
    from services.common.presets import load_preset
    from services.common.settings import Settings
    from services.models.checkpoints import importers

    overrides = {k: getattr(args, k) for k in ("cache_dir", "presets_dir") if getattr(args, k) is not None}
    settings = Settings(**overrides)
    preset_name = args.preset or importers.DEFAULT_PRESETS.get(args.system)
    if preset_name is None:
        raise InvalidArgumentError(f"modalmesh import {args.system}: expected --preset (no default preset)")
    preset = load_preset(preset_name, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    if args.system in importers.BASE_LAYOUTS:
        if args.llm_out is not None or args.base_out is not None:
            raise InvalidArgumentError(
                f"modalmesh import {args.system}: --llm-out and --base-out are for etchat; pass --out FILE"
            )
        report = importers.import_qformer_base(args.system, args.paths, preset, args.out)
    else:
        out = args.out or importers.default_output(preset, args.version)
        report = importers.import_checkpoint(
            args.system, args.paths, preset, out, version=args.version, name=args.name,
            llm_out=args.llm_out, base_out=args.base_out,
        )  # fmt: skip
    sys.stdout.write("\n".join(report.lines()) + "\n")
    return 0
