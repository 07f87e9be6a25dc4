"""VideoChat's video-frame and image preprocessing against its demo's own code.

The fixture (scripts/parity/videochat_preprocess.py, Ask-Anything `video_chat/conversation.py`)
holds an H.264 MP4 at 7.5 fps and a PNG and what `Chat.load_video` (8 segments, GroupScale 224
bicubic, GroupCenterCrop 224, normalise) and `Chat.upload_img` (Resize((224, 224)) bicubic,
normalise) make of them. Both go through `MediaPreprocessor.prepare` with the `videochat`
preset's specs; the same PIL and decord decode them, so the tolerance is 1e-5.
"""

from __future__ import annotations

import pytest

from services.models.media.prepare import MediaPreprocessor
from tests.helpers.preprocess_parity import (
    Fixture,
    check_digest,
    frame_times_match_tags,
    load_fixture,
    real_preset,
)

IMAGE_SIZE = 224  # EVA-ViT-g as VideoChat builds it


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("videochat")


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory):
    return real_preset("videochat", tmp_path_factory.mktemp("cache"))


def test_video_frames_segments_and_times(fixture: Fixture, preset) -> None:
    spec = preset.modalities["video"].encoder
    prepared = MediaPreprocessor.from_spec("video", spec, image_size=IMAGE_SIZE).prepare(
        fixture.file("video")
    )
    assert check_digest(fixture, "video", prepared.inputs) <= 1e-5  # (8, 3, 224, 224)
    meta = fixture.record["inputs"]["video"]
    numerator, denominator = (int(v) for v in meta["fps"].split("/"))
    assert [round(float(t) * numerator / denominator) for t in prepared.times] == fixture.record[
        "video_frame_indices"
    ]
    # "The video contains 8 frames sampled at 0.3, 0.8, ... seconds."
    printed = fixture.record["video_message"].split("sampled at ")[1].removesuffix(" seconds.")
    assert frame_times_match_tags(prepared.times, [float(t) for t in printed.split(", ")])


def test_video_crop_rounds_as_torchvision(fixture: Fixture, preset) -> None:
    """GroupCenterCrop is torchvision's CenterCrop: an odd margin of 11 starts at round(5.5) = 6."""
    spec = preset.modalities["video"].encoder
    assert spec.preprocess.crop == "round"
    floored = spec.model_copy(update={"preprocess": spec.preprocess.model_copy(update={"crop": "floor"})})
    inputs = MediaPreprocessor.from_spec("video", floored, image_size=IMAGE_SIZE).prepare(
        fixture.file("video")
    )
    with pytest.raises(AssertionError, match="video"):
        check_digest(fixture, "video", inputs.inputs)


def test_image_is_squashed_to_224(fixture: Fixture, preset) -> None:
    spec = preset.modalities["image"].encoder
    assert spec.preprocess.resize == "squash"
    ours = MediaPreprocessor.from_spec("image", spec, image_size=IMAGE_SIZE).prepare(fixture.file("image"))
    assert check_digest(fixture, "image", ours.inputs[0]) <= 1e-5  # (1, 3, 224, 224) -> one frame
