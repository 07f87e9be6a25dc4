"""The trainer for real: a private Redis, Celery workers, DeepSpeed with 2 ranks on CPU (gloo).

Each test submits jobs the way users do (TrainingClient, or the Celery task by name) and
follows them through the job store. Jobs are small (64 synthetic samples) so that a run is a
few seconds of training after about 10 s of start-up.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import Settings
from services.trainer.jobs import TASK_NAME, JobRecord
from tests.helpers.procs import Process, start_process, wait_until
from tests.helpers.services import start_redis

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.trainer.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, train=64, heldout=8, seed=3)
    return out


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, url = start_redis(tmp_path / "redis")
    try:
        yield url
    finally:
        proc.kill_group()


@pytest.fixture()
def settings(redis_url: str, tiny_cache_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        cache_dir=tiny_cache_dir,
        jobs_dir=tmp_path / "jobs",
        artifact_dir=tmp_path / "artifacts",
    )


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "MODALMESH_REDIS_URL": settings.redis_url,
        "MODALMESH_CACHE_DIR": str(settings.cache_dir),
        "MODALMESH_JOBS_DIR": str(settings.jobs_root()),
        "MODALMESH_ARTIFACT_DIR": str(settings.artifact_root()),
        "MODALMESH_LOG_JSON": "false",
        "MODALMESH_TRAINER_LEASE_S": "4",
        "MODALMESH_TRAINER_RECOVER_INTERVAL_S": "1",
        "MODALMESH_TRAINER_CANCEL_GRACE_S": "8",
        **extra,
    }


def start_worker(settings: Settings, log: Path, **extra: str) -> Process:
    proc = start_process(
        [sys.executable, "-m", "services.trainer"], log_path=log, env=worker_env(settings, **extra)
    )
    wait_until(lambda: " ready." in proc.log_text(), timeout=60, what="the trainer worker", proc=proc)
    return proc


@pytest.fixture()
def worker(settings: Settings, tmp_path: Path) -> Iterator[Process]:
    proc = start_worker(settings, tmp_path / "worker.log")
    try:
        yield proc
    finally:
        proc.kill_group()


def client(settings: Settings):  # -> TrainingClient
    from services.trainer.client import TrainingClient

    return TrainingClient(settings)


def job(data: Path, stage: str = "stage1", **hyper: Any) -> dict[str, Any]:
    datasets = (
        [{"format": "captions", "path": str(data / "captions.json")}]
        if stage == "stage1"
        else [{"format": "llava", "path": str(data / "train.json")}]
    )
    return {
        "preset": "tiny",
        "stage": stage,
        "datasets": datasets,
        "hyperparameters": {"micro_batch_size": 8, "checkpoint_every": 10, **hyper},
        "deepspeed": {"world_size": 2, "zero_stage": 2},
    }


def wait_state(
    settings: Settings, job_id: str, states: set[str], *, timeout: float, proc: Process | None = None
) -> JobRecord:
    c = client(settings)

    def reached() -> JobRecord | None:
        record = c.get(job_id)
        return record if record.state in states else None

    return wait_until(reached, timeout=timeout, interval=0.3, what=f"job {job_id} in {states}", proc=proc)


def wait_step(settings: Settings, job_id: str, step: int, *, timeout: float) -> JobRecord:
    c = client(settings)

    def reached() -> JobRecord | None:
        record = c.get(job_id)
        if record.done:
            raise AssertionError(f"job {job_id} ended ({record.state}: {record.error}) before step {step}")
        return record if record.progress.get("step", 0) >= step else None

    return wait_until(
        reached,
        timeout=timeout,
        interval=0.2,
        what=f"job {job_id} at step {step}",
    )


def group_gone(pgid: int) -> bool:
    from services.common.procenv import group_alive

    return not group_alive(pgid)


def test_stage1_through_the_queue_lowers_the_loss_and_publishes(
    settings: Settings, worker: Process, data: Path
) -> None:
    from services.common.adapter_registry import AdapterRegistry
    from services.models.checkpoints.bundle import load_bundle

    record = client(settings).submit(job(data, epochs=6, lr=2e-3))
    assert record.state == "QUEUED" and record.queue == "train.cpu"
    done = wait_state(settings, record.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=worker)
    assert done.state == "SUCCEEDED", done.error
    assert done.progress["step"] == done.progress["total_steps"] == 6 * 64 // 16
    assert {"loss", "samples_per_s", "eta_s", "epoch"} <= set(done.progress)
    assert done.metrics["loss_last10"] < done.metrics["loss_first"] - 0.1
    assert done.published is not None and done.published["version"] == "2"
    registry = AdapterRegistry.from_url(settings.redis_url)
    assert registry.current("tiny") == "2"
    bundle = load_bundle(Path(done.published["path"]))
    assert bundle.manifest["stage"] == "stage1" and bundle.version == "2"
    assert done.data_report and done.data_report["kept"] == 64
    assert "step 24/24" in worker.log_text()  # progress reaches the worker log


def test_stage3_zero3_mixed_text_only_batches_lora_bundle(
    settings: Settings, worker: Process, data: Path
) -> None:
    """Text-only samples mixed with image samples, micro-batch 1: ranks see different modalities."""
    import json

    mixed = json.loads((data / "train.json").read_text())[:16]
    for i in range(0, 16, 3):  # every third sample text-only
        mixed[i] = {"id": f"text{i}", "conversations": [
            {"from": "human", "value": "What is the sky?"}, {"from": "gpt", "value": "The sky is blue."}]}  # fmt: skip
    path = data / "mixed.json"
    path.write_text(json.dumps(mixed))
    spec = job(data, "stage3", epochs=2, micro_batch_size=1)
    spec["datasets"] = [{"format": "llava", "path": str(path)}]
    spec["deepspeed"]["zero_stage"] = 3
    record = client(settings).submit(spec)
    done = wait_state(settings, record.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=worker)
    assert done.state == "SUCCEEDED", done.error
    bundle = Path(done.published["path"])  # type: ignore[index]
    assert (bundle / "lora" / "adapter_config.json").is_file()
    assert (bundle / "lora" / "adapter_model.safetensors").is_file()


def test_killed_worker_job_is_redelivered_and_resumes(settings: Settings, data: Path, tmp_path: Path) -> None:
    first = start_worker(settings, tmp_path / "worker1.log")
    try:
        record = client(settings).submit(job(data, max_steps=400, checkpoint_every=20))
        running = wait_step(settings, record.id, 45, timeout=180)
        pgid = running.pgid
        assert pgid is not None
    finally:
        first.kill_group()  # the worker dies (SIGKILL), as on a node failure
    wait_until(lambda: group_gone(pgid), timeout=15, what="the ranks of the killed worker to exit")
    second = start_worker(settings, tmp_path / "worker2.log")
    try:
        done = wait_state(settings, record.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=second)
    finally:
        second.kill_group()
    assert done.state == "SUCCEEDED", done.error
    assert done.attempts == 2
    assert done.resumed_from_step is not None and done.resumed_from_step >= 20
    assert "resumed from" in (Path(done.job_dir) / "train.log").read_text()  # type: ignore[arg-type]


def test_cancel_stops_every_rank_within_seconds(settings: Settings, worker: Process, data: Path) -> None:
    c = client(settings)
    record = c.submit(job(data, max_steps=5000))
    running = wait_step(settings, record.id, 5, timeout=180)
    assert running.pgid is not None
    started = time.monotonic()
    assert c.cancel(record.id).state == "CANCELLING"
    done = wait_state(settings, record.id, {"CANCELLED", "FAILED", "SUCCEEDED"}, timeout=30)
    assert done.state == "CANCELLED"
    wait_until(lambda: group_gone(running.pgid), timeout=10, what="every rank to exit")  # type: ignore[arg-type]
    assert time.monotonic() - started < 20
    assert done.published is None


def test_queued_job_cancelled_never_runs(settings: Settings, data: Path, tmp_path: Path) -> None:
    c = client(settings)  # no worker yet: the job stays queued, and the revoke reaches nobody
    record = c.submit(job(data))
    assert c.cancel(record.id).state == "CANCELLED"
    worker = start_worker(settings, tmp_path / "worker.log")  # it receives the message now
    try:
        wait_until(lambda: record.id in worker.log_text(), timeout=30, what="the worker to see the job")
        time.sleep(1)
    finally:
        worker.kill_group()
    assert c.get(record.id).state == "CANCELLED"
    assert not (settings.jobs_root() / record.id).exists()


def test_redis_restart_mid_job_still_records_the_result(
    settings: Settings, worker: Process, data: Path, tmp_path: Path
) -> None:
    record = client(settings).submit(job(data, max_steps=500, checkpoint_every=50))
    wait_step(settings, record.id, 20, timeout=180)
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    import redis

    redis.Redis.from_url(settings.redis_url).shutdown(nosave=True)  # every key is lost
    time.sleep(3)
    proc, _ = start_redis(tmp_path / "redis2", port=port)
    try:
        done = wait_state(settings, record.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=worker)
        assert done.state == "SUCCEEDED", done.error
        assert done.published is not None
    finally:
        proc.kill_group()


def test_task_sent_by_name_from_plain_celery(settings: Settings, worker: Process, data: Path) -> None:
    from celery import Celery

    sender = Celery(broker=settings.redis_url)
    good = sender.send_task(TASK_NAME, kwargs={"job": job(data, epochs=1)}, queue="train.cpu")
    bad = sender.send_task(
        TASK_NAME, kwargs={"job": {**job(data), "preset": "no-such-preset"}}, queue="train.cpu"
    )
    done = wait_state(settings, good.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=worker)
    assert done.state == "SUCCEEDED", done.error
    failed = wait_state(settings, bad.id, {"FAILED"}, timeout=60, proc=worker)
    assert failed.error is not None and "no-such-preset" in failed.error


def test_bad_samples_fail_the_job_with_counts(
    settings: Settings, worker: Process, data: Path, tmp_path: Path
) -> None:
    import json

    rows = json.loads((data / "captions.json").read_text())[:32]
    for row in rows[:8]:
        row["image"] = "images/missing.png"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(rows))
    spec = job(data)
    spec["datasets"] = [{"format": "captions", "path": str(path), "media_root": str(data)}]
    record = client(settings).submit(spec)
    done = wait_state(settings, record.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=worker)
    assert done.state == "FAILED"
    assert "8 of 32" in (done.error or "") and "media_missing" in (done.error or "")


def test_worker_survives_sigterm_of_nothing(worker: Process) -> None:
    """A worker with no job stops cleanly on SIGTERM (warm shutdown)."""
    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: not worker.alive(), timeout=30, what="the worker to stop")


# -- every tiny twin: a short stage-1 run on its modalities (2 DeepSpeed ranks, CPU, gloo) ---------

# Per twin, the synthetic caption files of its modalities (`synthesize(modalities=...)`).
TWIN_CAPTIONS = {
    "tiny-pandagpt": [
        ("captions.json", "image"),
        ("captions_video.json", "video"),
        ("captions_audio.json", "audio"),
    ],
    "tiny-nextgpt": [
        ("captions.json", "image"),
        ("captions_video.json", "video"),
        ("captions_audio.json", "audio"),
    ],
    "tiny-videochat": [("captions.json", "image"), ("captions_video.json", "video")],
    "tiny-etchat": [("captions_timestamps.json", "video")],
    "tiny-eventgpt": [("captions_event.json", "event")],
}


@pytest.fixture(scope="module")
def media_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.trainer.synth import synthesize

    out = tmp_path_factory.mktemp("synth-media")
    synthesize(
        out, train=16, heldout=2, seed=5, modalities=["image", "video", "audio", "event", "timestamps"]
    )
    return out


def run_ranks(
    cache: Path, job_dir: Path, spec: dict[str, Any], *, timeout: float = 120, init_bundle: Path | None = None
) -> dict[str, Any]:
    """Launch the job's ranks directly (no queue) and return the final "done" event."""
    import json

    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated
    from services.trainer import launcher
    from services.trainer.jobs import parse_job
    from services.trainer.runconfig import RunConfig

    preset = load_preset(spec["preset"], cache_dir=cache)
    ensure_generated(preset)
    cfg = RunConfig(
        job_id=job_dir.name,
        spec=parse_job(spec),
        job_dir=job_dir,
        cache_dir=cache,
        adapter_name=preset.adapter.name,
        init_bundle=init_bundle or preset.adapter.path,
    )
    cfg.write()
    launch = launcher.start(cfg)
    try:
        wait_until(
            lambda: launch.poll() is not None, timeout=timeout, interval=0.3, what="the ranks to finish"
        )
    finally:
        if launch.poll() is None:
            launch.stop(grace_s=5)
    events = [json.loads(line) for line in cfg.progress_path.read_text().splitlines()]
    assert launch.poll() == 0, [e for e in events if e["event"] == "error"] or launcher.last_error(
        job_dir / "train.log"
    )
    return next(e for e in events if e["event"] == "done")


