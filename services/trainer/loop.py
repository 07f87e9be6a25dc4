"""The DeepSpeed training loop every recipe shares: sharding, steps, progress, checkpoints,
resume and cooperative cancel.

The batch order is a pure function of (seed, step): each epoch is a seeded permutation of the
samples, cut into global batches of world x micro_batch x grad_accum; rank r takes its slice.
A resumed run therefore continues exactly where the checkpoint left off without storing any
data-loader state. Rank 0 appends progress to `progress.jsonl` (the worker tails it) and
checks the cancel sentinel file, broadcasting the decision so every rank stops at the same
step boundary.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from services.models.lm.model import MediaInBatch
from services.models.lm.training import TimeInBatch, TrainingModel
from services.models.lm.training_outputs import SignalInBatch
from services.trainer.runconfig import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaInExample:
    """One media item of an example: its span in the example's ids, modality, features and the
    text it may read. `collate` places it in a batch as a `MediaInBatch` (the same, plus the
    row; the *InExample / *InBatch pairs of times and signals likewise)."""

    start: int
    length: int
    modality: str
    features: torch.Tensor  # (frames * tokens_per_frame, D_in)
    instruction: str = ""


@dataclass(frozen=True)
class TimeInExample:
    """One time token of an example: position, the item it names, its true frame position."""

    position: int
    media: int  # index into the example's media
    frame: float
    supervised: bool


@dataclass(frozen=True)
class SignalInExample:
    """The caption embedding an example's signal tokens are aligned to (NExT-GPT stage 2)."""

    modality: str
    target: torch.Tensor  # (n_out, D_out)


@dataclass(frozen=True)
class TrainExample:
    """One encoded sample: ids, labels (-100 = not supervised), its media, its time tokens and
    the caption embedding of its signal tokens."""

    input_ids: list[int]
    labels: list[int]
    media: list[MediaInExample]
    times: list[TimeInExample] = field(default_factory=list)
    signal: SignalInExample | None = None


