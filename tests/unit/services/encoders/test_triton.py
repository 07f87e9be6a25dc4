"""The PyTriton inference callable and the service's command line, without starting Triton."""

from __future__ import annotations

import logging
import os
import sysconfig
from collections.abc import Iterator

import numpy as np
import pytest
from pytriton.proxy.types import Request

from services.common.log import JsonFormatter
from services.common.settings import Settings
from services.common.triton_env import ensure_libpython_on_path, triton_config
from services.encoders.__main__ import parse_args, settings_from
from services.encoders.triton import EncoderServer, load_encoders, make_infer_fn
from services.models.media.encode import MediaEncoder
from tests.helpers.media import make_video, png_bytes


@pytest.fixture(scope="module")
def encoder(tiny_preset) -> Iterator[MediaEncoder]:
    enc = MediaEncoder.from_spec("image", tiny_preset.modalities["image"].encoder, device="cpu")
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def fps_video(twins) -> Iterator[MediaEncoder]:
    enc = MediaEncoder.from_spec("video", twins["tiny-etchat"].modalities["video"].encoder, device="cpu")
    yield enc
    enc.close()


def _request(items: list[bytes], request_id: str | None = None) -> Request:
    media = np.array([[x] for x in items], dtype=np.object_)  # (n, 1)
    return Request(data={"media": media}, parameters={"x-request-id": request_id} if request_id else {})


def test_splits_a_batch_of_multi_item_requests(encoder: MediaEncoder) -> None:
    infer = make_infer_fn(encoder, model_name="m")
    good = [png_bytes(seed=i) for i in range(3)]
    responses = infer([_request([good[0], b"bad"]), _request([good[1]]), _request([b"", good[2]])])
    assert [r["features"].shape for r in responses] == [(2, 16, 64), (1, 16, 64), (2, 16, 64)]
    assert [r["times"].tolist() for r in responses] == [[[0.0], [0.0]], [[0.0]], [[0.0], [0.0]]]
    errors = [[bytes(e) for e in r["error"].reshape(-1)] for r in responses]
    assert errors[0][0] == b"" and errors[0][1].startswith(b"not an image")
    assert errors[1] == [b""]
    assert errors[2][0].startswith(b"empty image") and errors[2][1] == b""
    for r in responses:
        assert r["features"].dtype == np.float32 and r["features"].flags.c_contiguous
        assert r["error"].shape == (len(r["features"]), 1)
    singles = [r.features for r in encoder.encode(good)]  # type: ignore[union-attr]
    np.testing.assert_allclose(responses[0]["features"][0], singles[0], atol=1e-5)
    np.testing.assert_allclose(responses[1]["features"][0], singles[1], atol=1e-5)
    np.testing.assert_allclose(responses[2]["features"][1], singles[2], atol=1e-5)
    assert not responses[0]["features"][1].any() and not responses[2]["features"][0].any()


def test_variable_frame_counts_per_request_and_padding(fps_video: MediaEncoder) -> None:
    """fps sampling: each request gets its own row count; items of one request are padded."""
    infer = make_infer_fn(fps_video, model_name="video_eva_vit")
    short, long = make_video(8, 4), make_video(24, 4)  # 2 s -> 2 frames, 6 s -> 6 frames at 1 fps
    one, two, both = infer([_request([short]), _request([long]), _request([short, long, b"x"])])
    assert one["features"].shape == (1, 2 * 4, 32) and one["times"].tolist() == [[0.0, 1.0]]
    assert two["features"].shape == (1, 6 * 4, 32) and two["times"].shape == (1, 6)
    assert both["features"].shape == (3, 6 * 4, 32) and both["times"].shape == (3, 6)
    assert np.isnan(both["times"][0, 2:]).all() and both["times"][0, :2].tolist() == [0.0, 1.0]
    assert not both["features"][0, 8:].any() and not both["features"][2].any()
    np.testing.assert_allclose(both["features"][0, :8], one["features"][0], atol=1e-5)
    np.testing.assert_allclose(both["features"][1], two["features"][0], atol=1e-5)
    assert bytes(both["error"][2, 0]).startswith(b"not a video")


def test_load_encoders_shares_one_imagebind_across_modalities(twins) -> None:
    bound = load_encoders(twins["tiny-pandagpt"], Settings(), device="cpu", decode_workers=1)
    try:
        assert [(b.modality, b.model_name) for b in bound] == [
            ("image", "image_imagebind"),
            ("video", "video_imagebind"),
            ("audio", "audio_imagebind"),
            ("thermal", "thermal_imagebind"),
        ]
        backbones = {id(b.encoder.backbone) for b in bound}
        assert len(backbones) == 1
        assert bound[0].encoder.backbone.towers == ("vision", "audio", "thermal")  # type: ignore[attr-defined]
    finally:
        for b in bound:
            b.encoder.close()


class _Lines(logging.Handler):
    """Formats each record when it is emitted (the request id is read at that moment)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("encoders"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_request_id_is_bound_to_the_log_lines(encoder) -> None:
    infer = make_infer_fn(encoder, model_name="m")
    logger = logging.getLogger("services.encoders.triton")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        infer([_request([b"x"], "rid-1"), _request([png_bytes()], "rid-2")])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = handler.lines
    assert any('"request_id": "rid-1"' in x and "refused" in x for x in lines)
    assert any('"request_id": "rid-2"' in x and "encoded 1 item(s) in a batch of 2" in x for x in lines)


def test_flags_override_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MODALMESH_ENCODER_GRPC_PORT", "9101")
    monkeypatch.setenv("MODALMESH_ENCODER_HTTP_PORT", "9100")
    settings = settings_from(parse_args(["--grpc-port", "7001", "--host", "0.0.0.0", "--preset", "x"]))
    assert (settings.encoder_grpc_port, settings.encoder_http_port) == (7001, 9100)
    assert (settings.host, settings.preset) == ("0.0.0.0", "x")
    http, grpc, metrics = EncoderServer([], settings).ports
    config = triton_config(settings, http_port=http, grpc_port=grpc, metrics_port=metrics)
    assert (config.grpc_port, config.http_port, config.grpc_address) == (7001, 9100, "0.0.0.0")
    assert config.grpc_header_forward_pattern == "^x-request-id$"


def test_libpython_goes_on_the_library_path(monkeypatch) -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other")
    ensure_libpython_on_path()
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/other"]
    ensure_libpython_on_path()  # idempotent
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/other"]


def test_the_decode_pool_is_sized_by_the_setting(twins) -> None:
    for workers, expected in [(3, 3), (1, None)]:
        bound = load_encoders(twins["tiny-pandagpt"], Settings(encoder_decode_workers=workers), device="cpu")
        try:
            pools = [b.encoder._pool for b in bound]
            assert all((p._max_workers if p is not None else None) == expected for p in pools), pools
        finally:
            for b in bound:
                b.encoder.close()
