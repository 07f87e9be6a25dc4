"""The decoder models' `params` input: JSON parsing, unknown fields and formats (no server)."""

from __future__ import annotations

import pytest

from services.common.decode_params import FIELDS
from services.common.errors import InvalidArgumentError
from services.decoders.protocol import PARAM_FIELDS
from services.decoders.triton import ItemRequest, parse_params
from services.models.decoders.pipelines import DecodeParams


def test_the_wire_fields_are_the_decode_params_and_format() -> None:
    assert (*FIELDS, "format") == PARAM_FIELDS
    assert set(FIELDS) == set(DecodeParams.__dataclass_fields__)


DEFAULT_FORMAT = {"image": "png", "audio": "wav", "video": "mp4"}


@pytest.mark.parametrize(
    ("data", "modality", "want"),
    [
        (b"", "image", ItemRequest(DecodeParams(), "png")),
        (b"{}", "audio", ItemRequest(DecodeParams(), "wav")),
        (b'{"steps": 3, "seed": null, "format": null}', "image", ItemRequest(DecodeParams(steps=3), "png")),
        (b'{"num_frames": 4, "format": "gif"}', "video", ItemRequest(DecodeParams(num_frames=4), "gif")),
        (
            b'{"duration_s": 2.5, "seed": 7}',
            "audio",
            ItemRequest(DecodeParams(duration_s=2.5, seed=7), "wav"),
        ),
    ],
)
def test_good_params(data: bytes, modality: str, want: ItemRequest) -> None:
    assert parse_params(data, modality=modality, default_format=DEFAULT_FORMAT[modality]) == want


@pytest.mark.parametrize(
    ("data", "modality", "message"),
    [
        (
            b"{steps: 2}",
            "image",
            "params: expected a UTF-8 JSON object, got invalid JSON (Expecting property",
        ),
        (b"\xff", "image", "params: expected a UTF-8 JSON object, got invalid JSON ("),
        (b"3", "image", "params: expected a JSON object, got a JSON int"),
        (b'"steps"', "image", "params: expected a JSON object, got a JSON str"),
        (b'{"Steps": 2}', "image", "Steps: unknown decoding parameter; expected some of ['steps', "),
        (b'{"format": "gif"}', "image", "format: expected one of ['png'] for image, got 'gif'"),
        (b'{"format": "wav"}', "video", "format: expected one of ['mp4', 'gif'] for video, got 'wav'"),
        (b'{"height": {"px": 8}}', "image", 'height: expected a number, got {"px": 8}'),
    ],
)
def test_bad_params(data: bytes, modality: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_params(data, modality=modality, default_format=DEFAULT_FORMAT[modality])
    assert info.value.message.startswith(message), info.value.message