@dataclass
class FitResult:
    completed: bool
    cancelled: bool
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def deepspeed_config(cfg: RunConfig, *, world: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for this job (ZeRO-2 or ZeRO-3; bf16 or fp32)."""
    hp, ds = cfg.spec.hyperparameters, cfg.spec.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if ds.zero_stage == 3:
        zero |= {
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
        }
    return {
        "train_micro_batch_size_per_gpu": hp.micro_batch_size,
        "gradient_accumulation_steps": hp.grad_accum,
        "train_batch_size": hp.micro_batch_size * hp.grad_accum * world,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def use_bf16(cfg: RunConfig) -> bool:
    precision = cfg.spec.deepspeed.precision
    if precision != "auto":
        return precision == "bf16"
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def collate(examples: Sequence[TrainExample], pad_id: int, device: torch.device) -> dict[str, Any]:
    """Right-pad a micro-batch; media items keep their (row, span start)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    media: list[MediaInBatch] = []
    times: list[TimeInBatch] = []
    signals: list[SignalInBatch] = []
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
        first = len(media)
        media += [
            MediaInBatch(row, m.start, m.length, m.modality, m.features.to(device), m.instruction)
            for m in e.media
        ]
        times += [TimeInBatch(row, t.position, first + t.media, t.frame, t.supervised) for t in e.times]
        if e.signal is not None:
            signals.append(SignalInBatch(row, e.signal.modality, e.signal.target.to(device)))
    batch: dict[str, Any] = {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
        "media": media,
        "times": times,
    }
    if signals:
        batch["signals"] = signals
    return batch


class Schedule:
    """Which samples each rank trains on at each optimizer step."""

    def __init__(self, n: int, *, world: int, rank: int, micro: int, accum: int, seed: int) -> None:
        self.n, self.world, self.rank, self.micro, self.accum, self.seed = n, world, rank, micro, accum, seed
        self.global_batch = world * micro * accum
        if n < self.global_batch:
            raise ValueError(
                f"the data set has {n} usable samples, fewer than one global batch of {self.global_batch} "
                f"({world} ranks x micro_batch_size {micro} x grad_accum {accum})"
            )
        self.steps_per_epoch = n // self.global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def micro_batches(self, step: int) -> list[list[int]]:
        """For optimizer step `step` (0-based), this rank's `accum` micro-batches of indices."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        base = within * self.global_batch
        out = []
        for a in range(self.accum):
            start = base + (a * self.world + self.rank) * self.micro
            out.append(order[start : start + self.micro].tolist())
        return out


class Progress:
    """Rank 0's progress log (JSON lines) and its rate/ETA arithmetic."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": time.time(), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info("%s %s", event, json.dumps(fields))


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(
        (p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name.removeprefix("step"))
    )
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def fit(
    cfg: RunConfig,
    model: torch.nn.Module,
    param_groups: list[dict[str, Any]],
    examples: Sequence[TrainExample],
    *,
    pad_id: int,
    on_start: Callable[[], dict[str, Any]] | None = None,
) -> tuple[Any, FitResult]:
    """Train `model` on `examples` under DeepSpeed; returns the engine and how it ended."""
    import deepspeed

    hp = cfg.spec.hyperparameters
    world, rank = dist.get_world_size(), dist.get_rank()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    bf16 = use_bf16(cfg)
    sched = Schedule(
        len(examples), world=world, rank=rank, micro=hp.micro_batch_size, accum=hp.grad_accum, seed=hp.seed
    )
    total = hp.max_steps or hp.epochs * sched.steps_per_epoch
    warmup = int(total * hp.warmup_ratio)

    def lr_lambda(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world=world, bf16=bf16),
        dist_init_required=False,
    )
    progress = Progress(cfg.progress_path, enabled=rank == 0)
    start_step = 0
    ckpt_dir = cfg.checkpoint_dir
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir), load_module_strict=False)
        start_step = int((client or {}).get("step", 0))
        logger.info("resumed from %s at step %s", ckpt_dir, start_step)
    first_loss: float | None = None
    losses: list[float] = []
    part_names = model.part_names if isinstance(model, TrainingModel) else ()  # loss parts to log
    part_series: dict[str, list[float]] = {name: [] for name in part_names}
    progress.emit(
        "start",
        step=start_step,
        total_steps=total,
        resumed_from_step=start_step or None,
        world_size=world,
        steps_per_epoch=sched.steps_per_epoch,
        samples=len(examples),
        bf16=bf16,
        **(on_start() if on_start else {}),
    )
    started = time.perf_counter()
    step = start_step
    cancelled = False
    while step < total:
        step_loss = 0.0
        step_parts = [0.0] * len(part_names)
        for idx in sched.micro_batches(step):
            batch = collate([examples[i] for i in idx], pad_id, device)
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            step_loss += float(loss.detach()) / hp.grad_accum
            parts = engine.module.parts if part_names else {}
            step_parts = [v + parts[n] / hp.grad_accum for v, n in zip(step_parts, part_names, strict=True)]
        step += 1
        flags = torch.tensor(
            [step_loss, float(rank == 0 and cfg.cancel_path.exists()), *step_parts], device=device
        )
        dist.all_reduce(flags)  # sum of losses (and loss parts); any rank's cancel
        mean_loss = float(flags[0]) / world
        cancelled = bool(flags[1] > 0)
        means = {n: float(v) / world for n, v in zip(part_names, flags[2:].tolist(), strict=True)}
        for n, v in means.items():
            part_series[n].append(v)
        losses.append(mean_loss)
        first_loss = mean_loss if first_loss is None else first_loss
        if step % hp.log_every == 0 or step == total or cancelled:
            elapsed = time.perf_counter() - started
            done = step - start_step
            rate = done * sched.global_batch / elapsed if elapsed > 0 else 0.0
            progress.emit(
                "step",
                step=step,
                total_steps=total,
                epoch=round(step / sched.steps_per_epoch, 3),
                loss=round(mean_loss, 5),
                lr=scheduler.get_last_lr()[-1],
                samples_per_s=round(rate, 2),
                eta_s=round(elapsed / done * (total - step), 1),
                **{n: round(v, 5) for n, v in means.items()},
            )
        if cancelled:
            break
        if step % hp.checkpoint_every == 0 and step < total:
            engine.save_checkpoint(
                str(ckpt_dir), tag=f"step{step}", client_state={"step": step}, exclude_frozen_parameters=True
            )
            if rank == 0:
                _prune(ckpt_dir, hp.keep_checkpoints)
                progress.emit("checkpoint", step=step, path=str(ckpt_dir / f"step{step}"))
    tail = losses[-min(len(losses), 10) :] or [float("nan")]
    metrics = {
        "loss_first": first_loss if first_loss is not None else float("nan"),
        "loss_last10": sum(tail) / len(tail),
        "steps": float(step),
        "seconds": time.perf_counter() - started,
    }
    for n, series in part_series.items():  # e.g. distance_first, distance_last10
        if series:
            last = series[-min(len(series), 10) :]
            metrics |= {f"{n}_first": series[0], f"{n}_last10": sum(last) / len(last)}
    if cancelled:
        progress.emit("cancelled", step=step)
    return engine, FitResult(
        completed=not cancelled and step >= total, cancelled=cancelled, step=step, metrics=metrics
    )
