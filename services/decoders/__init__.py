"""Diffusion decoders of the any-to-any presets (NExT-GPT): pipelines loaded once, requests
validated against their limits and conditioning shapes, and the media encoded to files.

`tiny` writes the tiny random-weight pipeline folders of the tiny twins and tests.
"""

from services.decoders.media_out import (
    EncodedMedia,
    encode_gif,
    encode_media,
    encode_mp4,
    encode_png,
    encode_wav,
)
from services.decoders.pipelines import (
    AudioOut,
    DecodeLimits,
    DecodeParams,
    Decoder,
    ImageOut,
    Media,
    VideoOut,
    check_conditioning,
    decode,
    load_decoder,
    resolve_params,
)

__all__ = [
    "AudioOut",
    "DecodeLimits",
    "DecodeParams",
    "Decoder",
    "EncodedMedia",
    "ImageOut",
    "Media",
    "VideoOut",
    "check_conditioning",
    "decode",
    "encode_gif",
    "encode_media",
    "encode_mp4",
    "encode_png",
    "encode_wav",
    "load_decoder",
    "resolve_params",
]
