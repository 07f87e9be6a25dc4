"""The training half of `modalmesh demo`: the whole loop through the running stack's APIs.

1. Generate the synthetic shapes data set (coloured shapes with captions, Q&A, held-out split).
2. Stage 1 through the queue (POST /v1/training/jobs): align the connector on caption pairs,
   2 DeepSpeed ranks, ZeRO-2; follow it with GET until it is published.
3. Stage 3 from the stage-1 version: LoRA + connector on the Q&A conversations; published.
4. The LLM service swaps to each new version on its own; the demo measures the seconds from
   publish to the first reply served by the new version (its `system_fingerprint`).
5. Score the held-out images before training (the initial version) and after the last
   published version with `services.eval.runner`, the code `modalmesh eval shapes` runs.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.eval.runner import (
    DEFAULT_MAX_BAD_RATIO,
    METRICS,
    PREDICTIONS,
    RunConfig,
    load_predictions,
    run_eval,
)
from services.trainer.synth import score_reply, synthesize

# Tuned on the tiny preset: about 10 s of stage 1 and 40 s of stage 3 on 2 CPU cores.
STAGE1_HYPER: dict[str, Any] = {"epochs": 10, "lr": 2e-3, "micro_batch_size": 8, "checkpoint_every": 100}
STAGE3_HYPER: dict[str, Any] = {
    "epochs": 15,
    "lr": 3e-3,
    "connector_lr": 1e-3,
    "micro_batch_size": 8,
    "checkpoint_every": 100,
}


@dataclass
class StageResult:
    stage: str
    ref: str
    loss_first: float
    loss_last: float
    seconds: float
    publish_to_served_s: float


@dataclass
class DemoReport:
    """The stages trained, and the held-out metrics (metrics.json) before and after them."""

    eval_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


def job_spec(stage: str, data: Path, init_from: str, preset: str = "tiny") -> dict[str, Any]:
    """The demo's job for `stage` (absolute paths: the REST API requires them)."""
    dataset = (
        {"format": "captions", "path": str(data / "captions.json")}
        if stage == "stage1"
        else {"format": "llava", "path": str(data / "train.json")}
    )
    return {
        "preset": preset,
        "stage": stage,
        "datasets": [dataset],
        "hyperparameters": STAGE1_HYPER if stage == "stage1" else STAGE3_HYPER,
        "deepspeed": {"world_size": 2, "zero_stage": 2},
        "init_from": init_from,
        "description": f"modalmesh demo, {stage}",
    }


def _follow(http: httpx.Client, job_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    while True:
        record = http.get(f"/v1/training/jobs/{job_id}").raise_for_status().json()
        p = record.get("progress") or {}
        if "loss" in p and (time.monotonic() - last_print > 2.0 or record["state"] != "RUNNING"):
            last_print = time.monotonic()
            print(
                f"  {record['state'].lower():9s} step {p['step']}/{p['total_steps']} epoch {p['epoch']:.2f} "
                f"loss {p['loss']:.4f} {p['samples_per_s']:.0f} samples/s ETA {p['eta_s']:.0f}s",
                flush=True,
            )
        if record["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {record['state']} after {timeout_s:.0f}s")
        time.sleep(0.5)


def _question(image: bytes, text: str, model: str = "tiny") -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "temperature": 0,
    }


def _served_by(
    http: httpx.Client, ref: str, image: bytes, since: float, model: str, timeout_s: float = 60.0
) -> float:
    """Seconds from `since` (the publish) until a reply names `ref` as its adapter."""
    body = _question(image, "What color is the shape?", model=model)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = http.post("/v1/chat/completions", json=body).raise_for_status().json()
        if reply.get("system_fingerprint") == ref:
            return time.time() - since
        time.sleep(0.05)
    raise TimeoutError(f"no reply from {ref} within {timeout_s:.0f}s of its publication")


def train_stage(
    http: httpx.Client, stage: str, data: Path, init_from: str, probe: bytes, preset: str = "tiny"
) -> StageResult:
    submitted = http.post("/v1/training/jobs", json=job_spec(stage, data, init_from, preset))
    if submitted.status_code != 201:
        raise RuntimeError(f"{stage} was refused: {submitted.text}")
    job_id = submitted.json()["id"]
    print(f"{stage}: job {job_id} queued", flush=True)
    record = _follow(http, job_id, timeout_s=900)
    if record["state"] != "SUCCEEDED":
        raise RuntimeError(f"{stage} ended {record['state']}: {record.get('error')}")
    ref = record["published"]["ref"]
    served_s = _served_by(http, ref, probe, since=record["finished"], model=preset)
    m = record["metrics"]
    print(f"{stage}: published {ref}; served {served_s:.2f}s after publishing", flush=True)
    return StageResult(
        stage=stage,
        ref=ref,
        loss_first=m["loss_first"],
        loss_last=m["loss_last10"],
        seconds=record["finished"] - record["started"],
        publish_to_served_s=served_s,
    )


