"""The web UI (gateway/ui, served at /ui) driven in headless Chromium against a real stack.

The stack is the tiny-nextgpt twin (it answers "draw ..." with a generated image): Redis, the
encoder, LLM and decoder services, the gateway, and a trainer worker for the Training tab. The
browser is Debian's `chromium` (scripts/ensure-browser installs it), driven by Playwright.

The tests run in order on one page, as a user would: chat about an uploaded image (the reply
streams in several deltas), "draw a cat" (a generated PNG inline), bad inputs (an unsupported
file type, a request the API refuses, then a request that works), E.T. Chat timestamp marks
(the chat endpoint is answered by a canned SSE reply through Playwright's routing, so the UI's
own stream parser and timeline code run; no tiny-etchat stack needed), and a training job
submitted as YAML whose progress bar and loss plot advance, then cancelled. A screenshot of
each step is saved under the test's folder and copied to /tmp/modalmesh-ui-screenshots/.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.media import make_video, png_bytes
from tests.helpers.procs import Process, free_ports, start_process, stop_all, wait_until
from tests.helpers.services import (
    start_decoders,
    start_encoders,
    start_gateway,
    start_llm,
    wait_stack_healthy,
)

pytestmark = pytest.mark.integration

PRESET = "tiny-nextgpt"
SHOTS_COPY = Path("/tmp/modalmesh-ui-screenshots")
TIMEOUT_MS = 120_000


class Stack:
    def __init__(self, base_url: str, data_dir: Path) -> None:
        self.base_url = base_url
        self.data_dir = data_dir


@pytest.fixture(scope="module")
def stack(tiny_cache_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated
    from services.trainer.synth import synthesize

    ensure_generated(load_preset(PRESET, cache_dir=tiny_cache_dir))
    root = tmp_path_factory.mktemp("ui-stack")
    synthesize(root / "data", train=64, heldout=8, seed=3)
    enc_http, enc_grpc, enc_metrics, dec_http, dec_grpc, dec_metrics, llm_port, gw_http, gw_grpc = free_ports(
        9
    )
    env = {
        "MODALMESH_PRESET": PRESET,
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LOG_JSON": "true",
        "MODALMESH_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc_grpc}",
        "MODALMESH_DECODER_ADDRESS": f"127.0.0.1:{dec_grpc}",
        "MODALMESH_DECODER_TIMEOUT_S": "60",
        "MODALMESH_REDIS_URL": redis_url,
        "MODALMESH_JOBS_DIR": str(root / "jobs"),
        "MODALMESH_ARTIFACT_DIR": str(root / "artifacts"),
    }
    logs = root / "logs"
    procs: list[Process] = []
    try:
        procs.append(
            start_encoders(env, logs / "encoders.log", http=enc_http, grpc=enc_grpc, metrics=enc_metrics)
        )
        procs.append(
            start_decoders(env, logs / "decoders.log", http=dec_http, grpc=dec_grpc, metrics=dec_metrics)
        )
        procs.append(start_llm(env, logs / "llm.log", port=llm_port))
        gateway, base_url, _ = start_gateway(env, logs / "gateway.log", ports=(gw_http, gw_grpc))
        procs.append(gateway)
        worker_env = {**env, "MODALMESH_LOG_JSON": "false", "MODALMESH_TRAINER_CANCEL_GRACE_S": "8"}
        worker = start_process(
            [sys.executable, "-m", "services.trainer"], log_path=logs / "trainer.log", env=worker_env
        )
        procs.append(worker)
        wait_stack_healthy(base_url, procs, timeout=300, what="tiny-nextgpt stack for the web UI")
        wait_until(lambda: " ready." in worker.log_text(), timeout=60, what="the trainer worker", proc=worker)
        yield Stack(base_url, root / "data")
    finally:
        stop_all(reversed(procs))


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ui-screenshots")
    shutil.rmtree(SHOTS_COPY, ignore_errors=True)
    SHOTS_COPY.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(stack: Stack, shots: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Debian's chromium is not installed: run scripts/ensure-browser (or apt-get install chromium)"
        )
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            p = context.new_page()
            p.set_default_timeout(TIMEOUT_MS)
            p.goto(f"{stack.base_url}/")  # redirects to /ui/
            assert p.url == f"{stack.base_url}/ui/", p.url
            p.wait_for_function("document.querySelectorAll('#model option').length > 0")
            yield p
        finally:
            browser.close()


def shot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    shutil.copy(path, SHOTS_COPY / path.name)


def send(page: Any, text: str) -> Any:
    """Type `text`, send it, and wait for the reply to finish; returns the reply's locator."""
    before = page.locator(".message.assistant").count()
    page.fill("#prompt", text)
    page.click("#send")
    reply = page.locator(".message.assistant").nth(before)
    reply.and_(page.locator("[data-state=done], [data-state=error]")).wait_for()
    return reply


