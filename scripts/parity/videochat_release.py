"""What VideoChat's checkpoint pickle names, from the seed's own config, optimizer and scheduler.

video_chat/tasks/train.py:180-203 saves {"model", "optimizer", "scheduler", "scaler", "config",
"epoch", "global_step"}. This script builds those objects with the seed's own code: the run
config from its stage-2 script through `utils.config.Config` (an EasyDict), the optimizer
with `utils.optimizer.create_optimizer`, the scheduler with `utils.scheduler.create_scheduler`,
over a stand-in module with one trainable Linear, one frozen Linear and one persistent buffer
(the state dict is filtered as train.py:183-190 does), saves them with `torch.save` and
records the globals the pickle names (read with pickletools, nothing unpickled) and the
top-level keys. tests/unit/parity/test_videochat_release.py checks the release our tests
write (tests/helpers/releases.py) against it, and that the importer's allow-list covers it.

    /work/scratch/venv/bin/python scripts/parity/videochat_release.py --repo /work/seeds/Ask-Anything
"""

from __future__ import annotations

import argparse
import json
import pickletools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "videochat" / "release.json"


def pickle_globals(path: Path) -> list[str]:
    """The GLOBAL opcodes of a torch zip checkpoint's data.pkl, as module.name."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return sorted(
        {str(arg).replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repo", type=Path, required=True, help="the Ask-Anything checkout (never committed)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root = args.repo.resolve() / "video_chat"
    sys.path.insert(0, str(root))
    import torch
    import transformers
    from utils.config import Config
    from utils.optimizer import create_optimizer
    from utils.scheduler import create_scheduler

    script = root / "scripts" / "config_7b_stage2.py"
    sys.argv = ["train.py", str(script), "output_dir", "out"]
    config = Config.get_config()
    model = torch.nn.Module()
    model.llama_proj = torch.nn.Linear(4, 4)
    model.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    model.register_buffer("inv_freq", torch.arange(2.0))
    config.scheduler.num_training_steps, config.scheduler.num_warmup_steps = 10, 1
    optimizer = create_optimizer(config.optimizer, model)
    scheduler = create_scheduler(config.scheduler, optimizer)
    model.llama_proj(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    trainable = {k: v.requires_grad for k, v in model.named_parameters()}
    state = model.state_dict()  # an OrderedDict; the frozen parameters deleted from it, buffers kept
    for k in [k for k in state if not trainable.get(k, True)]:
        del state[k]
    # an enabled GradScaler's state (fp16 = True in the config); this machine has no CUDA to make one
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    save_obj = {
        "model": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler,
        "config": config, "epoch": 0, "global_step": 10,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(save_obj, Path(tmp) / "ckpt_latest.pth")
        globals_ = pickle_globals(Path(tmp) / "ckpt_latest.pth")
    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    record = {
        "what": "globals and top-level keys of a VideoChat checkpoint pickle (tasks/train.py:180-203)",
        "seed": "Ask-Anything (OpenGVLab/Ask-Anything), video_chat/",
        "seed_commit": commit,
        "made_by": "scripts/parity/videochat_release.py --repo <Ask-Anything checkout>",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config_class": f"{type(config).__module__}.{type(config).__qualname__}",
        "top_level_keys": sorted(save_obj),
        "model_keys": sorted(state),
        "globals": globals_,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    sys.stdout.write(f"wrote {args.out}: globals {globals_}\n")


if __name__ == "__main__":
    main()
