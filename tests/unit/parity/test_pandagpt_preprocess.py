"""PandaGPT's ImageBind preprocessing (image, video, audio) against its own `data.py`.

The fixture (scripts/parity/pandagpt_preprocess.py, run against yxuansu/PandaGPT with the git
pytorchvideo its video loader needs) holds a PNG, an H.264 MP4 and a stereo 22.05 kHz WAV and
the seed's outputs for them. Each file goes through the encoder service's own path
(`MediaPreprocessor.prepare` with the `pandagpt` preset's encoder spec).

Tolerances: image and video 1e-5 (the same PIL and decord decode the files; the video's
bilinear scaling is computed as torch did through 2.9). Audio: 1e-5 against the seed's code run
in float64 (`audio_float64`), and, against the float32 output the seed really produces, the
seed's own float32-vs-float64 difference recorded in the fixture plus 1e-5: torchaudio builds
its mel filters and takes the fbank in float32, which moves weak bins' log energies by up to
~1e-3 (1.5e-4 after ImageBind's normalisation); modalmesh computes in float64.
"""

from __future__ import annotations

import math

import pytest

from services.common.presets import EncoderSpec
from services.models.media.audio import clip_timepoints
from services.models.media.prepare import MediaPreprocessor
from tests.helpers.preprocess_parity import Fixture, check_digest, load_fixture, real_preset

IMAGE_SIZE = 224  # imagebind_huge's vision tower


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("pandagpt")


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EncoderSpec]:
    preset = real_preset("pandagpt", tmp_path_factory.mktemp("cache"))
    return {m: s.encoder for m, s in preset.modalities.items()}


def _prepare(spec: EncoderSpec, modality: str, data: bytes):
    return MediaPreprocessor.from_spec(modality, spec, image_size=IMAGE_SIZE).prepare(data)


def test_image_is_imagebinds_resize_and_center_crop(fixture: Fixture, specs) -> None:
    ours = _prepare(specs["image"], "image", fixture.file("image")).inputs  # (3, 224, 224)
    assert check_digest(fixture, "image", ours) <= 1e-5
    floor = specs["image"].model_copy(
        update={"preprocess": specs["image"].preprocess.model_copy(update={"crop": "floor"})}
    )
    with pytest.raises(AssertionError, match="image"):  # the 1-pixel shift of a floored crop is caught
        check_digest(fixture, "image", _prepare(floor, "image", fixture.file("image")).inputs)


def test_video_clips_frames_and_crops(fixture: Fixture, specs) -> None:
    prepared = _prepare(specs["video"], "video", fixture.file("video"))
    assert check_digest(fixture, "video", prepared.inputs) <= 1e-5  # (15, 3, 2, 224, 224)
    sampling = MediaPreprocessor.from_spec("video", specs["video"], image_size=IMAGE_SIZE).sampling
    assert sampling is not None
    meta = fixture.record["inputs"]["video"]
    fps = float(meta["fps"].split("/")[0]) / float(meta["fps"].split("/")[1])
    chosen = sampling.indices(meta["frames"], fps).reshape(5, 2).tolist()
    assert chosen == fixture.record["video_frame_indices"]  # clip starts at k * (4.8 - 2) / 4 s


def test_audio_fbank_clips(fixture: Fixture, specs) -> None:
    ours = _prepare(specs["audio"], "audio", fixture.file("audio")).inputs  # (3, 1, 128, 204)
    assert check_digest(fixture, "audio_float64", ours) <= 1e-5
    seed_rounding = fixture.record["audio_float32_vs_float64_max_abs"]
    assert seed_rounding < 1e-3
    assert check_digest(fixture, "audio", ours, atol=seed_rounding + 1e-5) <= seed_rounding + 1e-5


def test_clip_spacing_is_the_git_pytorchvideo(fixture: Fixture, specs) -> None:
    """PandaGPT's video needs pytorchvideo from git (PyPI 0.1.5 refuses `sample_rate`), whose
    clip sampler ends the last clip at the end; the preset says so for video and audio."""
    assert fixture.record["versions"]["pytorchvideo"]["git_commit"].startswith("28fe037")
    for modality in ("video", "audio"):
        sampling = specs[modality].sampling
        assert sampling is not None and sampling.last_clip_at_end
    meta = fixture.record["inputs"]["audio"]
    samples_16k = math.ceil(round(meta["seconds"] * meta["rate"]) * 16000 / meta["rate"])
    ours = clip_timepoints(samples_16k / 16000, clip_seconds=2.0, num_clips=3, last_clip_at_end=True)
    assert [[float(s), float(e)] for s, e in ours] == fixture.record["audio_clip_seconds"]
