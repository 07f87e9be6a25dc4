"""The decoder service's Triton side: one PyTriton model per output modality of the preset.

Each output modality's `Decoder` is bound as a Triton model named `preset.decoder_model(m)`
(e.g. "image_decoder") with Triton's dynamic batcher (`max_batch_size` from the modality's
`DecoderSpec`, queue delay `decoder_batch_delay_us` from the settings). Clients speak KServe v2
(stock `tritonclient.grpc` works); the tensors are described in `services.decoders.protocol`.

The inference callable uses PyTriton's raw interface: it receives the batch's requests as a
list, decodes all their items with one `decode_batch` call (one pipeline call per group of
items with equal parameters apart from the seed, each item with its own generator), encodes
each item's media and answers one dict per request.

Why `error` exists: PyTriton 0.7.0 fails every request of a dynamic batch when the inference
callable raises, so a request with bad parameters would fail the good ones batched with it.
Per-item refusals (parameters out of range, bad JSON, non-finite conditioning) therefore travel
in-band: the request succeeds, its `error` holds the message and its `media` is empty. Only a
server fault (the pipeline itself failing) raises and fails the batch with Triton's INTERNAL
status. A `prompt_embeds` of the wrong shape or datatype never reaches this code: Triton
refuses the whole request with INVALID_ARGUMENT, naming the expected and the received shape
or datatype.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.common.errors import InvalidArgumentError
from services.common.presets import DecoderSpec
from services.common.triton_service import InferFn, TensorSpec, bind_batched, respond_per_request
from services.decoders.media_out import FORMATS, EncodedMedia, encode_media
from services.decoders.protocol import (
    EMBEDS_INPUT,
    ERROR_OUTPUT,
    MEDIA_OUTPUT,
    MIME_OUTPUT,
    NO_SEED,
    PARAM_FIELDS,
    PARAMS_INPUT,
    SEED_OUTPUT,
)
from services.models.decoders.pipelines import DecodeParams, Decoder, Media, decode_batch

logger = logging.getLogger(__name__)


@dataclass
class BoundDecoder:
    """An output modality's decoder, the Triton model that serves it and its media format."""

    modality: str
    model_name: str
    spec: DecoderSpec
    decoder: Decoder
    media_format: str


@dataclass(frozen=True)
class ItemRequest:
    """One item's parsed `params`: the decoding parameters and the media format."""

    params: DecodeParams
    media_format: str


def parse_params(data: bytes, *, modality: str, default_format: str) -> ItemRequest:
    """One item's `params` input: a UTF-8 JSON object of `PARAM_FIELDS` (null = default).

    Ranges are checked later, against the decoder's limits (`resolve_params`).

    Raises:
        InvalidArgumentError: Not UTF-8 JSON, not an object, an unknown key, or a format that
            is not one of the modality's.
    """
    try:
        value = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(
            f"params: expected a UTF-8 JSON object, got invalid JSON ({e})", param="params"
        ) from None
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"params: expected a JSON object, got a JSON {type(value).__name__}", param="params"
        )
    for name in sorted(set(value) - set(PARAM_FIELDS)):  # worded as `params.check_params` does
        raise InvalidArgumentError(
            f"{name}: unknown decoding parameter; expected some of {list(PARAM_FIELDS)}", param=name
        )
    fmt = value.pop("format", None)
    if fmt is None:
        fmt = default_format
    if fmt not in FORMATS[modality]:
        raise InvalidArgumentError(
            f"format: expected one of {list(FORMATS[modality])} for {modality}, got {fmt!r}", param="format"
        )
    for name, v in value.items():  # lists and objects would not even be hashable
        if v is not None and not isinstance(v, int | float | str | bool):
            raise InvalidArgumentError(f"{name}: expected a number, got {json.dumps(v)}", param=name)
    return ItemRequest(DecodeParams(**value), fmt)


def _items(request: Any) -> tuple[np.ndarray, list[bytes]]:
    """A request's inputs: (n, rows, width) float32 conditioning and n `params` byte strings."""
    embeds = request[EMBEDS_INPUT]  # (n, rows, width) FP32; Triton checked shape and datatype
    params = [bytes(x) for x in request[PARAMS_INPUT].reshape(-1)]  # (n, 1) BYTES
    if len(params) != len(embeds):
        raise InvalidArgumentError(
            f"{PARAMS_INPUT}: expected one per {EMBEDS_INPUT} item ({len(embeds)}), got {len(params)}"
        )
    return embeds, params


