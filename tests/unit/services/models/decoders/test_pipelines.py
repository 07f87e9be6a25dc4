"""The tiny decoders generate media of the requested size, duration and frame count,
deterministically for a seed, and refuse bad parameters and conditioning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.models.decoders.pipelines import (
    AudioOut,
    DecodeParams,
    Decoder,
    ImageOut,
    VideoOut,
    decode,
    load_decoder,
)
from services.models.decoders.tiny import TINY_CONDITIONING, write_tiny_decoder

FAST = {"steps": 2}


def cond(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*TINY_CONDITIONING[kind], generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_conditioning_shapes_come_from_the_pipelines(decoders: dict[str, Decoder]) -> None:
    for kind, decoder in decoders.items():
        assert decoder.conditioning_shape == TINY_CONDITIONING[kind]
        assert decoder.negative.shape == (1, *TINY_CONDITIONING[kind])


def test_image_has_the_requested_size(decoders: dict[str, Decoder]) -> None:
    out = decode(decoders["image"], cond("image"), DecodeParams(height=32, width=48, seed=1, **FAST))
    assert isinstance(out, ImageOut)
    assert out.image.size == (48, 32) and out.image.mode == "RGB" and out.seed == 1


def test_audio_has_the_requested_duration(decoders: dict[str, Decoder]) -> None:
    out = decode(decoders["audio"], cond("audio"), DecodeParams(duration_s=1.0, seed=1, **FAST))
    assert isinstance(out, AudioOut)
    assert out.sample_rate == 16000 and out.waveform.shape == (16000,) and out.waveform.dtype == np.float32
    assert np.all(np.abs(out.waveform) <= 1.0)


def test_video_has_the_requested_frames(decoders: dict[str, Decoder]) -> None:
    out = decode(
        decoders["video"], cond("video"), DecodeParams(height=32, width=32, num_frames=5, fps=4, **FAST)
    )
    assert isinstance(out, VideoOut)
    assert out.frames.shape == (5, 32, 32, 3) and out.frames.dtype == np.uint8 and out.fps == 4


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_a_seed_makes_generation_deterministic(decoders: dict[str, Decoder], kind: str) -> None:
    extra = {"duration_s": 0.5} if kind == "audio" else {"height": 32, "width": 32}
    if kind == "video":
        extra["num_frames"] = 2

    def run(seed: int, embeds: torch.Tensor) -> np.ndarray:
        out = decode(decoders[kind], embeds, DecodeParams(seed=seed, **FAST, **extra))
        return np.asarray(
            out.image
            if isinstance(out, ImageOut)
            else out.waveform
            if isinstance(out, AudioOut)
            else out.frames
        )

    first = run(7, cond(kind))
    assert np.array_equal(first, run(7, cond(kind)))
    assert not np.array_equal(first.astype(np.float32), run(8, cond(kind)).astype(np.float32))


def test_guidance_off_and_a_given_negative(decoders: dict[str, Decoder]) -> None:
    decoder = decoders["image"]
    params = DecodeParams(height=16, width=16, seed=3, **FAST)
    guided = decode(decoder, cond("image"), params)
    unguided = decode(
        decoder, cond("image"), DecodeParams(height=16, width=16, seed=3, guidance_scale=1.0, steps=2)
    )
    zeros = decode(decoder, cond("image"), params, negative_embeds=torch.zeros(TINY_CONDITIONING["image"]))
    assert isinstance(guided, ImageOut) and isinstance(unguided, ImageOut) and isinstance(zeros, ImageOut)
    assert not np.array_equal(np.asarray(guided.image), np.asarray(zeros.image))


def test_zero_negatives_can_be_chosen_at_load(decoder_folders: dict[str, Path]) -> None:
    decoder = load_decoder("audio", decoder_folders["audio"], negative="zeros")
    assert torch.count_nonzero(decoder.negative) == 0
    out = decode(decoder, cond("audio"), DecodeParams(duration_s=0.5, seed=0, **FAST))
    assert isinstance(out, AudioOut) and out.waveform.shape == (8000,)


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("image", DecodeParams(steps=0), "steps: expected a number in [1, 100], got 0"),
        ("image", DecodeParams(steps=101), "steps: expected a number in [1, 100], got 101"),
        ("image", DecodeParams(steps=2.5), "steps: expected an integer in [1, 100], got 2.5"),  # type: ignore[arg-type]
        ("image", DecodeParams(height=36), "height: expected a multiple of 8, got 36"),
        ("image", DecodeParams(width=2048), "width: expected a number in [8, 1024], got 2048"),
        (
            "image",
            DecodeParams(guidance_scale=-1.0),
            "guidance_scale: expected a number in [0.0, 30.0], got -1.0",
        ),
        ("image", DecodeParams(seed=-1), "seed: expected a number"),
        ("image", DecodeParams(duration_s=1.0), "duration_s: does not apply to image decoding"),
        ("audio", DecodeParams(duration_s=0.1), "duration_s: expected a number in [0.5, 10.24], got 0.1"),
        ("audio", DecodeParams(duration_s=60.0), "duration_s: expected a number in [0.5, 10.24], got 60.0"),
        ("audio", DecodeParams(height=64), "height: does not apply to audio decoding"),
        ("video", DecodeParams(num_frames=0), "num_frames: expected a number in [1, 32], got 0"),
        ("video", DecodeParams(num_frames=33), "num_frames: expected a number in [1, 32], got 33"),
        ("video", DecodeParams(fps=0), "fps: expected a number in [1, 30], got 0"),
        ("video", DecodeParams(height=20), "height: expected a multiple of 8, got 20"),
    ],
)
def test_bad_parameters_are_refused(
    decoders: dict[str, Decoder], kind: str, params: DecodeParams, message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        decode(decoders[kind], cond(kind), params)
    assert message in err.value.message


@pytest.mark.parametrize(
    ("kind", "embeds", "message"),
    [
        (
            "image",
            torch.zeros(77, 48),
            "expected shape (77, 32) or (1, 77, 32), got (77, 48)",
        ),  # the video's size
        ("image", torch.zeros(2, 77, 32), "got (2, 77, 32)"),
        ("video", torch.zeros(76, 48), "expected shape (77, 48) or (1, 77, 48), got (76, 48)"),
        ("audio", torch.zeros(16), "expected shape (1, 16) or (1, 1, 16), got (16,)"),
        (
            "image",
            torch.zeros(77, 32, dtype=torch.float16),
            "expected dtype torch.float32, got torch.float16",
        ),
        ("audio", torch.zeros(1, 16, dtype=torch.int64), "expected dtype torch.float32, got torch.int64"),
        ("audio", torch.full((1, 16), float("nan")), "expected finite values"),
        ("image", np.zeros((77, 32), dtype=np.float32), "expected a torch.Tensor, got ndarray"),
    ],
)
def test_bad_conditioning_is_refused(
    decoders: dict[str, Decoder], kind: str, embeds: torch.Tensor, message: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        decode(decoders[kind], embeds, DecodeParams(**FAST))
    assert message in err.value.message


def test_a_bad_negative_is_refused(decoders: dict[str, Decoder]) -> None:
    with pytest.raises(InvalidArgumentError, match="negative_embeds"):
        decode(decoders["image"], cond("image"), DecodeParams(**FAST), negative_embeds=torch.zeros(77, 48))


def test_defaults_can_be_set_at_load(decoder_folders: dict[str, Path]) -> None:
    decoder = load_decoder("video", decoder_folders["video"], defaults=DecodeParams(steps=2, num_frames=3))
    assert (decoder.defaults.steps, decoder.defaults.num_frames, decoder.defaults.height) == (2, 3, 64)
    out = decode(decoder, cond("video"))
    assert isinstance(out, VideoOut) and out.frames.shape == (3, 64, 64, 3)
    with pytest.raises(InvalidArgumentError, match="steps"):
        load_decoder("video", decoder_folders["video"], defaults=DecodeParams(steps=1000))


def test_loading_checks_the_folder(decoder_folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"model_index\.json"):
        load_decoder("image", tmp_path)
    with pytest.raises(
        FailedPreconditionError, match="expected a StableDiffusionPipeline, got AudioLDMPipeline"
    ):
        load_decoder("image", decoder_folders["audio"])
    with pytest.raises(InvalidArgumentError, match="decoder kind"):
        load_decoder("3d", decoder_folders["image"])


def test_tiny_folders_are_small_and_deterministic(decoder_folders: dict[str, Path], tmp_path: Path) -> None:
    for kind, folder in decoder_folders.items():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size < 5 * 2**20, (kind, size)
    again = write_tiny_decoder("image", tmp_path / "image")
    for path in sorted(p for p in decoder_folders["image"].rglob("*") if p.is_file()):
        assert path.read_bytes() == (again / path.relative_to(decoder_folders["image"])).read_bytes(), path
    assert json.loads((again / "model_index.json").read_text())["safety_checker"] == [None, None]
