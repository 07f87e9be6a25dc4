"""The chat logic shared by the REST and gRPC front ends, independent of either transport.

`ChatService.prepare` validates a `gateway.domain.ChatRequest` (against the preset: each
modality needs an encoder, at most `max_per_prompt` items of each), loads every media item
concurrently (fetch or inline bytes -> sha256 -> Redis feature cache -> the Triton model of
the item's modality on a miss -> cache store) and builds the LLM service's `GenerateRequest`
from the same turns, each media part now carrying its item's features and frame times instead
of the client's input (no renumbering: the LLM service reads each item where its part
stands); every client error is raised there, before a reply
starts, and names the item ("messages[0].content[1] (video 0): not a video: ...", the
request's first video).
`ChatService.generate` then streams `TextDelta` events and one closing `Finished` from
LLM.Generate, with the timestamps a time-aware model (E.T. Chat) wrote. Closing that
iterator cancels the generation.

Output media (presets with `outputs`, NExT-GPT): the request's `modalities` and per-modality
decoding parameters are checked in `validate` against the preset's decoders and limits. Each
output signal the LLM streams (a decoder conditioning) is sent to the decoder service at once,
while the text goes on streaming; after the LLM's last chunk the gateway waits for them and
yields one `MediaOutput` per item, in order, before the `Finished`. A decoder that fails or is
down gives that item an error (`MediaOutput.error`); the text and the other items still arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway.domain import (
    ChatRequest,
    Event,
    Finished,
    MediaOutput,
    ModelEntry,
    TextDelta,
)
from gateway.feature_cache import FeatureCache, content_digest, uuid_key
from gateway.llm_client import LLMClient, generate_request
from gateway.media import MediaFetcher
from gateway.metrics import GatewayMetrics
from modalmesh.v1 import llm_pb2
from services.common import modalities
from services.common.content import ROLES, MediaFeatures, MediaInput, MediaPart, TimePart, Timestamp, Turn
from services.common.decode_params import check_params
from services.common.errors import (
    InvalidArgumentError,
    ModalmeshError,
    NotFoundError,
    PayloadTooLargeError,
)
from services.common.presets import Preset
from services.common.settings import Settings
from services.common.tensor_codec import tensor_to_array

logger = logging.getLogger(__name__)

_FINISH_REASONS = {llm_pb2.FINISH_REASON_STOP: "stop", llm_pb2.FINISH_REASON_LENGTH: "length"}
_UINT32_MAX = 2**32 - 1
_DEFAULT_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


class Encoder(Protocol):
    """What serving needs of the encoder service's client (services.encoders.client)."""

    async def encode(
        self, model: str, items: list[bytes], *, request_id: str | None, timeout_s: float, modality: str
    ) -> Sequence[MediaFeatures[np.ndarray]]: ...

    async def ready(self, model: str) -> bool: ...

    async def close(self) -> None: ...


class Decoded(Protocol):
    """What the decoder client returns for one item."""

    data: bytes
    mime_type: str
    seed: int