def _encode(outcome: Media | InvalidArgumentError, fmt: str) -> EncodedMedia | InvalidArgumentError:
    if isinstance(outcome, InvalidArgumentError):
        return outcome
    try:
        return encode_media(outcome, fmt)
    except InvalidArgumentError as e:
        return e


def _response(
    outcomes: list[tuple[EncodedMedia | InvalidArgumentError, int]], *, model_name: str
) -> dict[str, np.ndarray]:
    """One request's outputs, (n, 1) each, C-contiguous."""
    n = len(outcomes)
    media = np.empty((n, 1), dtype=object)  # (n, 1) BYTES
    mime = np.empty((n, 1), dtype=object)  # (n, 1) BYTES
    seeds = np.full((n, 1), NO_SEED, dtype=np.int64)  # (n, 1) INT64
    errors = np.empty((n, 1), dtype=object)  # (n, 1) BYTES
    for k, (out, seed) in enumerate(outcomes):
        if isinstance(out, InvalidArgumentError):
            media[k, 0], mime[k, 0], errors[k, 0] = b"", b"", out.message.encode()
            logger.info("%s: item %d refused: %s", model_name, k, out.message)
            continue
        media[k, 0], mime[k, 0], errors[k, 0] = out.data, out.mime_type.encode(), b""
        seeds[k, 0] = seed
    return {MEDIA_OUTPUT: media, MIME_OUTPUT: mime, SEED_OUTPUT: seeds, ERROR_OUTPUT: errors}


def make_infer_fn(bound: BoundDecoder) -> InferFn:
    """The inference callable of one model, over PyTriton's raw list of requests.

    Every request's items are decoded with one `decode_batch` call, then encoded and split
    back per request.
    """
    decoder, name = bound.decoder, bound.model_name

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        embeds: list[torch.Tensor] = []
        parsed: list[ItemRequest | InvalidArgumentError] = []
        sizes = []
        for request in requests:
            cond, params = _items(request)
            sizes.append(len(params))
            for k, data in enumerate(params):
                # Triton delivers FP32; the pipeline may run in another dtype.
                embeds.append(torch.from_numpy(np.array(cond[k])).to(decoder.dtype))  # (rows, width)
                try:
                    parsed.append(
                        parse_params(data, modality=bound.modality, default_format=bound.media_format)
                    )
                except InvalidArgumentError as e:
                    parsed.append(e)
        todo = [k for k, p in enumerate(parsed) if isinstance(p, ItemRequest)]
        start = time.perf_counter()
        generated = decode_batch(
            decoder,
            [embeds[k] for k in todo],
            [p.params for p in parsed if isinstance(p, ItemRequest)],
        )
        elapsed_ms = (time.perf_counter() - start) * 1000
        outcomes: list[tuple[EncodedMedia | InvalidArgumentError, int]] = []
        done = dict(zip(todo, generated, strict=True))
        for k, p in enumerate(parsed):
            if isinstance(p, InvalidArgumentError):
                outcomes.append((p, NO_SEED))
                continue
            media = done[k]
            outcomes.append((_encode(media, p.media_format), getattr(media, "seed", NO_SEED)))
        return respond_per_request(
            requests,
            sizes,
            outcomes,
            lambda mine: _response(list(mine), model_name=name),
            lambda n: logger.info(
                "%s: decoded %d item(s) in a batch of %d (%d generated, %.1f ms)",
                name,
                n,
                len(parsed),
                len(todo),
                elapsed_ms,
            ),
        )

    return infer


def bind_decoder(triton: Any, bound: BoundDecoder, *, batch_delay_us: int) -> None:
    """Bind one decoder to a (not yet running) `pytriton.triton.Triton` as a batched model."""
    bind_batched(
        triton,
        model_name=bound.model_name,
        infer_func=make_infer_fn(bound),
        inputs=[
            TensorSpec(EMBEDS_INPUT, np.float32, bound.decoder.conditioning_shape),
            TensorSpec(PARAMS_INPUT, bytes, (1,)),
        ],
        outputs=[
            TensorSpec(MEDIA_OUTPUT, bytes, (1,)),
            TensorSpec(MIME_OUTPUT, bytes, (1,)),
            TensorSpec(SEED_OUTPUT, np.int64, (1,)),
            TensorSpec(ERROR_OUTPUT, bytes, (1,)),
        ],
        max_batch_size=bound.spec.max_batch_size,
        batch_delay_us=batch_delay_us,
    )