def test_models_listed_and_page_open_without_key(page: Any, stack: Stack) -> None:
    import httpx

    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options[0] == PRESET, options
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{stack.base_url}/ui/{name}", timeout=5).status_code == 200


def test_recorder_wav_encoding(page: Any) -> None:
    """The microphone path's last step: samples -> the PCM WAV sent as input_audio (format wav)."""
    import wave

    b64 = page.evaluate(
        """async () => {
        const samples = Float32Array.from({length: 1600}, (_, i) => Math.sin(i / 10));
        const blob = window.modalmeshUI.encodeWav(samples, 16000);
        const bytes = new Uint8Array(await blob.arrayBuffer());
        return btoa(String.fromCharCode(...bytes)); }"""
    )
    with wave.open(io.BytesIO(base64.b64decode(b64))) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 1600)


def test_chat_about_an_image_streams(page: Any, shots: Path, tmp_path: Path) -> None:
    image = tmp_path / "shapes.png"
    image.write_bytes(png_bytes(48, 40))
    page.set_input_files("#file", str(image))
    page.locator(".chip[data-modality=image]").wait_for()
    shot(page, shots, "01-image-attached")
    # Record every text the reply shows while it streams (each delta replaces the text node).
    page.evaluate(
        """() => { window.__lengths = [];
        new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes)
          if (n.nodeType === 3 && n.parentElement && n.parentElement.closest('.message.assistant'))
            window.__lengths.push(n.textContent.length); })
        .observe(document.querySelector('#messages'), {childList: true, subtree: true}); }"""
    )
    reply = send(page, "What is in this image?")
    assert reply.get_attribute("data-state") == "done", reply.inner_text()
    text = reply.locator(".text").inner_text()
    assert text.strip(), "the reply has no text"
    deltas = int(reply.get_attribute("data-deltas") or 0)
    lengths = page.evaluate("window.__lengths")
    assert deltas >= 2 and len(lengths) >= 2, (deltas, lengths, text)
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], lengths  # it grew as it came
    assert page.locator(".message.user img").count() == 1  # the upload is shown in the chat
    shot(page, shots, "02-streamed-reply")


def test_draw_a_cat_shows_a_generated_png(page: Any, shots: Path) -> None:
    from PIL import Image

    page.check("input[name=modality][value=image]")
    reply = send(page, "draw a cat")
    page.uncheck("input[name=modality][value=image]")
    assert reply.get_attribute("data-state") == "done", reply.inner_text()
    img = reply.locator(".media-out img")
    img.wait_for()
    src = img.get_attribute("src") or ""
    head, _, b64 = src.partition(",")
    assert head == "data:image/png;base64", head
    picture = Image.open(io.BytesIO(base64.b64decode(b64)))
    picture.verify()
    assert picture.format == "PNG"
    assert page.evaluate("el => el.complete && el.naturalWidth > 0", img.element_handle())  # it rendered
    shot(page, shots, "03-generated-image")


def test_bad_inputs_show_errors_and_the_next_request_works(page: Any, shots: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not media")
    page.set_input_files("#file", str(notes))
    error = page.locator("#upload-error")
    error.wait_for()
    assert 'Unsupported file type: "notes.txt"' in error.inner_text()
    assert page.locator("#attachments .chip").count() == 0

    page.click("#clear")  # a new conversation: the preset takes one image per request
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG at all")
    page.set_input_files("#file", str(broken))
    assert page.locator("#upload-error").is_hidden()
    reply = send(page, "What is in this image?")
    assert reply.get_attribute("data-state") == "error"
    note = reply.locator(".error-note").inner_text()
    assert note.startswith("400: ") and "messages[0].content[0]" in note, note  # the API's own message
    shot(page, shots, "04-api-error")

    reply = send(page, "Hello again")
    assert reply.get_attribute("data-state") == "done", reply.inner_text()
    assert reply.locator(".error-note").count() == 0
    shot(page, shots, "05-next-request-works")


def _sse(chunks: list[dict[str, Any]]) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_timestamps_become_marks_that_seek_the_video(page: Any, shots: Path, tmp_path: Path) -> None:
    """A canned E.T. Chat reply (as the gateway streams it) for an uploaded 2 s video."""
    video = tmp_path / "clip.webm"
    video.write_bytes(make_video(20, 10, (64, 48), fmt="webm"))
    base = {"id": "chatcmpl-ui", "object": "chat.completion.chunk", "created": 0, "model": PRESET}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    stamps = [
        {"media_index": 0, "frame": 5, "seconds": 0.5, "char_offset": 14},
        {"media_index": 0, "frame": 15, "seconds": 1.5, "char_offset": 30},
    ]
    body = _sse(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "It starts at 0.5s", "timestamps": stamps[:1]}),
            chunk({"content": " and ends at 1.5s.", "timestamps": stamps[1:]}),
            chunk({"content": ""}, "stop"),
        ]
    )
    seen: list[dict[str, Any]] = []

    def answer(route: Any) -> None:
        seen.append({"body": route.request.post_data_json, "headers": route.request.headers})
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.click("#clear")
    page.fill("#api-key", "ui-test-key")
    page.dispatch_event("#api-key", "change")
    page.route("**/v1/chat/completions", answer)
    try:
        page.set_input_files("#file", str(video))
        reply = send(page, "When does the square appear?")
    finally:
        page.unroute("**/v1/chat/completions")
        page.fill("#api-key", "")
        page.dispatch_event("#api-key", "change")
    assert reply.get_attribute("data-state") == "done"
    assert reply.locator(".text").inner_text() == "It starts at 0.5s and ends at 1.5s."
    sent = seen[0]
    assert sent["headers"].get("authorization") == "Bearer ui-test-key"
    (part,) = [p for p in sent["body"]["messages"][-1]["content"] if p["type"] != "text"]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/webm;base64,")

    marks = page.locator(".message.user .timeline .mark")
    assert marks.count() == 2
    page.wait_for_function("document.querySelector('.message.user video').duration > 0")
    lefts = [float(marks.nth(i).evaluate("m => parseFloat(m.style.left)")) for i in range(2)]
    duration = page.evaluate("document.querySelector('.message.user video').duration")
    assert lefts == pytest.approx([100 * 0.5 / duration, 100 * 1.5 / duration], abs=0.5), (lefts, duration)
    marks.nth(1).click()
    page.wait_for_function("Math.abs(document.querySelector('.message.user video').currentTime - 1.5) < 0.05")
    shot(page, shots, "06-timestamp-marks")
    page.click("#clear")


