"""Media loading: data URLs, and http fetching against a real local HTTP server."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator

import pytest

from gateway.media import MediaFetcher, decode_data_url
from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from tests.helpers.media import png_bytes

LIMIT = 64 * 1024
PNG = png_bytes(32, 32, seed=1)  # what the media server's /cat.png serves


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
async def fetcher() -> AsyncIterator[MediaFetcher]:
    f = MediaFetcher(max_bytes=LIMIT, timeout_s=1.0, allow="127.0.0.1")  # the media server's address
    try:
        yield f
    finally:
        await f.aclose()


# ---- data URLs ----------------------------------------------------------------------------


def test_data_url_round_trip() -> None:
    assert decode_data_url(data_url(PNG), max_bytes=LIMIT) == PNG


def test_data_url_tolerates_whitespace_and_parameters() -> None:
    b64 = base64.encodebytes(PNG).decode()  # wrapped at 76 columns
    assert decode_data_url(f"data:image/png;charset=binary;base64,{b64}", max_bytes=LIMIT) == PNG


def test_data_url_without_comma() -> None:
    with pytest.raises(InvalidArgumentError, match="has no ',' before its data"):
        decode_data_url("data:image/png;base64", max_bytes=LIMIT)


@pytest.mark.parametrize("media_type", ["text/plain", "application/octet-stream", ""])
def test_data_url_must_be_an_image(media_type: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        decode_data_url(data_url(PNG, media_type), max_bytes=LIMIT)
    assert info.value.message.startswith("data URL media type: expected image/*, got ")


def test_data_url_must_be_base64() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        decode_data_url("data:image/png,%89PNG", max_bytes=LIMIT)
    assert info.value.message == ("data URL must be base64-encoded: expected data:image/png;base64,<data>")


@pytest.mark.parametrize("payload", ["not base64!!", "abc", "****"])
def test_data_url_invalid_base64(payload: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        decode_data_url(f"data:image/png;base64,{payload}", max_bytes=LIMIT)
    assert info.value.message.startswith("data URL holds invalid base64 data: ")


def test_data_url_empty() -> None:
    with pytest.raises(InvalidArgumentError, match="holds no data"):
        decode_data_url("data:image/png;base64,", max_bytes=LIMIT)


def test_data_url_over_the_limit_is_413() -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        decode_data_url(data_url(b"\0" * (LIMIT + 1000)), max_bytes=LIMIT)
    assert info.value.http_status == 413
    assert f"over the limit of {LIMIT} bytes" in info.value.message


def test_data_url_exactly_at_the_limit_passes() -> None:
    assert len(decode_data_url(data_url(b"\1" * LIMIT), max_bytes=LIMIT)) == LIMIT


# ---- schemes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,scheme",
    [
        ("ftp://example.com/a.png", "'ftp'"),
        ("gopher://x/", "'gopher'"),
        ("example.com/cat.png", "none"),
    ],
)
async def test_unsupported_scheme(fetcher: MediaFetcher, url: str, scheme: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await fetcher.load(url)
    assert info.value.message == (
        f"unsupported image URL scheme {scheme} in {url}: accepted schemes are http, https and data"
    )


async def test_empty_url(fetcher: MediaFetcher) -> None:
    with pytest.raises(InvalidArgumentError, match="image URL is empty"):
        await fetcher.load("  ")


async def test_data_url_through_load(fetcher: MediaFetcher) -> None:
    assert await fetcher.load(data_url(PNG)) == PNG


# ---- http(s) against a real server --------------------------------------------------------


async def test_fetch_png(fetcher: MediaFetcher, media_server: str) -> None:
    assert await fetcher.load(f"{media_server}/cat.png") == PNG


async def test_fetch_follows_redirects(fetcher: MediaFetcher, media_server: str) -> None:
    assert await fetcher.load(f"{media_server}/redirect") == PNG


async def test_fetch_404_names_the_status(fetcher: MediaFetcher, media_server: str) -> None:
    url = f"{media_server}/missing.png"
    with pytest.raises(InvalidArgumentError) as info:
        await fetcher.load(url)
    assert info.value.message == f"could not fetch image from {url}: the server answered HTTP 404"
    assert info.value.http_status == 400


async def test_fetch_empty_body(fetcher: MediaFetcher, media_server: str) -> None:
    with pytest.raises(InvalidArgumentError, match="is empty"):
        await fetcher.load(f"{media_server}/empty")


async def test_fetch_has_one_total_deadline(fetcher: MediaFetcher, media_server: str) -> None:
    # /slow sends a byte every 0.3 s: no single read times out, the total deadline must.
    url = f"{media_server}/slow"
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError) as info:
        await fetcher.load(url)
    assert time.monotonic() - started < 2.5
    assert info.value.message == (f"could not fetch image from {url}: no complete answer within 1 s")


async def test_fetch_byte_cap_while_streaming(fetcher: MediaFetcher, media_server: str) -> None:
    url = f"{media_server}/huge"
    with pytest.raises(PayloadTooLargeError) as info:
        await fetcher.load(url)
    message = info.value.message
    assert info.value.http_status == 413
    assert message.startswith(f"image at {url} is over the limit of {LIMIT} bytes (read at least ")
    read = int(message.rsplit("at least ", 1)[1].split()[0])
    assert LIMIT < read < 1024 * 1024  # stopped early, not after the whole MiB


async def test_fetch_declared_length_over_cap(fetcher: MediaFetcher, media_server: str) -> None:
    url = f"{media_server}/huge-declared"
    with pytest.raises(PayloadTooLargeError) as info:
        await fetcher.load(url)
    assert info.value.message == (
        f"image at {url} is {10 * 1024 * 1024} bytes, over the limit of {LIMIT} bytes"
    )


async def test_fetch_connection_refused(fetcher: MediaFetcher) -> None:
    url = "http://127.0.0.1:1/cat.png"
    with pytest.raises(InvalidArgumentError) as info:
        await fetcher.load(url)
    assert info.value.message.startswith(f"could not fetch image from {url}: ")
    assert info.value.http_status == 400


async def test_fetch_unresolvable_host(fetcher: MediaFetcher) -> None:
    url = "http://no-such-host.invalid/cat.png"
    with pytest.raises(InvalidArgumentError) as info:
        await fetcher.load(url)
    assert info.value.message.startswith(f"could not fetch image from {url}: ")


async def test_invalid_http_url(fetcher: MediaFetcher) -> None:
    with pytest.raises(InvalidArgumentError, match="could not fetch image from http://"):
        await fetcher.load("http://")


async def test_long_urls_are_shortened_in_messages(fetcher: MediaFetcher) -> None:
    url = "ftp://example.com/" + "a" * 500
    with pytest.raises(InvalidArgumentError) as info:
        await fetcher.load(url)
    assert len(info.value.message) < 250
    assert "..." in info.value.message


@pytest.mark.parametrize(
    ("modality", "good", "bad"),
    [
        ("video", "video/mp4", "image/png"),
        ("audio", "audio/wav", "video/mp4"),
        ("event", "application/octet-stream", "audio/wav"),
        ("event", "application/x-npy", "text/plain"),
    ],
)
async def test_data_urls_of_each_modality_check_their_media_type(modality: str, good: str, bad: str) -> None:
    fetcher = MediaFetcher(max_bytes=1 << 20, timeout_s=1.0)
    payload = base64.b64encode(b"\x00\x01payload").decode()
    assert await fetcher.load(f"data:{good};base64,{payload}", modality) == b"\x00\x01payload"
    with pytest.raises(InvalidArgumentError, match=f"data URL media type: expected .*, got '{bad}'"):
        await fetcher.load(f"data:{bad};base64,{payload}", modality)
    with pytest.raises(InvalidArgumentError, match=f"unsupported {modality} URL scheme 'ftp'"):
        await fetcher.load("ftp://example.com/file", modality)
