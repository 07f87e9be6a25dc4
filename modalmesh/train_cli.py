"""The `modalmesh train` and `modalmesh data` commands.

    modalmesh train submit JOB.yaml [--wait] [--json]   validate and queue a job (and follow it)
    modalmesh train status JOB_ID [--json]             a job's state, progress and results
    modalmesh train list [--limit N] [--json]          recent jobs, most recent first
    modalmesh train cancel JOB_ID                      cancel a queued or running job
    modalmesh data synth OUT_DIR [--train N] ...       write the synthetic shapes dataset

Relative paths in a job file (datasets' `path` and `media_root`, `deepspeed.hostfile`) are
resolved against the file's folder before the job is submitted, since the workers do not run
in the caller's working folder. The trainer is imported only by the commands that use it.
Errors are modalmesh errors: `modalmesh.cli.main` prints them on one line and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.common.settings import Settings
    from services.trainer.client import TrainingClient
    from services.trainer.jobs import JobRecord

# flag -> (Settings field, type, help)
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--redis-url": ("redis_url", str, "Redis of the job store and queues (MODALMESH_REDIS_URL)"),
    "--cache-dir": ("cache_dir", Path, "where generated models live (MODALMESH_CACHE_DIR)"),
    "--presets-dir": ("presets_dir", Path, "extra folder searched for presets (MODALMESH_PRESETS_DIR)"),
}
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _say(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _add_flags(p: argparse.ArgumentParser) -> None:
    for flag, (_field, typ, help_text) in _FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_text)


def _settings(args: argparse.Namespace) -> Settings:
    from services.common.settings import Settings

    overrides = {
        field: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, (field, _t, _h) in _FLAGS.items()
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None
    }
    return Settings(**overrides)


def _client(args: argparse.Namespace) -> TrainingClient:
    from services.trainer.client import TrainingClient

    return TrainingClient(_settings(args))


# -- job files -----------------------------------------------------------------------------------


# -- output --------------------------------------------------------------------------------------


def _eta(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(progress: dict[str, Any]) -> str:
    """`step 12/370 epoch 0.32 loss 2.3100 812.3 samples/s ETA 4s`; missing parts are left out."""
    parts = []
    if progress.get("step") is not None:
        total = progress.get("total_steps")
        parts.append(f"step {progress['step']}/{total}" if total else f"step {progress['step']}")
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']:.2f}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("distance") is not None:  # stage 2: the output projectors' distance term
        parts.append(f"distance {progress['distance']:.4f}")
    if progress.get("samples_per_s") is not None:
        parts.append(f"{progress['samples_per_s']:.1f} samples/s")
    if progress.get("eta_s") is not None:
        parts.append(f"ETA {_eta(progress['eta_s'])}")
    return " ".join(parts)


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _published(record: JobRecord) -> str | None:
    pub = record.published
    if not pub:
        return None
    return str(pub.get("ref") or f"{pub.get('name')}@{pub.get('version')}")


def _describe(record: JobRecord) -> list[str]:
    spec = record.spec
    lines = [
        f"job {record.id}: {record.state} (queue {record.queue}, attempts {record.attempts})",
        f"  preset {spec.get('preset')}, {spec.get('stage')}; created {_when(record.created)}, "
        f"started {_when(record.started)}, finished {_when(record.finished)}",
    ]
    if record.progress:
        lines.append(f"  progress: {progress_line(record.progress)}")
    if record.resumed_from_step is not None:
        lines.append(f"  resumed from step {record.resumed_from_step}")
    for label, value in (
        ("checkpoint", record.checkpoint),
        ("bundle", record.bundle),
        ("published", _published(record)),
        ("metrics", json.dumps(record.metrics) if record.metrics else None),
        ("message", record.message),
        ("error", record.error),
    ):
        if value:
            lines.append(f"  {label}: {value}")
    return lines


def _print_json(data: Any) -> None:
    _say(json.dumps(data, indent=2))


# -- commands ------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from services.trainer.jobs import read_job_file

    spec = read_job_file(args.job)
    client = _client(args)
    record = client.submit(spec)
    if not args.wait:
        if args.json:
            _print_json(record.public())
        else:
            _say(f"submitted job {record.id} on queue {record.queue}")
        return EXIT_OK
    _say(f"submitted job {record.id} on queue {record.queue}", err=args.json)
    return follow(client, record.id, poll_s=args.poll, as_json=args.json)


def follow(client: TrainingClient, job_id: str, *, poll_s: float = 1.0, as_json: bool = False) -> int:
    """Print one line per progress update until the job ends; 0 if it SUCCEEDED, else 1.

    With `as_json` the lines go to stderr and the final record to stdout.
    """
    last_state, last_progress = "", None
    try:
        while True:
            record = client.get(job_id)
            if record.state != last_state:
                _say(
                    f"job {job_id}: {record.state}" + (f" ({record.message})" if record.message else ""),
                    err=as_json,
                )
                last_state = record.state
            if record.progress and record.progress != last_progress:
                _say(progress_line(record.progress), err=as_json)
                last_progress = record.progress
            if record.done:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _say(
            f"stopped following job {job_id}; it goes on (modalmesh train cancel {job_id} stops it)", err=True
        )
        return EXIT_INTERRUPTED
    if as_json:
        _print_json(record.public())
    elif record.state == "SUCCEEDED":
        published = _published(record)
        _say(f"published {published}" if published else f"bundle {record.bundle or '-'} (not published)")
    if record.error:
        _say(f"job {job_id} {record.state}: {record.error}", err=True)
    return EXIT_OK if record.state == "SUCCEEDED" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    record = _client(args).get(args.job_id)
    if args.json:
        _print_json(record.public())
    else:
        _say("\n".join(_describe(record)))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    records = _client(args).list(limit=args.limit)
    if args.json:
        _print_json([r.public() for r in records])
        return EXIT_OK
    if not records:
        _say("no training jobs")
        return EXIT_OK
    _say(f"{'ID':32s}  {'STATE':10s}  {'STAGE':6s}  {'PRESET':12s}  {'STEP':>11s}  CREATED")
    for r in records:
        step = r.progress.get("step")
        total = r.progress.get("total_steps")
        steps = "-" if step is None else f"{step}/{total}" if total else str(step)
        _say(
            f"{r.id:32s}  {r.state:10s}  {r.spec.get('stage', '-'):6s}  {r.spec.get('preset', '-'):12s}  "
            f"{steps:>11s}  {_when(r.created)}"
        )
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    record = _client(args).cancel(args.job_id)
    _say(f"job {record.id}: {record.state}" + (f" ({record.message})" if record.message else ""))
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from services.trainer.synth import synthesize

    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    output_preset = None
    if "t2x" in modalities:
        from services.common.presets import load_preset
        from services.models.tiny import ensure_generated

        settings = _settings(args)
        output_preset = load_preset(
            args.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir
        )
        ensure_generated(output_preset)
    report = synthesize(
        args.out_dir,
        train=args.train,
        heldout=args.heldout,
        seed=args.seed,
        image_size=args.image_size,
        modalities=modalities,
        output_preset=output_preset,
    )
    _say(
        f"wrote {report.train_images} training and {report.heldout_images} held-out images "
        f"under {report.out_dir / 'images'}"
    )
    _say(f"  {report.captions}  (format captions, stage1: {report.train_images} pairs)")
    _say(f"  {report.train}  (format llava, stage3: {report.train_samples} conversations)")
    _say(f"  {report.heldout}  (format llava, held-out questions with answers)")
    for name, media in report.media.items():
        _say(
            f"wrote {media.train_items} training and {media.heldout_items} held-out {name} files "
            f"under {report.out_dir / name}"
        )
        # the timestamps set is E.T. Instruct-style video data for the time-token heads
        fmt, modality = ("etinstruct", "video") if name == "timestamps" else ("llava", name)
        _say(f"  {media.captions}  (format captions, modality {modality}, stage1)")
        _say(f"  {media.train}  (format {fmt}, modality {modality}, stage3)")
        _say(f"  {media.heldout}  (format {fmt}, modality {modality}, held-out questions with answers)")
    if output_preset is not None:
        _say(
            f"wrote text-to-X captions and {sorted(output_preset.outputs)} caption embeddings under {report.out_dir / 't2x'}"
        )
        _say(f"  {report.out_dir / 't2x.jsonl'}  (format t2x, stage2)")
        _say(f"  {report.out_dir / 't2x_heldout.jsonl'}  (format t2x, held-out)")
    _say(f"  {report.meta}")
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """Add `train` and `data` to the `modalmesh` subcommands (`sub` from add_subparsers)."""
    train = sub.add_parser("train", help="submit, follow, list and cancel training jobs")
    actions = train.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="validate and queue a job from a YAML/JSON file")
    submit.add_argument("job", type=Path, help="the job file (YAML or JSON)")
    submit.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    submit.add_argument("--json", action="store_true", help="print the job record as JSON")
    submit.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --wait")
    submit.set_defaults(func=cmd_submit)
    status = actions.add_parser("status", help="a job's state, progress and results")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print the job record as JSON")
    status.set_defaults(func=cmd_status)
    listing = actions.add_parser("list", help="recent jobs, most recent first")
    listing.add_argument("--limit", type=_positive, default=20, help="at most this many jobs (default 20)")
    listing.add_argument("--json", action="store_true", help="print the job records as JSON")
    listing.set_defaults(func=cmd_list)
    cancel = actions.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)
    for p in (submit, status, listing, cancel):
        _add_flags(p)

    data = sub.add_parser("data", help="training data tools")
    data_actions = data.add_subparsers(dest="action", required=True)
    synth = data_actions.add_parser("synth", help="write the synthetic shapes dataset (images + JSON)")
    synth.add_argument("out_dir", type=Path)
    synth.add_argument("--train", type=int, default=600, help="training images (default 600)")
    synth.add_argument("--heldout", type=int, default=60, help="held-out images (default 60)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the training images (default 0)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    synth.add_argument(
        "--modalities",
        default="image",
        help="comma-separated, image plus any of video,audio,event,timestamps,t2x (timestamps: an "
        "E.T. Instruct-style video set for E.T. Chat's time token; t2x: text-to-X captions with "
        "--preset's decoder caption embeddings, stage-2 data; default image)",
    )
    synth.add_argument(
        "--preset", default="tiny-nextgpt", help="the preset whose decoders embed t2x captions"
    )
    synth.set_defaults(func=cmd_synth)
