"""`modalmesh train` and `modalmesh data` against a private redis-server (no Celery worker)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from modalmesh.cli import main
from modalmesh.train_cli import progress_line
from services.common.settings import Settings
from services.trainer.client import TrainingClient
from services.trainer.jobs import read_job_file
from services.trainer.synth import synthesize
from tests.helpers.services import start_redis


@pytest.fixture
def flags(tmp_path: Path, tiny_cache_dir: Path) -> Iterator[list[str]]:
    """--redis-url and --cache-dir of a private redis-server and the tiny preset's cache."""
    proc, url = start_redis(tmp_path / "redis")
    try:
        yield ["--redis-url", url, "--cache-dir", str(tiny_cache_dir)]
    finally:
        proc.kill_group()


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    """A stage3 job in jobs/job.yaml whose dataset path is relative to that folder."""
    synthesize(tmp_path / "jobs" / "data", train=8, heldout=2)
    path = tmp_path / "jobs" / "job.yaml"
    job = {
        "preset": "tiny",
        "stage": "stage3",
        "datasets": [{"format": "llava", "path": "data/train.json", "media_root": "data"}],
        "hyperparameters": {"max_steps": 3},
    }
    path.write_text(yaml.safe_dump(job))
    return path


def client_for(flags: list[str]) -> TrainingClient:
    return TrainingClient(Settings(redis_url=flags[1], cache_dir=Path(flags[3])))