def evaluate(
    base_url: str, data: Path, model: str, out: Path, *, max_bad_ratio: float = DEFAULT_MAX_BAD_RATIO
) -> dict[str, Any]:
    """Score `model` on the held-out set with `modalmesh eval shapes`'s runner (concurrency 4);
    predictions.jsonl and metrics.json go to `out`, which is emptied first (a folder of an
    earlier demo holds another model's predictions, which the runner refuses to resume).

    Returns:
        The metrics (metrics.json).

    Raises:
        RuntimeError: The run stopped on bad samples (see `services.eval.runner`).
    """
    shutil.rmtree(out, ignore_errors=True)
    config = RunConfig(
        benchmark="shapes",
        data=data / "heldout.json",
        model=model,
        out=out,
        gateway=base_url,
        concurrency=4,
        max_bad_ratio=max_bad_ratio,
    )
    result = run_eval(config)
    if result.stopped:
        raise RuntimeError(f"held-out run of {model} stopped on bad samples: {out / METRICS}")
    return result.metrics


def show_predictions(data: Path, out: Path, show: int = 4) -> None:
    """Print the first `show` held-out questions of a run in `out`, its replies and the truth."""
    heldout = json.loads((data / "heldout.json").read_text())
    records = sorted(load_predictions(out / PREDICTIONS).values(), key=lambda r: r["index"])
    for record in records[:show]:
        sample = heldout[record["index"]]
        question = sample["conversations"][0]["value"].replace("<image>", "").strip()
        reply = (record.get("reply") or "").strip()
        ok = score_reply(reply, sample)
        truth = f"{sample['answer']['color']} {sample['answer']['shape']}"
        print(f"  [{sample['image']}] {question!r} -> {reply!r} (truth: {truth}) {'ok' if ok else 'WRONG'}")


def run_training_demo(base_url: str, data: Path, eval_dir: Path, preset: str = "tiny") -> DemoReport:
    """The loop against a running stack at `base_url` serving `preset` (one with an image
    modality: the data set is pictures); the held-out runs before and after training go to
    `eval_dir`/before and `eval_dir`/after. Raises on any failure."""
    if not (data / "meta.json").is_file():
        synthesize(data)
    meta = json.loads((data / "meta.json").read_text())
    print(
        f"data: {data}: {meta['caption_pairs']} caption pairs, {meta['train_samples']} conversations, "
        f"{meta['heldout_samples']} held-out questions on unseen images"
    )
    heldout = json.loads((data / "heldout.json").read_text())
    probe = (data / heldout[0]["image"]).read_bytes()
    report = DemoReport(eval_dir=eval_dir)
    # Version 1 is the preset's initial bundle (stage 1 starts from it); pinned, because after an
    # earlier demo the preset's name serves the version that demo trained.
    initial = f"{preset}@1"
    print(f"held-out images before training, asked of {initial} as `modalmesh eval shapes` asks them")
    # The initial version has random weights: its replies are nonsense, and any that come back
    # empty count as bad samples in the runner, so the before-run allows any ratio of them.
    report.before = evaluate(base_url, data, initial, eval_dir / "before", max_bad_ratio=1.0)
    with httpx.Client(base_url=base_url, timeout=120.0) as http:
        stage1 = train_stage(http, "stage1", data, "preset", probe, preset)
        report.stages.append(stage1)
        report.stages.append(train_stage(http, "stage3", data, stage1.ref, probe, preset))
    ref = report.stages[-1].ref
    print(f"held-out images after training, asked of {ref} through POST /v1/chat/completions:")
    report.after = evaluate(base_url, data, ref, eval_dir / "after")
    show_predictions(data, eval_dir / "after")
    return report


def print_report(report: DemoReport) -> None:
    for s in report.stages:
        print(
            f"{s.stage}: {s.ref}  loss {s.loss_first:.3f} -> {s.loss_last:.3f}  job {s.seconds:.1f}s  "
            f"publish -> first reply from it {s.publish_to_served_s:.2f}s"
        )
    before, after = (m["scores"]["metrics"] for m in (report.before, report.after))
    kinds = ", ".join(f"{k.split('/', 1)[1]} {v:.0%}" for k, v in after.items() if k.startswith("accuracy/"))
    print(
        f"held-out accuracy: before {before['accuracy']:.1%} -> after {after['accuracy']:.1%} "
        f"(shapes, {report.after['samples']} samples; after, by kind: {kinds})"
    )
    print(f"held-out predictions and metrics: {report.eval_dir}/before, {report.eval_dir}/after")
