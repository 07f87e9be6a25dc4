"""The decoder service: load the preset's decoders once, warm them up, serve them with Triton.

`load_decoders` loads each output modality's pipeline (the spec's dtype, defaults, limits and
negative embedding) on the given device; `DecoderServer` warms each one up, then starts Triton
with one model per output modality (see `services.decoders.triton`) and stops it on request.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from services.common.devices import default_device
from services.common.errors import FailedPreconditionError
from services.common.presets import Preset
from services.common.settings import Settings
from services.common.triton_service import PortFields, TritonServer
from services.decoders.media_out import encode_media
from services.decoders.triton import BoundDecoder, bind_decoder
from services.models.decoders.pipelines import DecodeParams, decode, load_decoder

logger = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def load_decoders(preset: Preset, *, device: str | torch.device | None = None) -> list[BoundDecoder]:
    """Load every output modality's decoder of the preset (once per process).

    On the CPU a float16 spec is loaded in float32 (CPU half-precision convolutions are slow or
    missing); the Triton input stays FP32 either way.

    Raises:
        FailedPreconditionError: The preset has no `outputs`, or a folder holds the wrong pipeline.
        NotFoundError: A decoder folder does not exist.
    """
    if not preset.outputs:
        raise FailedPreconditionError(f"preset {preset.name} has no outputs: no decoder to serve")
    device = torch.device(device) if device is not None else default_device()
    bound = []
    for modality, out in preset.outputs.items():
        spec = out.decoder
        dtype = TORCH_DTYPES[spec.dtype]
        if device.type == "cpu" and dtype == torch.float16:
            logger.warning("%s decoder: float16 on the CPU; loading it in float32", modality)
            dtype = torch.float32
        defaults = DecodeParams(**spec.defaults.model_dump())
        decoder = load_decoder(
            modality,
            spec.checkpoint,
            dtype=dtype,
            device=device,
            limits=spec.limits,
            negative=spec.negative,
            defaults=defaults,
        )
        if decoder.conditioning_shape != tuple(out.conditioning):
            raise FailedPreconditionError(
                f"outputs.{modality}.conditioning: the preset says {tuple(out.conditioning)}, the decoder "
                f"at {spec.checkpoint} takes {decoder.conditioning_shape}",
                param=f"outputs.{modality}.conditioning",
            )
        bound.append(
            BoundDecoder(modality, preset.decoder_model(modality), spec, decoder, out.media_format(modality))
        )
    return bound


def warmup(bound: BoundDecoder) -> None:
    """Decode and encode one item of zeros (one step, default size); raises if it fails."""
    decoder = bound.decoder
    start = time.perf_counter()
    embeds = torch.zeros(decoder.conditioning_shape, dtype=decoder.dtype)
    media = decode(decoder, embeds, DecodeParams(steps=1, seed=0))
    encoded = encode_media(media, bound.media_format)
    logger.info(
        "%s warm-up done: %d bytes of %s in %.2fs",
        bound.model_name,
        len(encoded.data),
        encoded.mime_type,
        time.perf_counter() - start,
    )


class DecoderServer(TritonServer[BoundDecoder]):
    """Triton serving the preset's decoders: load -> warm up -> start -> serve -> stop.

    Args:
        decoders: The loaded decoders, one per output modality.
        settings: Addresses, ports (`host`, `decoder_{http,grpc,metrics}_port`) and the
            dynamic batcher's queue delay (`decoder_batch_delay_us`).
    """

    port_fields = PortFields.named("decoder")
    log = logger

    def warmup_model(self, bound: BoundDecoder) -> None:
        warmup(bound)

    def bind_model(self, triton: Any, bound: BoundDecoder) -> None:
        bind_decoder(triton, bound, batch_delay_us=self.settings.decoder_batch_delay_us)


def build_server(preset: Preset, settings: Settings) -> DecoderServer:
    """`python -m services.decoders`' server: every output modality's decoder of the preset
    loaded (a tiny preset's pipelines generated on first use), not started."""
    from services.models.tiny import ensure_generated

    ensure_generated(preset)
    return DecoderServer(load_decoders(preset), settings)