def test_relative_paths_are_resolved_against_the_job_file(
    job_file: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not the job file's folder
    dataset = read_job_file(Path("jobs/job.yaml")).datasets[0]
    assert dataset.path == job_file.parent / "data" / "train.json"
    assert dataset.media_root == job_file.parent / "data"


def test_submit_status_list_cancel(job_file: Path, flags: list[str], capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "submit", str(job_file.relative_to(tmp_path)), "--json", *flags]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["state"] == "QUEUED" and record["queue"] == "train.cpu"
    assert record["spec"]["datasets"][0]["path"] == str(job_file.parent / "data" / "train.json")
    job_id = record["id"]

    assert main(["train", "submit", str(job_file), *flags]) == 0
    second = capsys.readouterr().out.split()
    assert second[:2] == ["submitted", "job"] and second[-1] == "train.cpu"

    assert main(["train", "status", job_id, *flags]) == 0
    out = capsys.readouterr().out
    assert f"job {job_id}: QUEUED (queue train.cpu" in out and "preset tiny, stage3" in out

    assert main(["train", "list", *flags]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("ID") and [r.split()[0] for r in rows[1:]] == [second[2], job_id]

    assert main(["train", "cancel", job_id, *flags]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: CANCELLED (cancelled while queued)"
    assert main(["train", "status", job_id, "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "CANCELLED"

    assert main(["train", "cancel", job_id, *flags]) == 2
    assert "already finished (CANCELLED)" in capsys.readouterr().err


def test_wait_follows_progress_until_the_end(job_file: Path, flags: list[str], capsys) -> None:
    client = client_for(flags)
    submitted = threading.Event()
    original = client.submit

    def submit(job):  # the CLI's own client submits; a stand-in worker then updates the record
        record = original(job)
        threading.Thread(target=work, args=(record.id,), daemon=True).start()
        return record

    def work(job_id: str) -> None:
        record = client.get(job_id)
        for step in (1, 2, 3):
            progress = {
                "step": step,
                "total_steps": 3,
                "epoch": step / 3,
                "loss": 3.0 / step,
                "samples_per_s": 100.0,
                "eta_s": 3 - step,
            }
            record = record.model_copy(update={"state": "RUNNING", "progress": progress})
            client.store.save(record)
            time.sleep(0.5)  # long enough for the 0.02 s poll to see each step on a loaded machine
        published = {"name": "tiny-lora", "version": 2, "path": "/x", "ref": "tiny-lora@2"}
        client.store.save(record.model_copy(update={"state": "SUCCEEDED", "published": published}))
        submitted.set()

    import modalmesh.train_cli as train_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_cli, "_client", lambda args: client)
        mp.setattr(client, "submit", submit)
        assert main(["train", "submit", str(job_file), "--wait", "--poll", "0.02", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert submitted.is_set()
    assert lines[0].startswith("submitted job")
    assert "step 1/3 epoch 0.33 loss 3.0000 100.0 samples/s ETA 2s" in lines
    assert "step 3/3 epoch 1.00 loss 1.0000 100.0 samples/s ETA 0s" in lines
    assert lines[-2].endswith(": SUCCEEDED") and lines[-1] == "published tiny-lora@2"


def test_wait_exits_1_when_the_job_fails(job_file: Path, flags: list[str], capsys, monkeypatch) -> None:
    import modalmesh.train_cli as train_cli

    client = client_for(flags)
    original = client.submit

    def submit_and_fail(job):
        record = original(job)
        client.store.save(record.model_copy(update={"state": "FAILED", "error": "loss is NaN at step 2"}))
        return record

    monkeypatch.setattr(train_cli, "_client", lambda args: client)
    monkeypatch.setattr(client, "submit", submit_and_fail)
    assert main(["train", "submit", str(job_file), "--wait", "--poll", "0.02", *flags]) == 1
    assert "FAILED: loss is NaN at step 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "no such job file"),
        ("preset: [unclosed", "not valid YAML or JSON"),
        ("- a list", "expected a mapping"),
        ("preset: tiny\nstage: stage2\ndatasets: [{format: llava, path: data/train.json}]\n", "stage2"),
        ("preset: tiny\nstage: stage3\ndatasets: [{format: llava, path: nowhere.json}]\n", "found nothing"),
        ("preset: tiny\nstage: stage3\nfoo: 1\ndatasets: [{format: llava, path: data/train.json}]\n", "foo"),
    ],
    ids=["missing", "broken-yaml", "not-a-mapping", "stage2", "missing-dataset", "extra-field"],
)
def test_an_invalid_job_file_exits_2_with_one_line(
    job_file: Path, flags: list[str], capsys, content: str | None, fragment: str
) -> None:
    path = job_file.parent / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["train", "submit", str(path), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert err.startswith("modalmesh: ")


def test_an_unknown_job_exits_2(flags: list[str], capsys) -> None:
    assert main(["train", "status", "nope", *flags]) == 2
    assert "training job 'nope' not found" in capsys.readouterr().err


def test_data_synth_writes_the_dataset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--train", "4", "--heldout", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    for name in ("captions.json", "train.json", "heldout.json", "meta.json"):
        assert (out / name).is_file() and str(out / name) in printed
    assert len(json.loads((out / "captions.json").read_text())) == 4
    assert "wrote 4 training and 2 held-out images" in printed


def test_data_synth_writes_other_modalities(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    argv = ["data", "synth", str(out), "--train", "2", "--heldout", "1", "--modalities", "image,audio,event"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for modality in ("audio", "event"):
        for name in (f"captions_{modality}.json", f"train_{modality}.json", f"heldout_{modality}.json"):
            assert (out / name).is_file() and str(out / name) in printed
        assert f"wrote 2 training and 1 held-out {modality} files" in printed
    assert not (out / "video").exists()
    assert list(json.loads((out / "meta.json").read_text())["modalities"]) == ["image", "audio", "event"]
    assert main(["data", "synth", str(tmp_path / "x"), "--modalities", "image,smell"]) == 2
    assert "modalities: expected 'image' and any of" in capsys.readouterr().err


def test_data_synth_refuses_bad_counts(tmp_path: Path, capsys) -> None:
    assert main(["data", "synth", str(tmp_path / "x"), "--train", "0"]) == 2
    assert "expected train >= 1" in capsys.readouterr().err


def test_progress_line_leaves_out_what_is_missing() -> None:
    assert progress_line(
        {"step": 12, "total_steps": 370, "epoch": 0.32, "loss": 2.31, "samples_per_s": 812.34, "eta_s": 4.2}
    ) == ("step 12/370 epoch 0.32 loss 2.3100 812.3 samples/s ETA 4s")
    assert progress_line({"step": 5, "eta_s": 125}) == "step 5 ETA 2m05s"
    assert progress_line({"step": 3, "loss": 9.5, "distance": 6.25}) == "step 3 loss 9.5000 distance 6.2500"
    assert progress_line({}) == ""