@pytest.mark.parametrize("preset", sorted(TWIN_CAPTIONS))
def test_stage1_on_every_tiny_twin_lowers_the_loss(
    preset: str, tiny_cache_dir: Path, media_data: Path, tmp_path: Path
) -> None:
    from services.common.presets import load_preset
    from services.models.checkpoints.bundle import load_bundle
    from services.models.lm.loading import load_connectors

    spec = {
        "preset": preset,
        "stage": "stage1",
        "datasets": [
            {"format": "captions", "path": str(media_data / name), "modality": modality}
            for name, modality in TWIN_CAPTIONS[preset]
        ],
        "hyperparameters": {"max_steps": 12, "micro_batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0},
        "deepspeed": {"world_size": 2, "zero_stage": 2},
    }
    done = run_ranks(tiny_cache_dir, tmp_path / "job", spec)
    metrics = done["metrics"]
    assert metrics["steps"] == 12
    assert metrics["loss_last10"] < metrics["loss_first"] - 0.1, metrics
    bundle = load_bundle(Path(done["bundle"]))
    loaded = load_preset(preset, cache_dir=tiny_cache_dir)
    assert sorted(bundle.connectors) == sorted(set(loaded.connector_names().values()))
    load_connectors(
        loaded, bundle.connectors, llm_dim=64, dtype=__import__("torch").float32
    )  # serving loads it


def test_stage3_etchat_trains_the_timestamp_heads_on_etinstruct(
    tiny_cache_dir: Path, media_data: Path, tmp_path: Path
) -> None:
    import json

    from services.models.checkpoints.bundle import load_bundle
    from services.models.lm.timestamps import load_timestamp_heads

    spec = {
        "preset": "tiny-etchat",
        "stage": "stage3",
        "datasets": [{"format": "etinstruct", "path": str(media_data / "etinstruct.json"), "modality": "video"}],
        "hyperparameters": {
            "max_steps": 12, "micro_batch_size": 4, "lr": 5e-3, "connector_lr": 5e-3, "warmup_ratio": 0.0,
        },
        "deepspeed": {"world_size": 2, "zero_stage": 2},
    }  # fmt: skip
    done = run_ranks(tiny_cache_dir, tmp_path / "job", spec)
    assert done["metrics"]["loss_last10"] < done["metrics"]["loss_first"] - 0.1, done["metrics"]
    bundle = load_bundle(Path(done["bundle"]))
    assert bundle.lora_dir is not None and bundle.stage == "stage3"
    load_timestamp_heads(bundle.heads, hidden_size=64)  # the heads part, as serving reads it
    events = [json.loads(line) for line in (tmp_path / "job" / "progress.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert start["bidirectional"] == ["video"]  # the frames attend both ways, as the seed's stage 3


def test_stage3_videochat_trains_the_connector_with_the_llm_frozen(
    tiny_cache_dir: Path, media_data: Path, tmp_path: Path
) -> None:
    """VideoChat's instruction tuning adds no LoRA (preset `lora: {enabled: false}`); a job can
    turn it back on."""
    import json

    from services.models.checkpoints.bundle import load_bundle

    spec = {
        "preset": "tiny-videochat",
        "stage": "stage3",
        "datasets": [{"format": "captions", "path": str(media_data / "captions_video.json"), "modality": "video"}],
        "hyperparameters": {"max_steps": 4, "micro_batch_size": 4, "connector_lr": 5e-3, "warmup_ratio": 0.0},
        "deepspeed": {"world_size": 1, "zero_stage": 2},
    }  # fmt: skip
    done = run_ranks(tiny_cache_dir, tmp_path / "job", spec)
    bundle = load_bundle(Path(done["bundle"]))
    assert bundle.lora_dir is None and bundle.stage == "stage3"
    events = [json.loads(line) for line in (tmp_path / "job" / "progress.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    assert set(start["trainable"]) == {"connectors"} and start["lora"]["enabled"] is False
    spec["lora"] = {"enabled": True, "r": 4}
    done = run_ranks(tiny_cache_dir, tmp_path / "job-lora", spec)
    assert load_bundle(Path(done["bundle"])).lora_dir is not None


# -- NExT-GPT stage 2: the output projectors on synthetic text-to-X caption embeddings ---------------


@pytest.fixture(scope="module")
def t2x_data(tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated
    from services.trainer.synth import synthesize

    preset = load_preset("tiny-nextgpt", cache_dir=tiny_cache_dir)
    ensure_generated(preset)
    out = tmp_path_factory.mktemp("synth-t2x")
    synthesize(out, train=16, heldout=2, seed=7, modalities=["image", "t2x"], output_preset=preset)
    return out


def stage2_job(path: Path, **hyper: Any) -> dict[str, Any]:
    return {
        "preset": "tiny-nextgpt",
        "stage": "stage2",
        "datasets": [{"format": "t2x", "path": str(path)}],
        "hyperparameters": {
            "max_steps": 16, "micro_batch_size": 4, "lr": 2e-3, "warmup_ratio": 0.0, **hyper,
        },
        "deepspeed": {"world_size": 2, "zero_stage": 2},
    }  # fmt: skip


def test_stage2_nextgpt_trains_the_output_projectors(
    tiny_cache_dir: Path, t2x_data: Path, tmp_path: Path
) -> None:
    """2 ranks, gloo: the distance loss goes down; the bundle's heads hold three trained
    projectors that serving's loader reads; the connectors are carried over unchanged."""
    import json

    import torch

    from services.common.presets import load_preset
    from services.models.checkpoints.bundle import load_bundle
    from services.models.lm.output_projector import load_projectors

    preset = load_preset("tiny-nextgpt", cache_dir=tiny_cache_dir)
    done = run_ranks(tiny_cache_dir, tmp_path / "job", stage2_job(t2x_data / "t2x.jsonl"))
    events = [json.loads(line) for line in (tmp_path / "job" / "progress.jsonl").read_text().splitlines()]
    distances = [e["distance"] for e in events if e["event"] == "step"]
    assert len(distances) == 16
    first, last = sum(distances[:3]) / 3, sum(distances[-3:]) / 3
    assert last < first, distances
    metrics = done["metrics"]
    assert metrics["distance_first"] == pytest.approx(distances[0], abs=1e-4)
    assert metrics["distance_last10"] < metrics["distance_first"], metrics
    print(
        f"stage-2 distance: step 1 {distances[0]:.4f}, step {len(distances)} {distances[-1]:.4f}; mean of the "
        f"first 3 {first:.4f}, last 3 {last:.4f}, last 10 {metrics['distance_last10']:.4f}; "
        f"{metrics['seconds']:.1f} s of training"
    )

    bundle = load_bundle(Path(done["bundle"]))
    start = load_bundle(preset.adapter.path)
    assert bundle.stage == "stage2"
    heads = {k.split(".", 1)[0] for k in bundle.heads}
    assert heads == {s.head for s in preset.outputs.values()}
    trained = load_projectors(preset, bundle.heads, llm_dim=64, dtype=torch.float32)
    before = load_projectors(preset, start.heads, llm_dim=64, dtype=torch.float32)
    for modality in preset.outputs:
        a, b = trained[modality].state_dict(), before[modality].state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{modality} projector did not change"
    for name, state in start.connectors.items():  # the frozen connectors, carried over
        for key, value in state.items():
            assert torch.equal(bundle.connectors[name][key], value), f"{name}.{key} changed"


def test_stage2_through_the_queue_publishes_projectors(
    settings: Settings, worker: Process, t2x_data: Path
) -> None:
    """The same job submitted to the Celery queue: a worker runs it, the distance goes down, and
    the published version (current in the registry) holds the three projector heads."""
    from services.common.adapter_registry import AdapterRegistry
    from services.models.checkpoints.bundle import load_bundle

    record = client(settings).submit(stage2_job(t2x_data / "t2x.jsonl", max_steps=8))
    done = wait_state(settings, record.id, {"SUCCEEDED", "FAILED"}, timeout=240, proc=worker)
    assert done.state == "SUCCEEDED", done.error
    assert done.progress["step"] == 8 and "distance" in done.progress
    assert done.metrics["distance_last10"] < done.metrics["distance_first"], done.metrics
    assert done.published is not None
    assert AdapterRegistry.from_url(settings.redis_url).current("tiny-nextgpt") == done.published["version"]
    bundle = load_bundle(Path(done.published["path"]))
    assert bundle.stage == "stage2"
    assert {k.split(".", 1)[0] for k in bundle.heads} == {
        "gen_text_hidden_fcs",
        "gen_text_hidden_fcs_video",
        "gen_text_hidden_fcs_audio",
    }


def test_stage2_bad_caption_embeddings_fail_the_job_with_reasons(
    tiny_cache_dir: Path, t2x_data: Path, tmp_path: Path
) -> None:
    """A wrong-shaped embedding, a missing one and an unknown output modality are bad samples,
    counted by reason; too many of them fail the job with the counts and examples."""
    import json

    import numpy as np

    from services.trainer import launcher
    from services.trainer.runconfig import RunConfig

    rows = [json.loads(line) for line in (t2x_data / "t2x.jsonl").read_text().splitlines()][:16]
    np.save(tmp_path / "wrong.npy", np.zeros((77, 31), dtype=np.float32))
    rows[0]["embedding"] = str(tmp_path / "wrong.npy")
    rows[1]["embedding"] = "t2x/image/missing.npy"
    rows[2]["output_modality"] = "smell"
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = stage2_job(path, max_steps=1)
    spec["datasets"][0]["media_root"] = str(t2x_data)
    with pytest.raises(AssertionError):
        run_ranks(tiny_cache_dir, tmp_path / "job", spec)
    cfg = RunConfig.read(tmp_path / "job")
    errors = [
        json.loads(line)["message"]
        for line in cfg.progress_path.read_text().splitlines()
        if json.loads(line)["event"] == "error"
    ]
    assert errors, launcher.last_error(tmp_path / "job" / "train.log")
    message = errors[0]
    assert "3 of 16" in message
    for reason in ("embedding_invalid 1", "embedding_missing 1", "unknown_output_modality 1"):
        assert reason in message, message
    assert "expected shape (77, 32)" in message and "got (77, 31)" in message


def test_stage3_nextgpt_mix_trains_lora_connector_and_projectors(
    tiny_cache_dir: Path, t2x_data: Path, tmp_path: Path
) -> None:
    """Image conversations mixed with t2x records (micro-batch 1: a rank's batch may lack
    either): LoRA, the connector and the output projectors all train and are exported."""
    import torch
    from safetensors.torch import load_file

    from services.common.presets import load_preset
    from services.models.checkpoints.bundle import load_bundle
    from services.models.lm.output_projector import load_projectors

    spec = stage2_job(t2x_data / "t2x.jsonl", max_steps=4, micro_batch_size=1)
    spec["stage"] = "stage3"
    spec["datasets"].insert(0, {"format": "llava", "path": str(t2x_data / "train.json")})
    spec["hyperparameters"] |= {"connector_lr": 1e-3, "projector_lr": 2e-3}
    done = run_ranks(tiny_cache_dir, tmp_path / "job", spec)
    assert done["metrics"]["steps"] == 4
    preset = load_preset("tiny-nextgpt", cache_dir=tiny_cache_dir)
    bundle = load_bundle(Path(done["bundle"]))
    start = load_bundle(preset.adapter.path)
    assert bundle.stage == "stage3" and bundle.lora_dir is not None
    trained = load_projectors(preset, bundle.heads, llm_dim=64, dtype=torch.float32)
    before = load_projectors(preset, start.heads, llm_dim=64, dtype=torch.float32)
    changed = [
        m
        for m in preset.outputs
        if any(not torch.equal(v, before[m].state_dict()[k]) for k, v in trained[m].state_dict().items())
    ]
    assert changed, "no output projector changed in stage 3"

    # Stage 2 under ZeRO-3 from that bundle: its LoRA is applied (frozen) and carried over as is.
    stage2 = stage2_job(t2x_data / "t2x.jsonl", max_steps=2)
    stage2["deepspeed"]["zero_stage"] = 3
    again = run_ranks(tiny_cache_dir, tmp_path / "job2", stage2, init_bundle=bundle.path)
    carried = load_bundle(Path(again["bundle"]))
    assert carried.lora_dir is not None and carried.stage == "stage2"
    lora_before = load_file(str(bundle.lora_dir / "adapter_model.safetensors"))
    lora_after = load_file(str(carried.lora_dir / "adapter_model.safetensors"))
    assert lora_before.keys() == lora_after.keys()
    assert all(torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    assert any(not torch.equal(carried.heads[k], bundle.heads[k]) for k in bundle.heads)
    for name, state in bundle.connectors.items():  # frozen in stage 2, gathered under ZeRO-3
        assert all(torch.equal(carried.connectors[name][k], v) for k, v in state.items())
