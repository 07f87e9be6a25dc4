"""The seed-style baseline: one process, one HF `generate` per request behind a semaphore of 5.

This is what LLaVA's `model_worker.py` does (SERVING_NOTES section 4): the model lives in the
server process, every request decodes its images in-process and runs its own `generate` on a
thread, and `--limit-model-concurrency 5` caps how many run at once. There is no batching and
no feature cache. It serves a minimal OpenAI-compatible POST /v1/chat/completions (text and
`image_url` data URLs, non-streamed or SSE) so that the benchmark client talks to it exactly as
it talks to the modalmesh gateway.

To keep the comparison honest it serves the same preset with the same code paths modalmesh
uses for everything but scheduling: the encoder is `MediaEncoder.from_spec` with the preset's
spec, the prompt is built by `Engine.prepare` (template, placeholder expansion, budget, stop
strings), the embeddings by `MultimodalLM.embed`, and decoding is greedy HF `generate` with
`inputs_embeds` and the preset's end-of-sequence ids.

Run: python -m bench.baseline_server --preset tiny --port 8300 [--concurrency 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers.generation.streamers import BaseStreamer

from gateway.media import decode_data_url
from services.common.content import MediaFeatures, MediaInput, MediaPart, Part, TextPart, Turn, media_parts
from services.common.errors import InvalidArgumentError, ModalmeshError
from services.common.presets import load_preset
from services.common.settings import Settings
from services.llm.domain import GenerationRequest
from services.llm.engine import Engine, PreparedRequest
from services.llm.sampling import SamplingParams
from services.models.lm.loading import load_model
from services.models.media.encode import MediaEncoder

logger = logging.getLogger(__name__)

LLAVA_CONCURRENCY = 5  # LLaVA model_worker's --limit-model-concurrency default
MAX_IMAGE_BYTES = 20 * 1024 * 1024


class _QueueStreamer(BaseStreamer):
    """Hands each new token id from the generate thread to the event loop (prompt skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self.loop, self.queue = loop, queue

    def put(self, value: torch.Tensor) -> None:
        for token in value.reshape(-1).tolist():  # inputs_embeds only: `put` gets new tokens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class BaselineServer:
    """The model, the image encoder and the semaphore; `chat` serves one request.

    Args:
        preset_name: Preset name or YAML path.
        cache_dir: Where its checkpoints live (`MODALMESH_CACHE_DIR`).
        concurrency: Most `generate` calls at once (LLaVA: 5).
    """

    def __init__(self, preset_name: str, *, cache_dir: Path, concurrency: int = LLAVA_CONCURRENCY) -> None:
        preset = load_preset(preset_name, cache_dir=cache_dir)
        if "image" not in preset.modalities:
            raise InvalidArgumentError(f"baseline: preset {preset.name} has no image modality")
        self.preset = preset
        self.loaded = load_model(preset)
        # Engine only for `prepare` (validation + prompt); its worker thread never runs here.
        self.engine = Engine(self.loaded)
        self.encoder = MediaEncoder.from_spec("image", preset.modalities["image"].encoder, decode_workers=1)
        self.semaphore = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency

    def close(self) -> None:
        self.encoder.close()
        self.engine.close()

    def _request(self, body: dict[str, Any]) -> tuple[list[Turn[MediaInput]], SamplingParams]:
        """Turns (images as inline bytes) and sampling of an OpenAI chat body (text and
        image_url parts only)."""
        turns = []
        for message in body.get("messages", []):
            content = message.get("content")
            parts: list[Part[MediaInput]] = []
            content_parts: list[dict[str, Any]] = (
                [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            )
            for part in content_parts:
                if part.get("type") == "text":
                    parts.append(TextPart(part["text"]))
                elif part.get("type") == "image_url":
                    data = decode_data_url(part["image_url"]["url"], max_bytes=MAX_IMAGE_BYTES)
                    parts.append(MediaPart(MediaInput("image", data=data)))
                else:
                    raise InvalidArgumentError(f"baseline: unsupported content part {part.get('type')!r}")
            turns.append(Turn(message["role"], tuple(parts)))
        sampling = SamplingParams(
            max_tokens=int(body.get("max_tokens") or 16),
            temperature=float(body.get("temperature", 0.0)),
            stop=tuple([body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or ()),
        )
        if sampling.temperature != 0.0:
            raise InvalidArgumentError("baseline: only greedy decoding (temperature 0) is served")
        return turns, sampling

    def _encode(self, turns: Sequence[Turn[MediaInput]]) -> list[Turn[MediaFeatures[torch.Tensor]]]:
        """The turns with each image's bytes replaced by its features: decode + preprocess +
        the vision tower, in this process (as LLaVA's worker does)."""
        images = [p.media.data or b"" for p in media_parts(turns)]
        items = []
        for result in self.encoder.encode(images):
            if isinstance(result, ModalmeshError):
                raise result
            items.append(MediaFeatures("image", torch.from_numpy(result.features)))  # (tokens, D)
        encoded = iter(items)
        return [
            Turn(turn.role, [MediaPart(next(encoded)) if isinstance(p, MediaPart) else p for p in turn.parts])
            for turn in turns
        ]

    def _generate(self, job: PreparedRequest, streamer: BaseStreamer) -> None:
        """Worker thread: embed the prompt and run one HF `generate` (greedy)."""
        model, lm = self.loaded.model, self.loaded.model.lm
        with torch.inference_mode():
            embeds = model.embed(
                job.prompt.input_ids,
                job.prompt.media_spans,
                job.request.media,
                job.version.connectors,
                job.instructions,
            )  # (1, L, D)
            kwargs: dict[str, Any] = {}
            if job.stop:
                kwargs = {"stop_strings": list(job.stop), "tokenizer": self.loaded.tokenizer}
            lm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                max_new_tokens=job.budget,
                do_sample=False,
                eos_token_id=sorted(self.loaded.eos_ids),
                pad_token_id=min(self.loaded.eos_ids),
                streamer=streamer,
                **kwargs,
            )

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[str | dict[str, Any]]:
        """The text deltas of one chat, then its usage (prompt/completion tokens, finish)."""
        turns, sampling = self._request(body)
        async with self.semaphore:
            loop = asyncio.get_running_loop()
            encoded = await asyncio.to_thread(self._encode, turns)
            request = GenerationRequest(turns=encoded, sampling=sampling)
            job = self.engine.prepare(request, self.engine.adapters.current)
            queue: asyncio.Queue[int | None] = asyncio.Queue()
            streamer = _QueueStreamer(loop, queue)
            errors: list[BaseException] = []
            thread = threading.Thread(target=self._generate_safely, args=(job, streamer, errors))
            thread.start()
            tokens: list[int] = []
            sent = ""
            eos = self.loaded.eos_ids
            while (token := await queue.get()) is not None:
                if token in eos:
                    continue
                tokens.append(token)
                text = self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent) and not text.endswith("\ufffd"):
                    yield text[len(sent) :]
                    sent = text
            await asyncio.to_thread(thread.join)
            if errors:
                raise errors[0]
            text = self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
            if len(text) > len(sent):  # a trailing incomplete UTF-8 sequence, as the engine sends it
                yield text[len(sent) :]
            finish = "length" if len(tokens) >= job.budget else "stop"
            yield {
                "prompt_tokens": len(job.prompt.input_ids),
                "completion_tokens": len(tokens),
                "finish": finish,
            }

    def _generate_safely(
        self, job: PreparedRequest, streamer: _QueueStreamer, errors: list[BaseException]
    ) -> None:
        """Thread body: a failure goes to `errors` (the request's), and the stream still ends."""
        try:
            self._generate(job, streamer)
        except BaseException as e:
            errors.append(e)
            streamer.end()


def build_app(server: BaselineServer) -> FastAPI:
    """POST /v1/chat/completions (OpenAI shape, vLLM's SSE chunks) and GET /health."""
    app = FastAPI()
    model_name = server.preset.name

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            deltas = server.chat(body)
            if not body.get("stream"):
                text, usage = "", {}
                async for delta in deltas:
                    if isinstance(delta, dict):
                        usage = delta
                    else:
                        text += delta
                return JSONResponse(_completion(cid, created, model_name, text, usage))
            first = await anext(deltas)  # errors before the first token are a plain HTTP error
        except ModalmeshError as e:
            return JSONResponse({"error": {"message": e.message}}, status_code=e.http_status)
        return StreamingResponse(
            _sse(cid, created, model_name, first, deltas), media_type="text/event-stream"
        )

    return app


def _completion(cid: str, created: int, model: str, text: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": usage.get("finish", "stop"),
            }
        ],
        "usage": _usage(usage),
    }


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(
    cid: str,
    created: int,
    model: str,
    first: str | dict[str, Any],
    deltas: AsyncIterator[str | dict[str, Any]],
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = _usage(usage)
        return f"data: {json.dumps(body)}\n\n"

    pending: str | dict[str, Any] | None = first
    while pending is not None:
        if isinstance(pending, dict):
            usage = pending
            yield chunk({}, usage["finish"])
            yield chunk({}, usage=usage)
            break
        yield chunk({"role": "assistant", "content": pending})
        pending = await anext(deltas, None)
    yield "data: [DONE]\n\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=LLAVA_CONCURRENCY)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = BaselineServer(args.preset, cache_dir=Settings().cache_dir, concurrency=args.concurrency)
    try:
        uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.close()


if __name__ == "__main__":
    main()