class Decoder(Protocol):
    """The decoder service client (services.decoders.client.DecoderClient)."""

    async def decode(
        self,
        modality: str,
        conditioning: np.ndarray,
        params: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> Decoded: ...

    async def ready(self, model: str) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class PreparedChat:
    """A validated request whose media are encoded, ready for `ChatService.generate`.

    Attributes:
        id: "chatcmpl-<request id>".
        created: Unix seconds, the same in every chunk of the reply.
        model: The model name echoed in the reply (as the client named it).
        generate_request: What goes to LLM.Generate.
        started: time.monotonic() when the request arrived (for latency metrics).
        timestamps: Whether the preset writes timestamps (a timestamp head): replies then
            always carry a `timestamps` list, empty or not.
    """

    id: str
    created: int
    model: str
    generate_request: llm_pb2.GenerateRequest
    started: float
    timestamps: bool = False
    decoding: Mapping[str, Mapping[str, Any]] | None = None


class ChatService:
    """Validates, loads media, consults the feature cache and the encoders, streams from the LLM.

    Args:
        settings: Limits, timeouts and addresses.
        preset: The served preset (only its YAML is needed, not its weights).
        encoder: Client of the encoder service.
        llm: Client of the LLM service.
        cache: The Redis feature cache.
        fetcher: Loads media URLs.
        metrics: Where to record; a fresh registry by default.
    """

    def __init__(
        self,
        settings: Settings,
        preset: Preset,
        *,
        encoder: Encoder,
        llm: LLMClient,
        cache: FeatureCache,
        fetcher: MediaFetcher,
        metrics: GatewayMetrics | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        self.settings = settings
        self.preset = preset
        self.encoder = encoder
        self.llm = llm
        self.cache = cache
        self.fetcher = fetcher
        self.decoder = decoder
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.created = int(time.time())

    @classmethod
    def from_settings(cls, settings: Settings, preset: Preset) -> ChatService:
        """The service with real clients for the addresses in `settings`."""
        # Imported here: the services' client packages are only needed by a running gateway.
        from services.decoders.client import DecoderClient
        from services.encoders.client import EncoderClient

        decoder = None
        if preset.outputs:
            decoder = DecoderClient(
                settings.decoder_target(),
                timeout_s=settings.decoder_timeout_s,
                models={m: preset.decoder_model(m) for m in preset.outputs},
            )
        return cls(
            settings,
            preset,
            encoder=EncoderClient(settings.encoder_target(), settings=settings),
            llm=LLMClient(settings.llm_target(), settings=settings),
            cache=FeatureCache(settings.redis_url, ttl_s=settings.feature_cache_ttl_s),
            fetcher=MediaFetcher.from_settings(settings),
            decoder=decoder,
        )

    # -- validation ----------------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> tuple[str, str]:
        """(name to echo, adapter for the LLM service: "" = current, or "name@version").

        Raises:
            NotFoundError: Not the preset's name nor "<preset>@<version>".
        """
        served, adapter = self.preset.name, self.preset.adapter.name
        if not name or name in (served, adapter):
            return name or served, ""
        base, sep, version = name.partition("@")
        if sep and version and base in (served, adapter):
            return name, f"{adapter}@{version}"
        raise NotFoundError(
            f"The model {name!r} does not exist; this gateway serves {served!r} "
            f"(or {served}@<version> to pin an adapter version; see GET /v1/models)",
            param="model",
        )

    def _sampling(self, request: ChatRequest) -> llm_pb2.SamplingParams:
        """The LLM's sampling parameters, range-checked; an unset field stays unset, for the LLM
        service to fill from the preset's `generation:` section."""
        max_tokens = request.max_tokens
        limit = min(self.preset.llm.max_context_tokens, _UINT32_MAX)
        if max_tokens is not None and not 0 < max_tokens <= limit:
            expected = (
                "a positive integer" if max_tokens <= 0 else (f"at most {limit} (the model's context length)")
            )
            raise InvalidArgumentError(
                f"{request.max_tokens_param}: expected {expected}, got {max_tokens}",
                param=request.max_tokens_param,
            )
        _check_penalties(request)
        t, p, k = request.temperature, request.top_p, request.top_k
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise InvalidArgumentError(f"temperature: expected a number >= 0, got {t}", param="temperature")
        if p is not None and not (math.isfinite(p) and 0 < p <= 1):
            raise InvalidArgumentError(f"top_p: expected a number in (0, 1], got {p}", param="top_p")
        if k is not None and not -1 <= k <= _UINT32_MAX:
            raise InvalidArgumentError(
                f"top_k: expected 0 or -1 (disabled) or a positive integer, got {k}", param="top_k"
            )
        if request.seed is not None and not -(2**63) <= request.seed < 2**63:
            raise InvalidArgumentError(f"seed: expected a 64-bit integer, got {request.seed}", param="seed")
        return llm_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=t,
            top_p=p,
            top_k=None if k is None else max(k, 0),
            seed=request.seed,
            stop=[s for s in request.stop if s],
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            stop_token_ids=request.stop_token_ids,
        )

    def validate(self, request: ChatRequest) -> tuple[str, str, llm_pb2.SamplingParams]:
        """Check a request against the preset and limits: (echo name, adapter, sampling).

        Raises:
            InvalidArgumentError: Empty conversation, bad role, bad sampling value, more media
                parts than settings.media_max_items, more items of a modality than the
                preset's max_per_prompt, a modality the preset has no encoder for, or
                time parts the preset or the request cannot take.
            NotFoundError: Unknown model.
        """
        if not request.turns:
            raise InvalidArgumentError(
                "messages: expected at least one message, got an empty list", param="messages"
            )
        for i, turn in enumerate(request.turns):
            if turn.role not in ROLES:
                raise InvalidArgumentError(
                    f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {turn.role!r}",
                    param=f"messages[{i}].role",
                )
        model, adapter = self.resolve_model(request.model)
        sampling = self._sampling(request)
        self._check_media_counts(request.media())
        self._check_time_parts(request)
        self._check_outputs(request)
        return model, adapter, sampling

    def _check_time_parts(self, request: ChatRequest) -> None:
        """Time parts need the preset's timestamp heads and an item of their modality (checked
        here before any media is encoded; the LLM service checks them again)."""
        first = next((p for t in request.turns for p in t.parts if isinstance(p, TimePart)), None)
        if first is None:
            return
        spec = self.preset.heads.timestamps
        where = first.param or "messages"
        if spec is None:
            raise InvalidArgumentError(
                f"{where}: a time part needs a preset with timestamp heads (E.T. Chat's <vid>); "
                f"preset {self.preset.name} has none",
                param=where,
            )
        if not any(m.modality == spec.modality for m in request.media()):
            raise InvalidArgumentError(
                f"{where}: a time part names a frame of a {spec.modality} item, and the request has "
                f"no {spec.modality} media",
                param=where,
            )

    def _check_outputs(self, request: ChatRequest) -> None:
        """The requested output modalities and their decoding parameters, against the preset."""
        can = ["text", *self.preset.outputs]
        for i, modality in enumerate(request.modalities):
            if modality not in can:
                raise InvalidArgumentError(
                    f"modalities[{i}]: preset {self.preset.name} can produce {', '.join(can)}; got {modality!r}",
                    param=f"modalities[{i}]",
                )
        for modality, values in request.decoding.items():
            spec = self.preset.outputs.get(modality)
            if spec is None:
                raise InvalidArgumentError(
                    f"{modality}: decoding parameters for {modality}, which preset {self.preset.name} "
                    f"cannot produce (it can produce {', '.join(can)})",
                    param=modality,
                )
            check_params(modality, values, spec.decoder.limits, where=f"{modality}.")

    def _check_media_counts(self, media: list[MediaInput]) -> None:
        limit = self.settings.media_max_items
        if len(media) > limit:
            raise InvalidArgumentError(
                f"messages: expected at most {limit} media parts per request (all messages together), "
                f"got {len(media)}",
                param=media[limit].param or "messages",
            )
        for modality in sorted({m.modality for m in media}):
            items = [m for m in media if m.modality == modality]
            spec = self.preset.modalities.get(modality)
            if spec is None:
                first = items[0]
                accepted = ", ".join(sorted(self.preset.modalities)) or "text only"
                if modality not in modalities.MODALITIES:  # a generic part's name (input_media)
                    raise InvalidArgumentError(
                        f"{first.param}: modality {modality!r} is unknown; preset {self.preset.name} "
                        f"accepts {accepted}",
                        param=first.param or "messages",
                    )
                raise InvalidArgumentError(
                    f"{first.param}: preset {self.preset.name} has no {modality} encoder; it accepts "
                    f"{accepted} (got {_count(len(items), modality)})",
                    param=first.param or "messages",
                )
            if len(items) > spec.max_per_prompt:
                extra = items[spec.max_per_prompt]
                raise InvalidArgumentError(
                    f"preset {self.preset.name} accepts at most {_count(spec.max_per_prompt, modality)} "
                    f"per request, got {len(items)}",
                    param=extra.param or "messages",
                )

    # -- media -----------------------------------------------------------------------------------

    async def _bytes_of(self, item: MediaInput) -> bytes:
        if item.data is not None:
            if len(item.data) > self.settings.media_max_bytes:
                raise PayloadTooLargeError(
                    f"{item.modality} is {len(item.data)} bytes, over the limit of "
                    f"{self.settings.media_max_bytes} bytes"
                )
            if not item.data:
                raise InvalidArgumentError(f"{item.modality} data is empty")
            return item.data
        if item.url is None:
            raise InvalidArgumentError(f"{item.modality} part has neither a URL nor data")
        started = time.monotonic()
        data = await self.fetcher.load(item.url, item.modality)
        self.metrics.stage_latency.labels(stage="fetch").observe(time.monotonic() - started)
        return data

    async def _features_of(self, item: MediaInput, number: int, request_id: str) -> MediaFeatures[np.ndarray]:
        """One item's features and frame times: from the cache, or from the encoder (then cached).

        `number` counts the item among the request's items of its modality, for messages.
        """
        try:
            model = self.preset.triton_model(item.modality)
            encoder_id = self.preset.encoder_id(item.modality)
            if item.uuid is not None:  # the client's id: a hit needs no fetch and no hashing
                digest = uuid_key(item.uuid)
                cached = await self.cache.get(encoder_id, digest)
                self.metrics.feature_cache.labels(result="hit" if cached is not None else "miss").inc()
                if cached is not None:
                    return _features(item.modality, *cached)
                if item.url is None and item.data is None:
                    raise InvalidArgumentError(
                        f"uuid {item.uuid!r}: no {item.modality} features are cached under it (never "
                        "sent with this preset's encoder, or expired); send the media with the uuid"
                    )
                data = await self._bytes_of(item)
            else:
                data = await self._bytes_of(item)
                digest = content_digest(data)
                cached = await self.cache.get(encoder_id, digest)
                self.metrics.feature_cache.labels(result="hit" if cached is not None else "miss").inc()
                if cached is not None:
                    return _features(item.modality, *cached)
            started = time.monotonic()
            (encoded,) = await self.encoder.encode(
                model,
                [data],
                request_id=request_id,
                timeout_s=self.settings.encoder_timeout_s,
                modality=item.modality,
            )
            self.metrics.stage_latency.labels(stage="encode").observe(time.monotonic() - started)
            features = np.ascontiguousarray(encoded.features, dtype=np.float32)  # (rows, dim)
            times = np.asarray(encoded.times, dtype=np.float32).reshape(-1)  # (frames,)
            await self.cache.put(encoder_id, digest, features, times)
            return _features(item.modality, features, times)
        except InvalidArgumentError as e:
            raise _about(item, number, e) from e

    async def _encode_turns(self, request: ChatRequest) -> list[Turn[MediaFeatures[np.ndarray]]]:
        """The request's turns with each media part's input replaced by its features (all items
        loaded concurrently)."""
        media = request.media()
        seen: dict[str, int] = {}
        numbers = []
        for m in media:
            numbers.append(seen.get(m.modality, 0))
            seen[m.modality] = numbers[-1] + 1
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._features_of(m, n, request.request_id))
                    for m, n in zip(media, numbers, strict=True)
                ]
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        encoded = iter(t.result() for t in tasks)
        return [
            Turn(turn.role, [MediaPart(next(encoded)) if isinstance(p, MediaPart) else p for p in turn.parts])
            for turn in request.turns
        ]

    # -- generation ------------------------------------------------------------------------------

    async def prepare(self, request: ChatRequest) -> PreparedChat:
        """Validate, load and encode the media, and build the GenerateRequest.

        Raises:
            ModalmeshError: Any client error (400/404/413) or an unavailable encoder (503).
        """
        started = time.monotonic()
        model, adapter, sampling = self.validate(request)
        turns = await self._encode_turns(request)
        generate = generate_request(
            turns,
            request_id=request.request_id,
            adapter=adapter,
            sampling=sampling,
            output_modalities=[m for m in dict.fromkeys(request.modalities) if m != "text"],
        )
        return PreparedChat(
            id=f"chatcmpl-{request.request_id}",
            created=int(time.time()),
            model=model,
            generate_request=generate,
            started=started,
            timestamps=self.preset.heads.timestamps is not None,
            decoding=request.decoding,
        )

    async def generate(
        self, prepared: PreparedChat, *, transport: str = "http"
    ) -> AsyncGenerator[Event, None]:
        """Stream the reply: TextDelta events, then one Finished.

        Closing the iterator early (client gone) cancels the LLM call.

        Raises:
            ModalmeshError: The LLM service failed (UNAVAILABLE -> 503, NOT_FOUND adapter -> 404...).
        """
        first = True
        adapter: str | None = None
        decodes: list[asyncio.Task[MediaOutput]] = []
        try:
            async with contextlib.aclosing(self.llm.generate(prepared.generate_request)) as chunks:
                async for chunk in chunks:
                    adapter = adapter or chunk.adapter or None
                    if chunk.text and first:
                        first = False
                        self.metrics.ttft.labels(transport=transport).observe(
                            time.monotonic() - prepared.started
                        )
                    for signal in chunk.outputs:  # decode while the text goes on streaming
                        decodes.append(asyncio.create_task(self._decode(prepared, signal)))
                    if chunk.finish_reason != llm_pb2.FINISH_REASON_UNSPECIFIED:
                        for task in decodes:
                            yield await task
                        yield self._finished(prepared, chunk, transport, adapter)
                        return
                    if chunk.text or chunk.timestamps:
                        yield TextDelta(chunk.text, _timestamps(chunk))
        finally:
            for task in decodes:
                task.cancel()
        raise ModalmeshError("the llm service ended the reply without a finish reason")

    async def _decode(self, prepared: PreparedChat, signal: llm_pb2.OutputSignal) -> MediaOutput:
        """One output item through the decoder service; a failure becomes the item's error."""
        modality = signal.modality
        where = MediaOutput(modality=modality, index=signal.index, char_offset=signal.char_offset)
        if self.decoder is None:
            return dataclasses.replace(
                where,
                error=f"preset {self.preset.name} has no {modality} decoder",
                error_code=400,
            )
        started = time.monotonic()
        request_id = prepared.generate_request.request_id
        try:
            conditioning = tensor_to_array(signal.conditioning, what=f"{modality} output {signal.index}")
            params = dict((prepared.decoding or {}).get(modality, {}))
            out = await self.decoder.decode(modality, conditioning, params, request_id=request_id or None)
        except ModalmeshError as e:
            logger.warning("%s output %s failed: %s", modality, signal.index, e.message)
            return dataclasses.replace(where, error=e.message, error_code=e.http_status)
        except Exception as e:  # the text reply must still arrive
            logger.error("%s output %s failed", modality, signal.index, exc_info=e)
            return dataclasses.replace(where, error=f"internal error ({type(e).__name__})", error_code=500)
        self.metrics.stage_latency.labels(stage=f"decode_{modality}").observe(time.monotonic() - started)
        return dataclasses.replace(where, data=out.data, mime_type=out.mime_type, seed=int(out.seed))

    def _finished(
        self, prepared: PreparedChat, chunk: llm_pb2.GenerateChunk, transport: str, adapter: str | None
    ) -> Finished:
        usage = chunk.usage
        self.metrics.e2e_latency.labels(transport=transport).observe(time.monotonic() - prepared.started)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.completion_tokens.inc(usage.completion_tokens)
        return Finished(
            text=chunk.text,
            finish_reason=_FINISH_REASONS.get(chunk.finish_reason, "stop"),
            stop_reason=chunk.stop_token_id if chunk.HasField("stop_token_id") else chunk.stop_reason or None,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            adapter=adapter,
            timestamps=_timestamps(chunk),
        )

    # -- models and health -----------------------------------------------------------------------

    async def list_models(self) -> list[ModelEntry]:
        """The preset, then each adapter version the LLM service has loaded (current first).

        The preset is listed even when the LLM service does not answer.
        """
        served = self.preset.name
        max_len = self.preset.llm.max_context_tokens
        entries = [
            ModelEntry(id=served, root=served, parent=None, created=self.created, max_model_len=max_len)
        ]
        try:
            info = await self.llm.model_info()
        except ModalmeshError as e:
            logger.info("listing models without adapter versions: %s", e.message)
            return entries
        if info.HasField("sampling_defaults"):
            entries[0] = dataclasses.replace(entries[0], sampling_defaults=_defaults(info.sampling_defaults))
        seen = {served}
        for adapter in [info.adapter, *info.adapters]:
            _, sep, version = adapter.partition("@")
            entry_id = f"{served}@{version}"
            if not sep or not version or entry_id in seen:
                continue
            seen.add(entry_id)
            created = info.created if adapter == info.adapter and info.created else self.created
            entries.append(
                ModelEntry(id=entry_id, root=adapter, parent=served, created=created, max_model_len=max_len)
            )
        return entries

    async def _encoder_ready(self, model: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.encoder.ready(model), timeout=2.0))
        except Exception as e:  # a health probe must answer, whatever the client raises
            logger.debug("encoder readiness check of %s failed: %s", model, e)
            return False

    async def readiness(self) -> dict[str, str | None]:
        """Each dependency -> None when ready, else why not ("llm", "encoder", "decoder")."""
        models = [self.preset.triton_model(m) for m in self.preset.modalities]
        decoders = [self.preset.decoder_model(m) for m in self.preset.outputs] if self.decoder else []
        llm_ok, *ok = await asyncio.gather(
            self.llm.ready(),
            *(self._encoder_ready(m) for m in models),
            *(self._decoder_ready(m) for m in decoders),
        )
        down = [m for m, up in zip(models, ok[: len(models)], strict=True) if not up]
        out = {
            "llm": None if llm_ok else f"the llm service at {self.llm.target} is not ready",
            "encoder": None
            if not down
            else (
                f"the encoder service at {self.settings.encoder_target()} is not ready for {', '.join(down)}"
            ),
        }
        if decoders:
            down = [m for m, up in zip(decoders, ok[len(models) :], strict=True) if not up]
            out["decoder"] = (
                None
                if not down
                else f"the decoder service at {self.settings.decoder_target()} is not ready for {', '.join(down)}"
            )
        return out

    async def _decoder_ready(self, model: str) -> bool:
        assert self.decoder is not None
        try:
            return bool(await asyncio.wait_for(self.decoder.ready(model), timeout=2.0))
        except Exception as e:  # a health probe must answer, whatever the client raises
            logger.debug("decoder readiness check of %s failed: %s", model, e)
            return False

    async def aclose(self) -> None:
        """Close every client."""
        await self.fetcher.aclose()
        await self.cache.aclose()
        await self.llm.close()
        await self.encoder.close()
        if self.decoder is not None:
            await self.decoder.close()


