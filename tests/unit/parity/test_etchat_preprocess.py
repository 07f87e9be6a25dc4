"""E.T. Chat's video-frame and image preprocessing against ETBench's own code.

The fixture (scripts/parity/etchat_preprocess.py: `etchat/utils/io.py` load_video / load_image
and `get_transform('clip_center_224', inference=True)`) holds an H.264 MP4 at 7.5 fps and a
PNG and the transformed float32 tensors. Both go through `MediaPreprocessor.prepare` with the
`etchat` preset's video spec (an image is one frame); the same PIL and decord decode them and
torch's antialiased bilinear resize is the seed's, so the tolerance is 1e-5.
"""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgumentError
from services.models.media.prepare import MediaPreprocessor
from tests.helpers.preprocess_parity import (
    Fixture,
    check_digest,
    frame_times_match_tags,
    load_fixture,
    real_preset,
)

IMAGE_SIZE = 224  # EVA-ViT-g, clip_center_224


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("etchat")


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory):
    return real_preset("etchat", tmp_path_factory.mktemp("cache")).modalities["video"].encoder


def test_video_one_frame_per_second(fixture: Fixture, spec) -> None:
    video = MediaPreprocessor.from_spec("video", spec, image_size=IMAGE_SIZE)
    prepared = video.prepare(fixture.file("video"))
    assert check_digest(fixture, "video", prepared.inputs) <= 1e-5  # (5, 3, 224, 224)
    meta = fixture.record["inputs"]["video"]
    numerator, denominator = (int(v) for v in meta["fps"].split("/"))
    assert video.sampling is not None
    chosen = video.sampling.indices(meta["frames"], numerator / denominator).tolist()
    assert chosen == fixture.record["video_frame_indices"] == [0, 8, 15, 22, 30]  # 7.5 and 22.5 round to even
    assert frame_times_match_tags(prepared.times, fixture.record["video_tags"])


def test_image_as_one_frame(fixture: Fixture, spec) -> None:
    ours = MediaPreprocessor.from_spec("image", spec, image_size=IMAGE_SIZE).prepare(fixture.file("image"))
    assert check_digest(fixture, "image", ours.inputs[0]) <= 1e-5


def test_pil_bicubic_would_miss(fixture: Fixture, spec) -> None:
    """The torch antialiased bilinear resize is what E.T. Chat ran; PIL bicubic is not it."""
    pil = spec.model_copy(
        update={"preprocess": spec.preprocess.model_copy(update={"interpolation": "pil_bicubic"})}
    )
    ours = MediaPreprocessor.from_spec("image", pil, image_size=IMAGE_SIZE).prepare(fixture.file("image"))
    with pytest.raises(AssertionError, match="image"):
        check_digest(fixture, "image", ours.inputs[0])


def test_longer_than_max_frames_is_refused_by_name(fixture: Fixture, spec) -> None:
    """4.8 s at 1 fps is 5 frames: with max_frames 4 the request is refused, not resampled."""
    capped = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"max_frames": 4})})
    video = MediaPreprocessor.from_spec("video", capped, image_size=IMAGE_SIZE)
    with pytest.raises(InvalidArgumentError, match=r"expected at most max_frames = 4 frames at 1 fps"):
        video.prepare(fixture.file("video"))
