"""Media loading: turn a media part's URL into the encoded file's bytes, within limits.

Accepted sources are base64 `data:` URLs and http(s) URLs. A fetch has one total deadline
(`image_fetch_timeout_s`, connect + headers + body together) and a byte cap enforced while the
body streams in, so a slow or huge remote file cannot hold a request or the gateway's memory.
Every failure is a client error that says what was wrong with the URL; the bytes themselves are
not decoded here (the encoder service validates the image, video, audio or event file). One
byte limit (`media_max_bytes`) holds for every modality; a data URL must declare a media type
of its modality (`DATA_URL_TYPES`: image/*, video/*, audio/*; events, which have no registered
type, application/octet-stream, application/x-npy, application/npy or application/x-npz).

Security note: there is no SSRF guard yet (an allow-list of domains, refusing private and
loopback addresses, no redirects to them); it comes in a later issue. Until then, deploy the
gateway where fetching arbitrary URLs is acceptable.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from urllib.parse import urlsplit

import httpx

from services.common.errors import InvalidArgumentError, PayloadTooLargeError

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(rb"\s+")
_ACCEPTED_SCHEMES = "accepted schemes are http, https and data"


def _shown(url: str, limit: int = 120) -> str:
    """A URL as it appears in messages: never a data URL's payload, never unbounded."""
    if url[:5].lower() == "data:":
        return url.split(",", 1)[0][:40] + ",..."
    return url if len(url) <= limit else url[: limit - 3] + "..."


# Media types a data: URL may declare, per modality. Event files have no registered type.
DATA_URL_TYPES: dict[str, tuple[str, ...]] = {
    "image": ("image/",),
    "video": ("video/",),
    "audio": ("audio/",),
    "event": ("application/octet-stream", "application/x-npy", "application/x-npz", "application/npy"),
}


def decode_data_url(
    url: str, *, max_bytes: int, media_type_prefix: str | tuple[str, ...] = "image/"
) -> bytes:
    """The bytes of a base64 `data:` URL, e.g. "data:image/png;base64,iVBORw0...".

    Args:
        url: The data URL.
        max_bytes: Largest decoded size accepted.
        media_type_prefix: What the media type must start with ("image/").

    Raises:
        InvalidArgumentError: Not a base64 data URL, another media type, or invalid base64.
        PayloadTooLargeError: The decoded data is over `max_bytes`.
    """
    header, sep, payload = url.partition(",")
    if not sep:
        raise InvalidArgumentError(
            "data URL has no ',' before its data; expected data:<media type>;base64,<data>"
        )
    meta = header[len("data:") :].split(";")
    media_type = meta[0].strip().lower()
    prefixes = (media_type_prefix,) if isinstance(media_type_prefix, str) else media_type_prefix
    if not media_type.startswith(prefixes):
        wanted = " or ".join(p + "*" if p.endswith("/") else p for p in prefixes)
        raise InvalidArgumentError(f"data URL media type: expected {wanted}, got {media_type or 'none'!r}")
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise InvalidArgumentError(
            f"data URL must be base64-encoded: expected data:{media_type};base64,<data>"
        )
    raw = _WHITESPACE.sub(b"", payload.encode("ascii", errors="replace"))
    if len(raw) // 4 * 3 > max_bytes + 2:
        raise PayloadTooLargeError(
            f"data URL holds about {len(raw) // 4 * 3} bytes, over the limit of {max_bytes} bytes"
        )
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidArgumentError(f"data URL holds invalid base64 data: {e}") from None
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"data URL holds {len(data)} bytes, over the limit of {max_bytes} bytes")
    if not data:
        raise InvalidArgumentError("data URL holds no data")
    return data


class MediaFetcher:
    """Loads media URLs with a deadline and a size cap; owns one pooled httpx.AsyncClient.

    Args:
        max_bytes: Largest file accepted (settings.media_max_bytes).
        timeout_s: Total deadline of one fetch (settings.image_fetch_timeout_s).
        client: An httpx client to use instead of a private one (not closed by `aclose`).
    """

    def __init__(self, *, max_bytes: int, timeout_s: float, client: httpx.AsyncClient | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._client = client
        self._owns_client = client is None

    def _http(self) -> httpx.AsyncClient:
        # Made on first use, inside the event loop that serves requests.
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                timeout=httpx.Timeout(self.timeout_s),
                headers={"User-Agent": "modalmesh-gateway"},
            )
        return self._client

    async def load(self, url: str, modality: str = "image") -> bytes:
        """The bytes behind `url` (http, https or base64 data URL) of a `modality` item.

        Raises:
            InvalidArgumentError: Unsupported scheme, unreachable host, non-2xx answer, deadline
                passed, or a malformed data URL.
            PayloadTooLargeError: The file is over `max_bytes`.
        """
        url = url.strip()
        if not url:
            raise InvalidArgumentError(f"{modality} URL is empty; " + _ACCEPTED_SCHEMES)
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, max_bytes=self.max_bytes, media_type_prefix=DATA_URL_TYPES[modality])
        if scheme not in ("http", "https"):
            shown = f"{scheme!r}" if scheme else "none"
            raise InvalidArgumentError(
                f"unsupported {modality} URL scheme {shown} in {_shown(url)}: {_ACCEPTED_SCHEMES}"
            )
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, modality)
        except TimeoutError:
            raise InvalidArgumentError(
                f"could not fetch {modality} from {_shown(url)}: no complete answer within {self.timeout_s:g} s"
            ) from None

    async def _fetch(self, url: str, modality: str) -> bytes:
        try:
            async with self._http().stream("GET", url) as response:
                if not 200 <= response.status_code < 300:
                    raise InvalidArgumentError(
                        f"could not fetch {modality} from {_shown(url)}: the server answered HTTP "
                        f"{response.status_code}"
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise PayloadTooLargeError(
                        f"{modality} at {_shown(url)} is {int(declared)} bytes, over the limit of "
                        f"{self.max_bytes} bytes"
                    )
                return await self._read_capped(url, response, modality)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            reason = str(e) or type(e).__name__
            logger.info("fetch of %s failed: %s", _shown(url), reason)
            raise InvalidArgumentError(f"could not fetch {modality} from {_shown(url)}: {reason}") from e

    async def _read_capped(self, url: str, response: httpx.Response, modality: str) -> bytes:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise PayloadTooLargeError(
                    f"{modality} at {_shown(url)} is over the limit of {self.max_bytes} bytes "
                    f"(read at least {len(body)} bytes)"
                )
        if not body:
            raise InvalidArgumentError(f"{modality} at {_shown(url)} is empty")
        return bytes(body)

    async def aclose(self) -> None:
        """Close the private HTTP client."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
        self._client = None