def _count(n: int, modality: str) -> str:
    """How many items of a modality, in words: 1 video, 4 images, 2 audio clips (the registry
    record's `noun`; a name the registry does not know counts as "<name>s")."""
    record = modalities.MODALITIES.get(modality)
    one, many = record.noun if record is not None else (modality, modality + "s")
    return f"{n} {one if n == 1 else many}"


def _check_penalties(request: ChatRequest) -> None:
    """vLLM's ranges: presence and frequency penalties in [-2, 2], repetition penalty > 0."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value is not None and not -2.0 <= value <= 2.0:  # NaN fails too
            raise InvalidArgumentError(f"{name}: expected a number in [-2, 2], got {value}", param=name)
    r = request.repetition_penalty
    if r is not None and not (math.isfinite(r) and r > 0):
        raise InvalidArgumentError(
            f"repetition_penalty: expected a number > 0 (1 disables it), got {r}", param="repetition_penalty"
        )
    for i, token in enumerate(request.stop_token_ids):
        if not 0 <= token <= _UINT32_MAX:
            raise InvalidArgumentError(
                f"stop_token_ids[{i}]: expected a token id >= 0, got {token}", param="stop_token_ids"
            )


def _defaults(msg: llm_pb2.SamplingParams) -> dict[str, Any]:
    """The JSON form of the LLM's sampling defaults (floats rounded off their float32 form)."""
    out: dict[str, Any] = {}
    for name in _DEFAULT_FIELDS:
        if msg.HasField(name):
            value = getattr(msg, name)
            out[name] = round(value, 6) if isinstance(value, float) else value
    out["stop"], out["stop_token_ids"] = list(msg.stop), list(msg.stop_token_ids)
    return out