def test_training_job_progress_and_loss_plot(page: Any, shots: Path, stack: Stack) -> None:
    page.click("#tab-training")
    page.fill("#job-spec", '{"preset": "tiny"}')
    page.click("#job-submit")
    error = page.locator("#job-error")
    error.wait_for()
    assert "Not submitted: 400: " in error.inner_text() and "datasets" in error.inner_text()

    captions = stack.data_dir / "captions.json"
    assert captions.is_file()
    page.fill(
        "#job-spec",
        "# a YAML job, as in docs/training.md\n"
        "preset: tiny\n"
        "stage: stage1\n"
        "datasets:\n"
        f"  - {{format: captions, path: {captions}}}\n"
        "hyperparameters:\n"
        "  max_steps: 5000\n"
        "  micro_batch_size: 8\n",
    )
    page.click("#job-submit")
    row = page.locator("#jobs tbody tr").first
    row.wait_for()
    assert page.locator("#job-error").is_hidden()
    job_id = row.get_attribute("data-job")
    start = time.monotonic()
    page.wait_for_function(
        """id => { const row = document.querySelector(`tr[data-job="${id}"]`);
        if (!row) return false;
        const bar = row.querySelector('progress'), plot = row.querySelector('svg.loss');
        return bar.value > 0 && Number(plot.dataset.points) >= 3; }""",
        arg=job_id,
        timeout=180_000,
    )
    row = page.locator(f'tr[data-job="{job_id}"]')
    assert row.get_attribute("data-state") == "RUNNING", row.inner_text()
    value, maximum = row.locator("progress").evaluate("b => [b.value, b.max]")
    assert 0 < value < maximum == 5000, (value, maximum)
    page.wait_for_function(  # the bar advances as the page polls
        '([id, v]) => document.querySelector(`tr[data-job="${id}"] progress`).value > v', arg=[job_id, value]
    )
    points = row.locator("svg.loss polyline").get_attribute("points") or ""
    assert len(points.split()) >= 3, points
    shot(page, shots, "07-training-progress")
    print(f"training progress visible {time.monotonic() - start:.1f}s after submit")

    page.locator(f'tr[data-job="{job_id}"] button.cancel').click()
    page.wait_for_function(
        """id => ['CANCELLING', 'CANCELLED'].includes(
            document.querySelector(`tr[data-job="${id}"]`)?.dataset.state)""",
        arg=job_id,
    )
    page.wait_for_function(
        """id => document.querySelector(`tr[data-job="${id}"]`)?.dataset.state === 'CANCELLED'""",
        arg=job_id,
        timeout=60_000,
    )
    shot(page, shots, "08-training-cancelled")

    # A page opened afterwards draws the whole curve from the record's loss_history, not only
    # the points it saw itself.
    history = httpx.get(f"{stack.base_url}/v1/training/jobs/{job_id}", timeout=10).json()["loss_history"]
    assert len(history) >= 3 and history[0][0] == 1, history[:3]
    page.reload()
    page.click("#tab-training")
    page.wait_for_function(
        """([id, n]) => Number(document.querySelector(`tr[data-job="${id}"] svg.loss`)?.dataset.points) >= n""",
        arg=[job_id, len(history)],
    )
    title = page.locator(f'tr[data-job="{job_id}"] svg.loss title').text_content() or ""
    assert f"over steps 1-{history[-1][0]}" in title, title
