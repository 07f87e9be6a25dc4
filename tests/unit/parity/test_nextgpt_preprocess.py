"""Legacy NExT-GPT's ImageBind preprocessing (image, video, audio) against its own `data.py`.

The fixture (scripts/parity/pandagpt_preprocess.py run against NExT-GPT's `NExT-GPT-Lagacy/`
with the PyPI pytorchvideo 0.1.5 it pins) holds the same three files as PandaGPT's; what
differs is the clip sampler of pytorchvideo 0.1.5 (clip starts spaced by (duration - 2 s) /
clips). Files go through `MediaPreprocessor.prepare` with the `nextgpt` preset's encoder spec;
tolerances as in test_pandagpt_preprocess.py (audio: 1e-5 against the seed's code in float64,
the seed's own float32 rounding plus 1e-5 against its float32 output).
"""

from __future__ import annotations

import math

import pytest

from services.models.media.audio import clip_timepoints
from services.models.media.prepare import MediaPreprocessor
from tests.helpers.preprocess_parity import Fixture, check_digest, load_fixture, real_preset

IMAGE_SIZE = 224  # imagebind_huge's vision tower


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("nextgpt")


@pytest.fixture(scope="module")
def preprocessors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MediaPreprocessor]:
    preset = real_preset("nextgpt", tmp_path_factory.mktemp("cache"))
    return {
        m: MediaPreprocessor.from_spec(m, s.encoder, image_size=IMAGE_SIZE)
        for m, s in preset.modalities.items()
    }


def test_image(fixture: Fixture, preprocessors) -> None:
    ours = preprocessors["image"].prepare(fixture.file("image")).inputs  # (3, 224, 224)
    assert check_digest(fixture, "image", ours) <= 1e-5


def test_video_and_its_pytorchvideo_0_1_5_clips(fixture: Fixture, preprocessors) -> None:
    video: MediaPreprocessor = preprocessors["video"]
    assert check_digest(fixture, "video", video.prepare(fixture.file("video")).inputs) <= 1e-5
    assert fixture.record["versions"]["pytorchvideo"]["git_commit"].startswith("none")  # PyPI 0.1.5
    assert video.sampling is not None and not video.sampling.last_clip_at_end
    meta = fixture.record["inputs"]["video"]
    numerator, denominator = (int(v) for v in meta["fps"].split("/"))
    chosen = video.sampling.indices(meta["frames"], numerator / denominator).reshape(5, 2).tolist()
    assert chosen == fixture.record["video_frame_indices"]
    pandagpt = load_fixture("pandagpt").record["video_frame_indices"]
    assert chosen != pandagpt  # the same file, other clip starts


def test_audio(fixture: Fixture, preprocessors) -> None:
    ours = preprocessors["audio"].prepare(fixture.file("audio")).inputs  # (3, 1, 128, 204)
    assert check_digest(fixture, "audio_float64", ours) <= 1e-5
    tolerance = fixture.record["audio_float32_vs_float64_max_abs"] + 1e-5
    assert check_digest(fixture, "audio", ours, atol=tolerance) <= tolerance
    meta = fixture.record["inputs"]["audio"]
    samples_16k = math.ceil(round(meta["seconds"] * meta["rate"]) * 16000 / meta["rate"])
    points = clip_timepoints(samples_16k / 16000, clip_seconds=2.0, num_clips=3)
    assert [[float(s), float(e)] for s, e in points] == fixture.record["audio_clip_seconds"]
