"""EventGPT's event frames against its own `common/common.py`.

The fixture (scripts/parity/eventgpt_preprocess.py) holds two event files, polarity 0/1 as
EventGPT's samples store it and the same events with -1/1, and what `process_event_data` makes
of them with transformers 4.29's CLIPImageProcessor configured as CLIP ViT-L/14-336's: five
equal-count chunks drawn blue where p == 0 and red otherwise (so -1/1 is all red), resized,
cropped and normalised (float32), then cast to bfloat16 for the CLIP tower. Each file goes
through `MediaPreprocessor.prepare` with the `eventgpt` preset's spec and the same processor
config; the same PIL resizes, so float32 agrees within 1e-5 and the bfloat16 cast exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.common.presets import EncoderSpec
from services.models.media.prepare import MediaPreprocessor
from tests.helpers.preprocess_parity import Fixture, check_digest, load_fixture, real_preset

IMAGE_SIZE = 336  # CLIP ViT-L/14-336


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return load_fixture("eventgpt")


@pytest.fixture(scope="module")
def spec(fixture: Fixture, tmp_path_factory: pytest.TempPathFactory) -> EncoderSpec:
    """The preset's event spec, its checkpoint a folder holding only the processor config."""
    folder = tmp_path_factory.mktemp("clip-vit-large-patch14-336")
    (folder / "preprocessor_config.json").write_text(json.dumps(fixture.record["preprocessor_config"]))
    encoder = real_preset("eventgpt", Path(tmp_path_factory.mktemp("cache"))).modalities["event"].encoder
    return encoder.model_copy(update={"checkpoint": folder})


@pytest.mark.parametrize("key", ["events_01", "events_pm1"])
def test_event_frames_float32_and_bfloat16(fixture: Fixture, spec: EncoderSpec, key: str) -> None:
    pixels = (
        MediaPreprocessor.from_spec("event", spec, image_size=IMAGE_SIZE).prepare(fixture.file(key)).inputs
    )
    assert check_digest(fixture, f"{key}_float32", pixels) <= 1e-5  # (5, 3, 336, 336)
    # What ClipVisionBackbone feeds a bfloat16 tower: pixel_values.to(bfloat16).
    tower_input = torch.from_numpy(pixels).to(torch.bfloat16).float().numpy()
    assert check_digest(fixture, f"{key}_bfloat16", tower_input, atol=0.0) == 0.0


def test_minus_one_is_red_as_in_eventgpt(fixture: Fixture, spec: EncoderSpec) -> None:
    assert spec.preprocess.negative_polarity == "zero_only"
    blue = spec.model_copy(
        update={"preprocess": spec.preprocess.model_copy(update={"negative_polarity": "zero_or_negative"})}
    )
    pixels = MediaPreprocessor.from_spec("event", blue, image_size=IMAGE_SIZE).prepare(
        fixture.file("events_pm1")
    )
    with pytest.raises(AssertionError, match="events_pm1_float32"):
        check_digest(fixture, "events_pm1_float32", pixels.inputs)
    # Drawn blue, -1/1 is the 0/1 stream's picture.
    assert check_digest(fixture, "events_01_float32", pixels.inputs) <= 1e-5


def test_the_tower_runs_in_bfloat16(spec: EncoderSpec, fixture: Fixture) -> None:
    assert spec.dtype == "bfloat16"  # EventChatModel: CLIPVisionModel(torch_dtype=torch.bfloat16)
    assert fixture.record["canvas_sizes"]["events_01"][1] == [30, 41]  # an odd crop margin (123)
