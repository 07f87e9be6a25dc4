"""Generated media encode to files that decode back to the same size, duration and frames."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgumentError
from services.decoders.media_out import encode_gif, encode_media, encode_mp4, encode_wav
from services.models.decoders.pipelines import AudioOut, DecodeParams, Decoder, ImageOut, VideoOut, decode
from services.models.decoders.tiny import TINY_CONDITIONING


def _cond(kind: str) -> torch.Tensor:
    return torch.randn(*TINY_CONDITIONING[kind], generator=torch.Generator().manual_seed(0))


def _video_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_image_to_png(decoders: dict[str, Decoder]) -> None:
    out = decode(decoders["image"], _cond("image"), DecodeParams(steps=2, height=40, width=24, seed=0))
    encoded = encode_media(out)
    assert encoded.mime_type == "image/png" and encoded.data.startswith(b"\x89PNG")
    back = Image.open(io.BytesIO(encoded.data))
    assert back.format == "PNG" and back.size == (24, 40)
    assert isinstance(out, ImageOut) and np.array_equal(
        np.asarray(back.convert("RGB")), np.asarray(out.image)
    )


def test_audio_to_wav(decoders: dict[str, Decoder]) -> None:
    out = decode(decoders["audio"], _cond("audio"), DecodeParams(steps=2, duration_s=1.5, seed=0))
    encoded = encode_media(out)
    assert encoded.mime_type == "audio/wav"
    with wave.open(io.BytesIO(encoded.data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16000)
        assert wav.getnframes() / wav.getframerate() == pytest.approx(1.5)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert isinstance(out, AudioOut)
    np.testing.assert_allclose(samples / 32767, out.waveform, atol=1 / 32767)


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_video_to_file(decoders: dict[str, Decoder], fmt: str) -> None:
    out = decode(
        decoders["video"],
        _cond("video"),
        DecodeParams(steps=2, height=32, width=48, num_frames=6, fps=6, seed=0),
    )
    encoded = encode_media(out, fmt)
    assert encoded.mime_type == {"mp4": "video/mp4", "gif": "image/gif"}[fmt]
    frames = _video_frames(encoded.data)
    assert len(frames) == 6 and frames[0].shape == (32, 48, 3)
    if fmt == "gif":  # lossless palette of a few colours per frame, but the timing must hold
        gif = Image.open(io.BytesIO(encoded.data))
        assert gif.n_frames == 6 and gif.info["duration"] == pytest.approx(1000 / 6, abs=10)
    else:
        assert isinstance(out, VideoOut)
        assert np.abs(frames[0].astype(int) - out.frames[0].astype(int)).mean() < 20  # lossy but close


def test_distinct_synthetic_frames_round_trip() -> None:
    frames = np.stack([np.full((16, 16, 3), 20 * i, dtype=np.uint8) for i in range(7)])
    assert len(_video_frames(encode_mp4(frames, 7).data)) == 7
    assert Image.open(io.BytesIO(encode_gif(frames, 7).data)).n_frames == 7


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="expected even height and width"):
        encode_mp4(np.zeros((2, 15, 16, 3), dtype=np.uint8), 4)
    with pytest.raises(InvalidArgumentError, match=r"expected \(frames >= 1, H, W, 3\) uint8"):
        encode_gif(np.zeros((0, 16, 16, 3), dtype=np.uint8), 4)
    with pytest.raises(InvalidArgumentError, match=r"expected shape \(samples,\)"):
        encode_wav(np.zeros((2, 10), dtype=np.float32), 16000)
    image = ImageOut(Image.new("RGB", (8, 8)), seed=0)
    with pytest.raises(InvalidArgumentError, match="image format: expected one of \\['png'\\], got 'gif'"):
        encode_media(image, "gif")
