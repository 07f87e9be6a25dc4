"""The worker's job runner without Celery or DeepSpeed: tailing the progress log, turning events
into the job record, and the ways `run` ends before (or instead of) launching ranks; the launch
itself is replaced by a fake that leaves what a finished run leaves in the job folder."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgumentError
from services.common.settings import Settings
from services.trainer import launcher
from services.trainer.jobs import JobRecord
from services.trainer.runconfig import RunConfig
from services.trainer.runner import JobRunner, _Tail
from services.trainer.store import JobStore

# -- _Tail ----------------------------------------------------------------------------------------


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert _Tail(tmp_path / "progress.jsonl").read() == []


def test_tail_reads_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    tail = _Tail(path)
    path.write_text('{"event": "start", "step": 0}\n{"event": "step", "st')
    assert tail.read() == [{"event": "start", "step": 0}]
    assert tail.read() == []  # the partial line waits for its end
    with path.open("a") as f:
        f.write('ep": 1}\n{"event": "step", "step": 2}\n')
    assert tail.read() == [{"event": "step", "step": 1}, {"event": "step", "step": 2}]
    assert tail.read() == []
    with path.open("a") as f:
        f.write('{"event": "done"}\n')
    assert tail.read() == [{"event": "done"}]


def test_tail_skips_a_line_that_is_not_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "progress.jsonl"
    path.write_text('Traceback (most recent call last):\n{"event": "step", "step": 1}\n')
    assert _Tail(path).read() == [{"event": "step", "step": 1}]
    assert "not a JSON line: 'Traceback" in caplog.text


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, tiny_cache_dir: Path) -> Settings:
    """The session's generated tiny preset (a job's preset is generated before it runs)."""
    return Settings(
        cache_dir=tiny_cache_dir, jobs_dir=tmp_path / "jobs", redis_url=redis_url, trainer_lease_s=30
    )


@pytest.fixture
def reports() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def runner(settings: Settings, store: JobStore, reports: list[dict[str, Any]]) -> JobRunner:
    return JobRunner(settings, store, reports.append)


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cfg: RunConfig, **_: Any) -> launcher.Launch:
        raise AssertionError("the ranks must not be launched")

    monkeypatch.setattr(launcher, "start", refuse)


def job(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    data = tmp_path / "caps.jsonl"
    data.write_text(json.dumps({"image": "a.png", "caption": "a red circle"}) + "\n")
    base = {
        "preset": "tiny",
        "stage": "stage1",
        "datasets": [{"format": "captions", "path": str(data)}],
        "init_from": "preset",
        "publish": False,
    }
    return base | fields


def queued(store: JobStore, job_id: str, spec: dict[str, Any]) -> JobRecord:
    record = JobRecord(id=job_id, spec=spec, queue="train.cpu")
    store.save(record)
    return record


# -- _apply ---------------------------------------------------------------------------------------


def test_apply_turns_each_event_into_record_fields(runner: JobRunner, reports: list[dict[str, Any]]) -> None:
    record = JobRecord(id="j", spec={}, queue="train.cpu")
    events: list[dict[str, Any]] = [
        {"event": "start", "step": 4, "total_steps": 10, "resumed_from_step": 4, "data": {"samples": 80}},
        {"event": "step", "step": 5, "total_steps": 10, "epoch": 0.5, "loss": 2.5, "lr": 1e-3, "time": 1.0},
        {"event": "checkpoint", "step": 5, "path": "/jobs/j/checkpoints/step5"},
        {"event": "step", "step": 6, "total_steps": 10, "loss": 2.0, "samples_per_s": 3.5, "eta_s": 8.0},
        {"event": "done", "bundle": "/jobs/j/bundle", "metrics": {"loss_last10": 2.0, "steps": 6.0}},
    ]
    for event in events:
        record = runner._apply(record, event)
    assert record.resumed_from_step == 4
    assert record.data_report == {"samples": 80}
    assert record.progress == {"step": 6, "total_steps": 10, "loss": 2.0, "samples_per_s": 3.5, "eta_s": 8.0}
    assert record.checkpoint == "/jobs/j/checkpoints/step5"
    assert record.bundle == "/jobs/j/bundle"
    assert record.metrics == {"loss_first": 2.5, "loss_last10": 2.0, "steps": 6.0}
    assert reports == [
        {"step": 5, "total_steps": 10, "epoch": 0.5, "loss": 2.5, "lr": 1e-3},
        {"step": 6, "total_steps": 10, "loss": 2.0, "samples_per_s": 3.5, "eta_s": 8.0},
    ]
    assert record.state == "QUEUED"  # events never decide the state; the runner does


def test_apply_keeps_the_first_loss_across_a_resume(runner: JobRunner) -> None:
    record = JobRecord(id="j", spec={}, queue="train.cpu", metrics={"loss_first": 4.0}, resumed_from_step=3)
    record = runner._apply(record, {"event": "start", "step": 0, "total_steps": 9})
    assert record.resumed_from_step == 3  # a start without one keeps what an earlier attempt said
    assert record.progress == {"step": 0, "total_steps": 9}
    record = runner._apply(record, {"event": "step", "step": 4, "loss": 1.0})
    assert record.metrics == {"loss_first": 4.0}


def test_apply_records_the_first_rank_error_only(runner: JobRunner) -> None:
    record = JobRecord(id="j", spec={}, queue="train.cpu")
    record = runner._apply(record, {"event": "error", "rank": 1, "message": "CUDA out of memory"})
    record = runner._apply(record, {"event": "error", "rank": 0, "message": "peer closed"})
    assert record.error == "rank 1: CUDA out of memory"


def test_apply_ignores_unknown_events(runner: JobRunner) -> None:
    record = JobRecord(id="j", spec={}, queue="train.cpu")
    assert runner._apply(record, {"event": "cancelled", "step": 3}) is record
    assert runner._apply(record, {"no": "event"}) is record


# -- run: the ways it ends without launching ------------------------------------------------------


@pytest.mark.usefixtures("no_launch")
def test_a_job_cancelled_before_it_starts_ends_cancelled(
    runner: JobRunner, store: JobStore, tmp_path: Path, reports: list[dict[str, Any]]
) -> None:
    store.request_cancel("j1")  # and no record: a job sent to the task by name
    out = runner.run(job(tmp_path, deepspeed={"hardware": "gpu"}), "j1")
    assert (out["state"], out["message"], out["queue"]) == (
        "CANCELLED",
        "cancelled before it started",
        "train.gpu",
    )
    assert out["finished"] is not None and out["attempts"] == 0
    assert store.get("j1").state == "CANCELLED"
    assert store.lease_holder("j1") is None
    assert reports == [{"state": "CANCELLED"}]


@pytest.mark.usefixtures("no_launch")
def test_an_invalid_job_is_recorded_failed_and_raises(
    runner: JobRunner, store: JobStore, tmp_path: Path
) -> None:
    spec = job(tmp_path, stage="stage2")
    queued(store, "j2", spec)
    with pytest.raises(InvalidArgumentError, match=r"job.stage: stage2 .*preset tiny has no outputs") as info:
        runner.run(spec, "j2")
    stored = store.get("j2")
    assert stored.state == "FAILED"
    assert stored.error == info.value.message
    assert stored.finished is not None


@pytest.mark.usefixtures("no_launch")
def test_an_unparsable_job_is_recorded_failed_naming_the_field(
    runner: JobRunner, store: JobStore, tmp_path: Path
) -> None:
    spec = job(tmp_path, hyperparameters={"lr": -1})
    with pytest.raises(InvalidArgumentError, match=r"^job j3: hyperparameters.lr: "):
        runner.run(spec, "j3")
    assert store.get("j3").state == "FAILED"
    assert "hyperparameters.lr" in (store.get("j3").error or "")


@pytest.mark.usefixtures("no_launch")
def test_a_queue_worker_refuses_several_nodes_without_a_hostfile(
    runner: JobRunner, store: JobStore, tmp_path: Path
) -> None:
    spec = job(tmp_path, deepspeed={"launcher": "deepspeed", "nodes": 2})
    queued(store, "j10", spec)
    with pytest.raises(
        InvalidArgumentError, match=r"one launcher per node \(python -m services\.trainer\.node"
    ):
        runner.run(spec, "j10")
    assert store.get("j10").state == "FAILED"


def test_node_0_launches_its_node_and_quotes_its_nodes_log(
    settings: Settings, store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node0 = launcher.Node(nnodes=2, node_rank=0, master_addr="127.0.0.1", master_port=29500)
    spec = job(tmp_path, deepspeed={"launcher": "deepspeed", "nodes": 2})
    seen: list[launcher.Node | None] = []

    def start(cfg: RunConfig, *, node: launcher.Node | None = None) -> FinishedLaunch:
        seen.append(node)
        launch = FinishedLaunch(cfg, 1, STEPS[:1])
        (cfg.job_dir / "train.node0.log").write_text("RuntimeError: gloo connect to node 1 timed out\n")
        return launch

    monkeypatch.setattr(launcher, "start", start)
    out = JobRunner(settings, store, node=node0).run(spec, "j11")
    assert seen == [node0]
    assert out["state"] == "FAILED"
    assert out["error"] == "training exited with code 1: RuntimeError: gloo connect to node 1 timed out"


@pytest.mark.usefixtures("no_launch")
def test_a_duplicate_delivery_leaves_the_job_to_the_lease_holder(
    runner: JobRunner, store: JobStore, tmp_path: Path
) -> None:
    spec = job(tmp_path)
    before = queued(store, "j4", spec).model_copy(update={"state": "RUNNING", "worker": "other:1"})
    store.save(before)
    assert store.acquire_lease("j4", "other:1", 30)
    out = runner.run(spec, "j4")
    assert out == before.public()
    assert store.get("j4") == before
    assert store.lease_holder("j4") == "other:1"


@pytest.mark.usefixtures("no_launch")
def test_a_finished_job_delivered_again_is_not_rerun(
    runner: JobRunner, store: JobStore, tmp_path: Path
) -> None:
    spec = job(tmp_path)
    done = queued(store, "j5", spec).model_copy(update={"state": "SUCCEEDED", "bundle": "/b"})
    store.save(done)
    assert runner.run(spec, "j5") == done.public()
    assert store.lease_holder("j5") is None


# -- run: following a (fake) launch ---------------------------------------------------------------


class FinishedLaunch:
    """What `launcher.start` returns, for ranks that already ran: their output is in place."""

    def __init__(self, cfg: RunConfig, rc: int, events: list[dict[str, Any]], log: str = "") -> None:
        self.cfg, self.rc, self.pgid = cfg, rc, 424242
        self.log_path = cfg.job_dir / "train.log"
        self.log_path.write_text(log)
        cfg.progress_path.write_text("".join(json.dumps(e) + "\n" for e in events))
        if rc == 0:
            cfg.bundle_dir.mkdir(parents=True)
            (cfg.bundle_dir / "manifest.json").write_text("{}")

    def poll(self) -> int:
        return self.rc

    def stop(self, *, grace_s: float = 10.0) -> int:
        raise AssertionError("a finished run is not stopped")


def fake_launch(
    monkeypatch: pytest.MonkeyPatch, rc: int, events: list[dict[str, Any]], log: str = ""
) -> list[RunConfig]:
    launched: list[RunConfig] = []

    def start(cfg: RunConfig, *, node: launcher.Node | None = None) -> FinishedLaunch:
        assert not cfg.cancel_path.exists()  # a stale sentinel is removed before launching
        assert node is None  # a queue worker runs the job's one launcher
        launched.append(cfg)
        return FinishedLaunch(cfg, rc, events, log)

    monkeypatch.setattr(launcher, "start", start)
    return launched


STEPS: list[dict[str, Any]] = [
    {"event": "start", "step": 0, "total_steps": 2},
    {"event": "step", "step": 1, "total_steps": 2, "loss": 3.0},
    {"event": "step", "step": 2, "total_steps": 2, "loss": 2.0},
]


def test_a_run_that_exports_a_bundle_succeeds(
    runner: JobRunner, store: JobStore, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = job(tmp_path)
    queued(store, "j6", spec)
    (settings.jobs_root() / "j6").mkdir(parents=True)
    (settings.jobs_root() / "j6" / "CANCEL").touch()  # left by an earlier attempt
    done = {"event": "done", "bundle": "/ignored", "metrics": {"loss_last10": 2.0}}
    launched = fake_launch(monkeypatch, 0, [*STEPS, done])
    out = runner.run(spec, "j6")
    (cfg,) = launched
    assert cfg == RunConfig.read(settings.jobs_root() / "j6")
    assert (cfg.job_id, cfg.adapter_name, cfg.hardware) == ("j6", "tiny", "cpu")
    assert out["state"] == "SUCCEEDED" and out["message"] == "done"
    assert (out["attempts"], out["worker"], out["pgid"]) == (1, runner.owner, 424242)
    assert out["progress"] == {"step": 2, "total_steps": 2, "loss": 2.0}
    assert out["metrics"] == {"loss_first": 3.0, "loss_last10": 2.0}
    assert out["bundle"] == str(cfg.bundle_dir)
    assert out["error"] is None and out["published"] is None
    assert store.get("j6").public() == out
    assert store.lease_holder("j6") is None


def test_a_run_that_fails_reports_the_ranks_error(
    runner: JobRunner, store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = job(tmp_path)
    error = {"event": "error", "rank": 0, "message": "ValueError: no usable samples"}
    fake_launch(monkeypatch, 1, [*STEPS[:1], error], log="ChildFailedError: torchrun noise\n")
    out = runner.run(spec, "j7")
    assert out["state"] == "FAILED"
    assert out["error"] == "training exited with code 1: rank 0: ValueError: no usable samples"
    assert store.lease_holder("j7") is None


def test_a_run_that_dies_silently_quotes_its_log(
    runner: JobRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_launch(monkeypatch, -9, STEPS[:1], log="Traceback (most recent call last):\nMemoryError: killed\n")
    out = runner.run(job(tmp_path), "j8")
    assert (out["state"], out["error"]) == ("FAILED", "training exited with code -9: MemoryError: killed")


@pytest.mark.usefixtures("no_launch")
def test_an_unpublished_init_version_fails_the_job(
    runner: JobRunner, store: JobStore, tmp_path: Path
) -> None:
    spec = job(tmp_path, init_from="tiny@7")
    queued(store, "j9", spec)
    with pytest.raises(InvalidArgumentError, match="tiny@7 is not published"):
        runner.run(spec, "j9")
    assert store.get("j9").state == "FAILED"


def test_apply_keeps_the_loss_history_of_the_whole_run(runner: JobRunner) -> None:
    from services.trainer.runner import HISTORY_POINTS

    record = JobRecord(id="j", spec={}, queue="train.cpu")
    for step in range(1, 5):
        record = runner._apply(record, {"event": "step", "step": step, "loss": 10.0 - step})
    record = runner._apply(record, {"event": "step", "step": 5})  # no loss: no point
    assert record.loss_history == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    # a resumed attempt replays from its checkpoint at step 2: its points replace the old ones
    record = runner._apply(record, {"event": "start", "step": 2, "total_steps": 9})
    record = runner._apply(record, {"event": "step", "step": 3, "loss": 6.5})
    assert record.loss_history == [(1, 9.0), (2, 8.0), (3, 6.5)]
    # a long run keeps the whole curve, thinned: first and newest point always there
    for step in range(4, 5000):
        record = runner._apply(record, {"event": "step", "step": step, "loss": 1.0 / step})
    history = record.loss_history
    assert len(history) <= HISTORY_POINTS and history[0] == (1, 9.0) and history[-1] == (4999, 1.0 / 4999)
    assert [p[0] for p in history] == sorted({p[0] for p in history})
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(history)]
    assert len(history) > HISTORY_POINTS // 2 and max(gaps) <= 2 * min(
        gaps[:-1]
    )  # even, not dense at the end
    again = JobRecord.model_validate_json(record.model_dump_json())
    assert again.loss_history == history and json.loads(record.model_dump_json())["loss_history"][0] == [
        1,
        9.0,
    ]


def test_a_job_for_a_tiny_preset_not_generated_yet_gets_its_models(
    store: JobStore, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack serves one preset; a job names another tiny one whose models this cache never
    held: the worker generates them before launching (the ranks would fail on a missing LLM)."""
    from services.common.presets import load_preset
    from services.models.tiny import is_generated

    cache = tmp_path / "fresh-cache"
    settings = Settings(cache_dir=cache, jobs_dir=tmp_path / "jobs", redis_url=redis_url, trainer_lease_s=30)
    preset = load_preset("tiny-pandagpt", cache_dir=cache)
    assert not is_generated(preset)
    launched = fake_launch(monkeypatch, 0, [*STEPS, {"event": "done", "bundle": "/b", "metrics": {}}])
    out = JobRunner(settings, store, lambda _: None).run(job(tmp_path, preset="tiny-pandagpt"), "j10")
    assert out["state"] == "SUCCEEDED" and len(launched) == 1
    assert is_generated(preset)
