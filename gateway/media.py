"""Media loading: turn a media part's URL into the encoded file's bytes, within limits and safely.

Accepted sources are base64 `data:` URLs, http(s) URLs, and file:// URLs under the folders
`MODALMESH_FETCH_FILE_ROOTS` names (none by default: file:// is refused). Every failure is a
client error (400; 413 for a file over `media_max_bytes`) that says what was refused and why;
a data URL's payload is never echoed. The bytes themselves are not decoded here (the encoder
service validates the image, video, audio or event file). A data URL must declare a media type
of its modality (its registry record's `data_url_types`: image/*, video/*,
audio/*; events, which have no registered type, application/octet-stream, application/x-npy,
application/npy or application/x-npz).

SSRF guard (`gateway._fetch_guard`): the URL's host is resolved (getaddrinfo in the executor)
and the fetch is refused if ANY address it resolves to is loopback, private, link-local, a cloud
metadata address, unspecified, multicast, reserved, carrier-grade NAT (100.64.0.0/10) or
otherwise not global, including those addresses inside IPv4-mapped, 6to4 and NAT64 IPv6 forms,
unless `MODALMESH_FETCH_ALLOW` opens it (a host name, an IP address or a CIDR block; a metadata
address only opens for an entry naming that address). The connection then goes to the vetted
address itself (the URL's host is replaced by the IP, the original `Host` header is sent, and
for https the TLS server name and certificate check use the host name through httpcore's
`sni_hostname` request extension), so DNS rebinding cannot swap the address between the check
and the connect. Redirects are followed here, at most `fetch_max_redirects`, and every hop is
checked again (scheme and addresses): a redirect to http://127.0.0.1/ or to file:// is refused.

Deadlines: `fetch_connect_timeout_s` per connection attempt, and one total deadline per modality
(the setting its registry record names: `image_fetch_timeout_s`, `video_`, `audio_`,
`event_fetch_timeout_s`) over DNS, connects, redirects and the body together. The byte cap holds while the final body streams in.

Choices and what is left open:
- The private HTTP client keeps no idle connections: its pool is keyed by IP and port, so a
  kept TLS connection verified for one host name could otherwise carry a request for another
  name on the same address. It also ignores HTTP(S)_PROXY (trust_env=False): fetches go direct.
  A client passed in (`client=`) is used as it is configured.
- An allow-listed host name opens every address it resolves to; whoever controls that name's
  DNS decides where the gateway connects (within the allow-list's intent: list addresses or
  blocks instead where that matters).
- file:// paths are resolved (symlinks, `..`) and must lie inside a root, and the opened file is
  checked again through /proc/self/fd where that exists, so a symlink swapped in after the check
  is caught on Linux; elsewhere a swap between check and open remains possible.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from gateway._fetch_guard import AllowList, FileRoots, IPAddress, classify, ip_literal, resolve
from services.common import modalities
from services.common.errors import InvalidArgumentError, PayloadTooLargeError

if TYPE_CHECKING:
    from services.common.settings import Settings

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(rb"\s+")
_ACCEPTED_SCHEMES = "accepted schemes are http, https and data"
_ACCEPTED_WITH_FILE = "accepted schemes are http, https, data and file"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ALLOW_HINT = "fetching it needs MODALMESH_FETCH_ALLOW"


def _shown(url: str, limit: int = 120) -> str:
    """A URL as it appears in messages: never a data URL's payload, never unbounded."""
    if url[:5].lower() == "data:":
        return url.split(",", 1)[0][:40] + ",..."
    return url if len(url) <= limit else url[: limit - 3] + "..."


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
    """Loads media URLs within deadlines, a size cap and the SSRF guard; owns one httpx client.

    Args:
        max_bytes: Largest file accepted (settings.media_max_bytes).
        timeout_s: Total deadline of one fetch: one for every modality, or one per modality
            ({"image": 5.0, "video": 30.0, ...}: the settings' *_fetch_timeout_s).
        connect_timeout_s: Deadline of one connection attempt (settings.fetch_connect_timeout_s).
        max_redirects: Redirects followed per URL (settings.fetch_max_redirects).
        allow: What may be fetched although the guard refuses its addresses: an AllowList or
            its comma-separated text (settings.fetch_allow).
        file_roots: Folders file:// URLs may read under, comma-separated or a list
            (settings.fetch_file_roots); none: file:// is refused.
        client: An httpx client to use instead of a private one (not closed by `aclose`).
        resolver: Host name -> addresses (`_fetch_guard.resolve`, the system resolver); tests
            pass their own to give a name several answers, which /etc/hosts cannot.

    Raises:
        ValueError: An `allow` entry is neither a host name, an IP address nor a CIDR block.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float | Mapping[str, float],
        connect_timeout_s: float = 3.0,
        max_redirects: int = 5,
        allow: AllowList | str = "",
        file_roots: str | Iterable[str | os.PathLike[str]] = "",
        client: httpx.AsyncClient | None = None,
        resolver: Callable[[str, int], Awaitable[list[IPAddress]]] = resolve,
    ) -> None:
        self.max_bytes = max_bytes
        if isinstance(timeout_s, Mapping):
            self.timeouts_s = dict(timeout_s)
        else:
            self.timeouts_s = dict.fromkeys(modalities.input_names(), float(timeout_s))
        self.connect_timeout_s = connect_timeout_s
        self.max_redirects = max_redirects
        self.allow = allow if isinstance(allow, AllowList) else AllowList.parse(allow)
        self.file_roots = FileRoots.parse(file_roots)
        self._client = client
        self._owns_client = client is None
        self._resolve = resolver

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaFetcher:
        """The fetcher `settings` describe (limits, deadlines, allow-list, file roots)."""
        return cls(
            max_bytes=settings.media_max_bytes,
            timeout_s={
                name: float(getattr(settings, m.fetch_timeout_setting))
                for name, m in modalities.MODALITIES.items()
                if m.inputs
            },
            connect_timeout_s=settings.fetch_connect_timeout_s,
            max_redirects=settings.fetch_max_redirects,
            allow=settings.fetch_allow,
            file_roots=settings.fetch_file_roots,
        )

    def _http(self) -> httpx.AsyncClient:
        # Made on first use, inside the event loop that serves requests. No idle connections
        # and no proxies from the environment: see the module docstring.
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_keepalive_connections=0),
                headers={"User-Agent": "modalmesh-gateway"},
            )
        return self._client

    async def load(self, url: str, modality: str = "image") -> bytes:
        """The bytes behind `url` (http, https, file or base64 data URL) of a `modality` item.

        Raises:
            InvalidArgumentError: Unsupported scheme, an address or path the guard refuses,
                unreachable host, non-2xx answer, too many redirects, deadline passed, or a
                malformed data URL.
            PayloadTooLargeError: The file is over `max_bytes`.
        """
        url = url.strip()
        accepted = _ACCEPTED_WITH_FILE if self.file_roots else _ACCEPTED_SCHEMES
        if not url:
            raise InvalidArgumentError(f"{modality} URL is empty; " + accepted)
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme == "data":
            types = modalities.get(modality).data_url_types
            return decode_data_url(url, max_bytes=self.max_bytes, media_type_prefix=types)
        if scheme == "file" and not self.file_roots:
            raise InvalidArgumentError(
                f"unsupported {modality} URL scheme 'file' in {_shown(url)}: {accepted}; file:// URLs "
                "are off until MODALMESH_FETCH_FILE_ROOTS names the folders they may read under"
            )
        if scheme not in ("http", "https", "file"):
            shown = f"{scheme!r}" if scheme else "none"
            raise InvalidArgumentError(
                f"unsupported {modality} URL scheme {shown} in {_shown(url)}: {accepted}"
            )
        timeout_s = self.timeouts_s[modality]
        try:
            async with asyncio.timeout(timeout_s):
                if scheme == "file":
                    return await self._read_file(url, modality)
                return await self._fetch(url, modality)
        except TimeoutError:
            raise InvalidArgumentError(
                f"could not fetch {modality} from {_shown(url)}: no complete answer within {timeout_s:g} s"
            ) from None

    # -- http(s) ---------------------------------------------------------------------------------

    async def _fetch(self, url: str, modality: str) -> bytes:
        current = url
        for hop in range(self.max_redirects + 1):
            where = _shown(url) if hop == 0 else f"{_shown(url)} (redirected to {_shown(current)})"
            target, addresses = await self._vet(current, where, modality)
            async with self._open(target, addresses, where, modality) as response:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    current = urljoin(current, location.strip())
                    if urlsplit(current).scheme.lower() not in ("http", "https"):
                        raise InvalidArgumentError(
                            f"{modality} URL {where} redirects to {_shown(current)}: a redirect may "
                            "only lead to an http or https URL"
                        )
                    continue
                return await self._body(response, where, modality)
        raise InvalidArgumentError(
            f"could not fetch {modality} from {_shown(url)}: more than {self.max_redirects} redirects "
            "(MODALMESH_FETCH_MAX_REDIRECTS)"
        )

    async def _vet(self, url: str, where: str, modality: str) -> tuple[httpx.URL, list[IPAddress]]:
        """The parsed URL and its host's addresses, once every address passed the guard."""
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise InvalidArgumentError(f"could not fetch {modality} from {where}: {e}") from e
        if not target.host:
            raise InvalidArgumentError(f"could not fetch {modality} from {where}: the URL has no host")
        host = target.raw_host.decode("ascii")
        try:
            addresses = await self._resolve(host, target.port or (443 if target.scheme == "https" else 80))
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise InvalidArgumentError(
                f"could not fetch {modality} from {where}: host {host} does not resolve ({reason})"
            ) from None
        literal = ip_literal(host) is not None
        for ip in addresses:
            why = classify(ip)
            if why is None or self.allow.allows(host, ip):
                continue
            what = f"address {ip} is" if literal else f"host {host} resolves to {ip}, which is"
            hint = f"{_ALLOW_HINT} to name {ip} itself" if why.startswith("a cloud metadata") else _ALLOW_HINT
            logger.info("refused media URL %s: %s %s", where, what, why)
            raise InvalidArgumentError(f"{modality} URL {where}: {what} {why}; {hint}")
        return target, addresses

    @contextlib.asynccontextmanager
    async def _open(
        self, target: httpx.URL, addresses: list[IPAddress], where: str, modality: str
    ) -> AsyncIterator[httpx.Response]:
        """The streaming response of `target`; httpx errors, also while reading, become 400s."""
        try:
            response = await self._send(target, addresses)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            # InvalidURL too: httpx parses a Location header even when it does not follow it.
            raise self._failed(e, where, modality) from e
        try:
            yield response
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise self._failed(e, where, modality) from e
        finally:
            await response.aclose()

    def _failed(
        self, error: httpx.HTTPError | httpx.InvalidURL, where: str, modality: str
    ) -> InvalidArgumentError:
        if isinstance(error, httpx.InvalidURL):  # the target was parsed before: a Location header
            reason = f"the server redirected to a URL that cannot be fetched ({error})"
        elif isinstance(error, httpx.ConnectTimeout):
            reason = f"no connection within {self.connect_timeout_s:g} s (MODALMESH_FETCH_CONNECT_TIMEOUT_S)"
        else:
            reason = str(error) or type(error).__name__
        logger.info("fetch of %s failed: %s", where, reason)
        return InvalidArgumentError(f"could not fetch {modality} from {where}: {reason}")

    async def _send(self, target: httpx.URL, addresses: list[IPAddress]) -> httpx.Response:
        """GET `target` from its vetted addresses in turn (the next one only if a connect fails)."""
        host = target.raw_host.decode("ascii")
        extensions: dict[str, str] = {}
        if target.scheme == "https" and ip_literal(host) is None:
            extensions["sni_hostname"] = host  # TLS name and certificate check: the host, not the IP
        timeout = httpx.Timeout(None, connect=self.connect_timeout_s)
        client = self._http()
        error: httpx.TransportError | None = None
        for ip in addresses:
            request = client.build_request(
                "GET",
                target.copy_with(host=str(ip)),
                headers={"Host": target.netloc.decode("ascii")},
                extensions=extensions,
                timeout=timeout,
            )
            try:
                return await client.send(request, stream=True, follow_redirects=False)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                logger.info("connecting to %s for %s failed: %r", ip, target, e)
                error = e
        assert error is not None  # `addresses` is never empty
        raise error

    async def _body(self, response: httpx.Response, where: str, modality: str) -> bytes:
        if not 200 <= response.status_code < 300:
            raise InvalidArgumentError(
                f"could not fetch {modality} from {where}: the server answered HTTP {response.status_code}"
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLargeError(
                f"{modality} at {where} is {int(declared)} bytes, over the limit of {self.max_bytes} bytes"
            )
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                break
        return self._checked(bytes(body), modality, where)

    # -- file:// ---------------------------------------------------------------------------------

    async def _read_file(self, url: str, modality: str) -> bytes:
        parts = urlsplit(url)
        shown = _shown(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgumentError(
                f"{modality} URL {shown}: a file URL must name a local path (file:///path), "
                f"got host {parts.netloc!r}"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidArgumentError(f"{modality} URL {shown}: expected an absolute path, got {path!r}")
        real = os.path.realpath(path)
        if not self.file_roots.contains(real):
            logger.info("refused media URL %s: %s is outside %s", shown, real, self.file_roots.roots)
            raise InvalidArgumentError(
                f"{modality} URL {shown}: {path} is outside the folders MODALMESH_FETCH_FILE_ROOTS opens "
                "(symlinks and '..' resolved)"
            )
        return await asyncio.to_thread(self._read_capped_file, real, path, shown, modality)

    def _read_capped_file(self, real: str, path: str, shown: str, modality: str) -> bytes:
        """Read a vetted path, at most max_bytes + 1 of it (runs in a worker thread)."""
        try:
            # O_NONBLOCK: opening a FIFO must not hang; O_NOFOLLOW: `real` has no symlink left.
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise InvalidArgumentError(f"{modality} URL {shown}: no file at {path}") from None
        except OSError as e:
            raise InvalidArgumentError(f"{modality} URL {shown}: cannot read {path}: {e.strerror}") from None
        try:
            opened = f"/proc/self/fd/{fd}"
            if os.path.exists(opened) and not self.file_roots.contains(os.path.realpath(opened)):
                raise InvalidArgumentError(
                    f"{modality} URL {shown}: {path} changed while it was opened and now lies outside "
                    "the folders MODALMESH_FETCH_FILE_ROOTS opens"
                )
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgumentError(f"{modality} URL {shown}: {path} is not a regular file")
            if info.st_size > self.max_bytes:
                raise PayloadTooLargeError(
                    f"{modality} at {shown} is {info.st_size} bytes, over the limit of {self.max_bytes} bytes"
                )
            chunks: list[bytes] = []
            size = 0
            while size <= self.max_bytes:  # the file may grow after fstat: read at most cap + 1
                chunk = os.read(fd, min(1 << 20, self.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
        return self._checked(data, modality, shown)

    def _checked(self, data: bytes, modality: str, where: str) -> bytes:
        """`data` read from `where` (at most one byte over the cap), if within the cap and not empty."""
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(
                f"{modality} at {where} is over the limit of {self.max_bytes} bytes "
                f"(read at least {len(data)} bytes)"
            )
        if not data:
            raise InvalidArgumentError(f"{modality} at {where} is empty")
        return data

    async def aclose(self) -> None:
        """Close the private HTTP client."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
        self._client = None