def _timestamps(chunk: llm_pb2.GenerateChunk) -> tuple[Timestamp, ...]:
    return tuple(
        Timestamp(media_index=t.media_index, frame=t.frame, seconds=t.seconds, char_offset=t.char_offset)
        for t in chunk.timestamps
    )


def _features(modality: str, features: np.ndarray, times: np.ndarray) -> MediaFeatures[np.ndarray]:
    """An item's features (rows, dim) and float32 frame times (frames,) as `MediaFeatures`."""
    return MediaFeatures(modality, features, tuple(times.tolist()))


def _about(item: MediaInput, number: int, error: InvalidArgumentError) -> InvalidArgumentError:
    """The client error naming the item, e.g. "messages[0].content[1] (video 0): not a video ..."."""
    if error.param is not None:
        return error
    detail = error.message
    index = getattr(error, "index", None)  # the encoder client's EncoderItemError
    if index is not None:
        # The client numbers the item within its one-item encode call; the request's own
        # numbering and the part's place say more.
        detail = detail.removeprefix(f"{item.modality} {index}: ")
    where = f"{item.param} ({item.modality} {number})" if item.param else f"{item.modality} {number}"
    cls = PayloadTooLargeError if isinstance(error, PayloadTooLargeError) else InvalidArgumentError
    return cls(f"{where}: {detail}", param=item.param or None)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a task group: a modalmesh error if any, else the first one."""
    flat: list[BaseException] = []

    def walk(eg: BaseExceptionGroup) -> None:
        for e in eg.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                flat.append(e)

    walk(group)
    for e in flat:
        if isinstance(e, ModalmeshError):
            return e
    return flat[0]
