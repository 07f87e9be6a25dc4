"""The shared training loop's pure parts: the batch schedule (sharding, coverage, resume),
collation, the DeepSpeed config, the precision rule, the progress log and checkpoint pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from services.trainer import loop
from services.trainer.jobs import parse_job
from services.trainer.loop import (
    MediaInExample,
    Progress,
    Schedule,
    TimeInExample,
    TrainExample,
    collate,
    deepspeed_config,
    use_bf16,
)
from services.trainer.runconfig import RunConfig


def run_config(tmp_path: Path, *, hyperparameters: Any = None, **deepspeed: Any) -> RunConfig:
    spec = parse_job(
        {
            "preset": "tiny",
            "stage": "stage1",
            "datasets": [{"format": "captions", "path": str(tmp_path / "caps.jsonl")}],
            "hyperparameters": hyperparameters or {},
            "deepspeed": deepspeed,
        }
    )
    return RunConfig(
        job_id="j",
        spec=spec,
        job_dir=tmp_path / "job",
        cache_dir=tmp_path,
        adapter_name="tiny",
        init_bundle=tmp_path / "bundle",
    )


# -- Schedule -------------------------------------------------------------------------------------


def step_batches(n: int, step: int, *, world: int, micro: int, accum: int, seed: int = 7) -> list[list[int]]:
    """Every micro-batch of optimizer step `step`, over all ranks."""
    out = []
    for rank in range(world):
        out += Schedule(n, world=world, rank=rank, micro=micro, accum=accum, seed=seed).micro_batches(step)
    return out


def test_ranks_get_disjoint_full_micro_batches_within_a_step() -> None:
    batches = step_batches(50, 0, world=3, micro=2, accum=4)
    assert len(batches) == 3 * 4
    assert all(len(b) == 2 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) == 3 * 2 * 4
    assert all(0 <= i < 50 for i in flat)


@pytest.mark.parametrize(("n", "world", "micro", "accum"), [(24, 2, 3, 2), (29, 2, 2, 3), (8, 1, 8, 1)])
def test_an_epoch_covers_each_sample_at_most_once_and_drops_only_the_remainder(
    n: int, world: int, micro: int, accum: int
) -> None:
    sched = Schedule(n, world=world, rank=0, micro=micro, accum=accum, seed=1)
    global_batch = world * micro * accum
    assert sched.steps_per_epoch == n // global_batch
    for epoch in range(2):
        seen = [
            i
            for step in range(epoch * sched.steps_per_epoch, (epoch + 1) * sched.steps_per_epoch)
            for b in step_batches(n, step, world=world, micro=micro, accum=accum, seed=1)
            for i in b
        ]
        assert len(seen) == len(set(seen)) == sched.steps_per_epoch * global_batch
        if n % global_batch == 0:
            assert sorted(seen) == list(range(n))


def test_each_epoch_is_a_new_permutation() -> None:
    sched = Schedule(12, world=1, rank=0, micro=12, accum=1, seed=3)
    first, second = sched.micro_batches(0)[0], sched.micro_batches(1)[0]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second


def test_the_order_is_a_function_of_seed_and_step_so_a_resumed_run_sees_the_same_batches() -> None:
    kw: dict[str, Any] = {"world": 2, "rank": 1, "micro": 2, "accum": 2}
    first_run = Schedule(40, seed=11, **kw)
    seen = [
        first_run.micro_batches(step) for step in range(12)
    ]  # 5 steps an epoch: epochs 0, 1 and part of 2
    resumed = Schedule(40, seed=11, **kw)  # a fresh process that starts at step 7
    assert [resumed.micro_batches(step) for step in range(7, 12)] == seen[7:]
    assert resumed.micro_batches(2) == seen[2]  # going back to an earlier epoch too
    other_seed = Schedule(40, seed=12, **kw)
    assert [other_seed.micro_batches(s) for s in range(12)] != seen


def test_a_data_set_smaller_than_one_global_batch_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"has 11 usable samples, fewer than one global batch of 12 \(2 ranks"
    ):
        Schedule(11, world=2, rank=0, micro=3, accum=2, seed=0)
    Schedule(12, world=2, rank=0, micro=3, accum=2, seed=0)  # exactly one batch is enough


# -- collate --------------------------------------------------------------------------------------


def test_collate_right_pads_masks_and_keeps_media_positions() -> None:
    feats_a, feats_b, feats_c = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 16)
    examples = [
        TrainExample(
            input_ids=[5, 6, 7], labels=[-100, 6, 7], media=[MediaInExample(0, 1, "image", feats_a)]
        ),
        TrainExample(
            input_ids=[1, 2, 3, 4, 9],
            labels=[-100, -100, -100, 4, 9],
            media=[MediaInExample(1, 1, "image", feats_b), MediaInExample(3, 1, "audio", feats_c, "hi")],
            times=[TimeInExample(4, 1, 2.5, True)],
        ),
        TrainExample(input_ids=[8], labels=[8], media=[]),
    ]
    batch = collate(examples, pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9], [8, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, -100],
        [-100, -100, -100, 4, 9],
        [8, -100, -100, -100, -100],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    media = batch["media"]
    assert [(m.row, m.start, m.modality) for m in media] == [
        (0, 0, "image"),
        (1, 1, "image"),
        (1, 3, "audio"),
    ]
    assert all(torch.equal(m.features, f) for m, f in zip(media, (feats_a, feats_b, feats_c), strict=True))
    assert [m.instruction for m in media] == ["", "", "hi"]
    [time] = batch["times"]  # its media index is into the batch's media list
    assert (time.row, time.position, time.media, time.frame, time.supervised) == (1, 4, 2, 2.5, True)


def test_collate_pads_with_the_given_pad_id() -> None:
    batch = collate(
        [TrainExample([1], [1], []), TrainExample([1, 2, 3], [1, 2, 3], [])],
        pad_id=63,
        device=torch.device("cpu"),
    )
    assert batch["input_ids"][0].tolist() == [1, 63, 63]


# -- deepspeed_config and precision ---------------------------------------------------------------


def test_zero2_config_sizes_the_global_batch_and_has_no_stage3_settings(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, hyperparameters={"micro_batch_size": 4, "grad_accum": 3, "max_grad_norm": 0.5})
    ds = deepspeed_config(cfg, world=2, bf16=False)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (
        4,
        3,
        24,
    )
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("stage3_") for k in ds["zero_optimization"])
    json.dumps(ds)  # DeepSpeed takes it as plain JSON


def test_zero3_config_gathers_16bit_weights_on_save_and_bf16_follows_the_flag(tmp_path: Path) -> None:
    ds = deepspeed_config(run_config(tmp_path, zero_stage=3), world=4, bf16=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_param_persistence_threshold"] == 0
    assert ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 8 * 1 * 4


@pytest.mark.parametrize(
    ("precision", "cuda", "bf16_supported", "expected"),
    [
        ("bf16", False, False, True),  # asked for: used even where it is not detected
        ("fp32", True, True, False),
        ("auto", False, True, False),  # no GPU: fp32
        ("auto", True, False, False),  # a GPU without bf16 (e.g. V100)
        ("auto", True, True, True),
    ],
)
def test_use_bf16(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    cuda: bool,
    bf16_supported: bool,
    expected: bool,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert use_bf16(run_config(tmp_path, precision=precision)) is expected


# -- progress log and checkpoint pruning ----------------------------------------------------------


def test_progress_appends_json_lines_only_when_enabled(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    Progress(path, enabled=False).emit("start", step=0)
    assert not path.exists()
    progress = Progress(path, enabled=True)
    progress.emit("start", step=0, total_steps=4)
    progress.emit("step", step=1, loss=1.25)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("step", 1)]
    assert events[0]["total_steps"] == 4 and events[1]["loss"] == 1.25
    assert all(isinstance(e["time"], float) for e in events)


def test_prune_keeps_the_newest_checkpoints_by_step_number(tmp_path: Path) -> None:
    for step in (2, 9, 10, 100):
        (tmp_path / f"step{step}").mkdir()
    (tmp_path / "latest").write_text("step100")
    loop._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step10", "step100"]
