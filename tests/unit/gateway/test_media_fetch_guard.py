"""The media fetcher's SSRF guard, redirects, deadlines and file:// roots, against real servers.

Every http test runs a real threaded HTTP server on 127.0.0.1 (port 0) that records what it
was asked; refusals by address are checked to happen before any request leaves the gateway.
The https test makes its own CA and a certificate for "localhost" only (openssl), so a fetch
that reaches 127.0.0.1 can verify only if the TLS name was the host name, not the address.
"""

from __future__ import annotations

import base64
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway._fetch_guard import AllowList, IPAddress, classify, ip_literal
from gateway.http_app import create_app
from gateway.media import MediaFetcher
from gateway.serving import ChatService
from services.common.errors import FailedPreconditionError, InvalidArgumentError, PayloadTooLargeError
from services.common.settings import Settings
from tests.helpers.media import png_bytes
from tests.unit.gateway.support import ServiceFactory

LIMIT = 64 * 1024
PNG = png_bytes(32, 32, seed=3)
HINT = "fetching it needs MODALMESH_FETCH_ALLOW"


# ---- a recording HTTP server ---------------------------------------------------------------


@dataclass
class Route:
    """What a path answers: status, headers, body, and a pause before the body."""

    status: int = 200
    body: bytes = PNG
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    length: bool = True  # send Content-Length


@dataclass
class Server:
    """A running server: its base URL (http://127.0.0.1:port), routes and the requests it saw."""

    port: int
    routes: dict[str, Route]
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)
    scheme: str = "http"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            server.seen.append((self.path, self.headers.get("Host", "")))
            route = server.routes.get(self.path, Route(404, b"not found"))
            try:
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(route.delay_s)
                self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the fetcher hung up on purpose (deadline, byte cap)

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """serve(routes, tls=None) -> a running Server on 127.0.0.1; all are stopped after the test."""
    running: list[ThreadingHTTPServer] = []

    def start(routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> Server:
        server = Server(0, routes, scheme="https" if tls else "http")
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
        if tls is not None:
            httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        httpd.daemon_threads = True
        server.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        running.append(httpd)
        return server

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


class NoNetwork(httpx.AsyncBaseTransport):
    """A transport that fails the test if a request reaches it: the guard must refuse first."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"a request left the gateway: {request.method} {request.url}")


def fetcher(**kwargs: Any) -> MediaFetcher:
    return MediaFetcher(**{"max_bytes": LIMIT, "timeout_s": 5.0, **kwargs})


@pytest.fixture
async def guarded() -> AsyncIterator[MediaFetcher]:
    """A fetcher with the default policy whose client fails the test if it is ever used."""
    async with httpx.AsyncClient(transport=NoNetwork()) as client:
        yield fetcher(client=client)


async def refused(f: MediaFetcher, url: str, modality: str = "image") -> str:
    with pytest.raises(InvalidArgumentError) as info:
        await f.load(url, modality)
    assert info.value.http_status == 400, info.value.message
    return info.value.message


# ---- addresses: refused by default, opened by the allow-list ------------------------------


async def test_loopback_is_refused_by_default_before_connecting(serve: Callable[..., Server]) -> None:
    server = serve({"/cat.png": Route()})
    url = server.url("/cat.png")
    f = fetcher()
    try:
        assert await refused(f, url) == f"image URL {url}: address 127.0.0.1 is loopback; {HINT}"
    finally:
        await f.aclose()
    assert server.seen == []


@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8", "10.0.0.0/8, 127.0.0.1/32"])
async def test_the_allow_list_opens_loopback(serve: Callable[..., Server], allow: str) -> None:
    server = serve({"/cat.png": Route()})
    f = fetcher(allow=allow)
    try:
        assert await f.load(server.url("/cat.png")) == PNG
    finally:
        await f.aclose()
    assert server.seen == [("/cat.png", f"127.0.0.1:{server.port}")]


async def test_localhost_by_name_resolves_to_loopback_and_is_refused(guarded: MediaFetcher) -> None:
    message = await refused(guarded, "http://localhost:8/cat.png")
    assert message.startswith("image URL http://localhost:8/cat.png: host localhost resolves to ")
    assert message.endswith(f", which is loopback; {HINT}")


async def test_a_host_name_entry_opens_its_addresses_and_the_host_header_is_kept(
    serve: Callable[..., Server],
) -> None:
    # localhost may resolve to ::1 first; nothing listens there, so the next address is tried.
    server = serve({"/cat.png": Route()})
    f = fetcher(allow="LOCALHOST")
    try:
        assert await f.load(server.url("/cat.png", host="localhost")) == PNG
    finally:
        await f.aclose()
    assert server.seen == [("/cat.png", f"localhost:{server.port}")]


@pytest.mark.parametrize(
    ("url", "address", "why"),
    [
        ("http://[::1]:8080/x.png", "::1", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "a cloud metadata address"),
        ("http://[fd00:ec2::254]/latest/", "fd00:ec2::254", "a cloud metadata address"),
        ("http://100.100.100.200/", "100.100.100.200", "a cloud metadata address"),
        ("http://10.0.0.5/x.png", "10.0.0.5", "private"),
        ("http://172.16.3.4/x.png", "172.16.3.4", "private"),
        ("http://192.168.1.1/x.png", "192.168.1.1", "private"),
        ("http://[fd12::1]/x.png", "fd12::1", "private"),
        ("http://169.254.10.10/x.png", "169.254.10.10", "link-local"),
        ("http://[fe80::1]/x.png", "fe80::1", "link-local"),
        ("http://100.64.0.1/x.png", "100.64.0.1", "in the carrier-grade NAT block 100.64.0.0/10"),
        ("http://0.0.0.0:8080/x.png", "0.0.0.0", "unspecified"),
        ("http://[::]/x.png", "::", "unspecified"),
        ("http://224.0.0.1/x.png", "224.0.0.1", "multicast"),
        ("http://240.0.0.1/x.png", "240.0.0.1", "private"),
        (
            "http://[::ffff:127.0.0.1]/x.png",
            "::ffff:127.0.0.1",
            "loopback (it carries IPv4 address 127.0.0.1)",
        ),
        ("http://[::ffff:a00:5]/x.png", "::ffff:a00:5", "private (it carries IPv4 address 10.0.0.5)"),
        ("http://[2002:7f00:1::]/x.png", "2002:7f00:1::", "loopback (it carries IPv4 address 127.0.0.1)"),
        (
            "http://[64:ff9b::a9fe:a9fe]/x.png",
            "64:ff9b::a9fe:a9fe",
            "a cloud metadata address (it carries IPv4 address 169.254.169.254)",
        ),
    ],
)
async def test_refused_addresses_without_any_request(
    guarded: MediaFetcher, url: str, address: str, why: str
) -> None:
    address = str(ip_literal(address))  # as this Python writes it (3.11: ::ffff:7f00:1)
    hint = f"{HINT} to name {address} itself" if "metadata" in why else HINT
    assert await refused(guarded, url) == f"image URL {url}: address {address} is {why}; {hint}"


@pytest.mark.parametrize(
    ("url", "host"), [("http://127.1/x.png", "127.1"), ("http://2130706433/x", "2130706433")]
)
async def test_odd_ipv4_spellings_resolve_to_loopback(guarded: MediaFetcher, url: str, host: str) -> None:
    assert await refused(guarded, url) == (
        f"image URL {url}: host {host} resolves to 127.0.0.1, which is loopback; {HINT}"
    )


async def test_every_modality_is_guarded(guarded: MediaFetcher) -> None:
    for modality in ("video", "audio", "event"):
        message = await refused(guarded, "http://10.1.1.1/clip", modality)
        assert message.startswith(f"{modality} URL http://10.1.1.1/clip: address 10.1.1.1 is private")


def answers(table: dict[str, list[str]]) -> Callable[[str, int], Any]:
    """A resolver giving names several answers (the sandbox's /etc/hosts gives one each)."""

    async def resolver(host: str, port: int) -> list[IPAddress]:
        return [addr(a) for a in table[host]]

    return resolver


async def test_one_refused_address_among_several_refuses_the_host() -> None:
    async with httpx.AsyncClient(transport=NoNetwork()) as client:
        f = fetcher(
            client=client, resolver=answers({"cdn.example": ["8.8.8.8", "2606:4700::1111", "10.0.0.7"]})
        )
        assert await refused(f, "https://cdn.example/cat.png") == (
            f"image URL https://cdn.example/cat.png: host cdn.example resolves to 10.0.0.7, which is private; {HINT}"
        )


async def test_the_connection_goes_to_the_checked_address_with_the_original_host(
    serve: Callable[..., Server],
) -> None:
    # "media.test" exists only in this resolver: the fetch can only work if httpx connects to
    # the address the guard checked instead of resolving the name again (DNS rebinding).
    server = serve({"/cat.png": Route()})
    f = fetcher(allow="127.0.0.1", resolver=answers({"media.test": ["127.0.0.1"]}))
    try:
        assert await f.load(server.url("/cat.png", host="media.test")) == PNG
    finally:
        await f.aclose()
    assert server.seen == [("/cat.png", f"media.test:{server.port}")]


# ---- schemes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme"), [("ftp://example.com/a.png", "'ftp'"), ("gopher://x/", "'gopher'")]
)
async def test_other_schemes_are_refused(guarded: MediaFetcher, url: str, scheme: str) -> None:
    assert await refused(guarded, url) == (
        f"unsupported image URL scheme {scheme} in {url}: accepted schemes are http, https and data"
    )


async def test_file_urls_are_off_without_roots(guarded: MediaFetcher) -> None:
    assert await refused(guarded, "file:///etc/passwd") == (
        "unsupported image URL scheme 'file' in file:///etc/passwd: accepted schemes are http, https "
        "and data; file:// URLs are off until MODALMESH_FETCH_FILE_ROOTS names the folders they may "
        "read under"
    )


# ---- redirects -----------------------------------------------------------------------------


async def test_a_redirect_chain_is_followed_within_the_limit(serve: Callable[..., Server]) -> None:
    b = serve({"/cat.png": Route()})
    a = serve({"/start": Route(302, b"", {"Location": b.url("/cat.png")})})
    f = fetcher(allow="127.0.0.1", max_redirects=1)
    try:
        assert await f.load(a.url("/start")) == PNG
    finally:
        await f.aclose()
    assert a.seen == [("/start", f"127.0.0.1:{a.port}")]
    assert b.seen == [("/cat.png", f"127.0.0.1:{b.port}")]


async def test_relative_redirects_resolve_against_the_hop(serve: Callable[..., Server]) -> None:
    server = serve({"/a/start": Route(307, b"", {"Location": "../cat.png"}), "/cat.png": Route()})
    f = fetcher(allow="127.0.0.1")
    try:
        assert await f.load(server.url("/a/start")) == PNG
    finally:
        await f.aclose()


@pytest.mark.parametrize("limit", [0, 2])
async def test_redirects_past_the_limit_are_refused(serve: Callable[..., Server], limit: int) -> None:
    b = serve({"/cat.png": Route()})
    hops = {f"/hop{i}": Route(301, b"", {"Location": f"/hop{i + 1}"}) for i in range(limit)}
    a = serve({**hops, f"/hop{limit}": Route(302, b"", {"Location": b.url("/cat.png")})})
    f = fetcher(allow="127.0.0.1", max_redirects=limit)
    try:
        assert await refused(f, a.url("/hop0")) == (
            f"could not fetch image from {a.url('/hop0')}: more than {limit} redirects "
            "(MODALMESH_FETCH_MAX_REDIRECTS)"
        )
    finally:
        await f.aclose()
    assert b.seen == []


@pytest.mark.parametrize(
    ("location", "address", "why", "hint"),
    [
        ("http://127.0.0.2:{port}/cat.png", "127.0.0.2", "loopback", HINT),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254",
            "a cloud metadata address",
            f"{HINT} to name 169.254.169.254 itself",
        ),
    ],
)
async def test_a_redirect_from_an_allowed_host_to_a_refused_address_is_refused(
    serve: Callable[..., Server], location: str, address: str, why: str, hint: str
) -> None:
    server = serve({"/cat.png": Route()})
    target = location.format(port=server.port)
    server.routes["/start"] = Route(302, b"", {"Location": target})
    url = server.url("/start", host="localhost")
    f = fetcher(allow="localhost")  # by name only: 127.0.0.2 and the metadata address stay shut
    try:
        assert await refused(f, url) == (
            f"image URL {url} (redirected to {target}): address {address} is {why}; {hint}"
        )
    finally:
        await f.aclose()
    assert [path for path, _ in server.seen] == ["/start"]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://x/y", "gopher://x:70/1"])
async def test_a_redirect_may_only_lead_to_http(
    serve: Callable[..., Server], tmp_path: Path, location: str
) -> None:
    server = serve({"/start": Route(302, b"", {"Location": location})})
    f = fetcher(allow="127.0.0.1", file_roots=[tmp_path, "/etc"])  # file:// on, still not by redirect
    try:
        assert await refused(f, server.url("/start")) == (
            f"image URL {server.url('/start')} redirects to {location}: a redirect may only lead to an "
            "http or https URL"
        )
    finally:
        await f.aclose()


async def test_a_redirect_to_a_data_url_is_refused_without_echoing_it(serve: Callable[..., Server]) -> None:
    # httpx parses the Location itself (even when not following it) and finds no valid URL.
    server = serve({"/start": Route(302, b"", {"Location": "data:image/png;base64,iVBORw0KGgo="})})
    f = fetcher(allow="127.0.0.1")
    try:
        message = await refused(f, server.url("/start"))
    finally:
        await f.aclose()
    assert message.startswith(
        f"could not fetch image from {server.url('/start')}: the server redirected to a URL that cannot "
        "be fetched ("
    )
    assert "iVBOR" not in message


# ---- deadlines and the byte cap ------------------------------------------------------------


async def test_a_slow_server_hits_the_deadline_of_its_modality(serve: Callable[..., Server]) -> None:
    server = serve({"/clip": Route(delay_s=1.0)})
    url = server.url("/clip")
    f = fetcher(allow="127.0.0.1", timeout_s={"image": 0.3, "video": 10.0, "audio": 0.3, "event": 0.3})
    try:
        started = time.monotonic()
        assert await refused(f, url, "audio") == (
            f"could not fetch audio from {url}: no complete answer within 0.3 s"
        )
        assert time.monotonic() - started < 0.9  # the deadline, not the server, ended it
        assert await f.load(url, "video") == PNG  # video's own, longer deadline
    finally:
        await f.aclose()


def test_per_modality_deadlines_come_from_settings(tmp_path: Path) -> None:
    s = Settings(
        image_fetch_timeout_s=1.5,
        video_fetch_timeout_s=20.0,
        audio_fetch_timeout_s=4.0,
        event_fetch_timeout_s=6.0,
        fetch_connect_timeout_s=0.7,
        fetch_max_redirects=2,
        fetch_allow="localhost, 10.0.0.0/8",
        fetch_file_roots=f"{tmp_path}, {tmp_path / 'b'}",
        media_max_bytes=1234,
    )
    f = MediaFetcher.from_settings(s)
    assert f.timeouts_s == {"image": 1.5, "video": 20.0, "audio": 4.0, "event": 6.0, "thermal": 1.5}
    assert (f.connect_timeout_s, f.max_redirects, f.max_bytes) == (0.7, 2, 1234)
    assert f.allow.hosts == {"localhost"} and [str(n) for n in f.allow.networks] == ["10.0.0.0/8"]
    real = Path(os.path.realpath(tmp_path))
    assert f.file_roots.roots == (real, real / "b")


async def test_a_body_over_the_cap_is_413(serve: Callable[..., Server]) -> None:
    server = serve({"/huge": Route(body=b"\0" * (4 * LIMIT), length=False)})
    f = fetcher(allow="127.0.0.1")
    try:
        with pytest.raises(PayloadTooLargeError) as info:
            await f.load(server.url("/huge"))
    finally:
        await f.aclose()
    assert info.value.http_status == 413
    assert info.value.message.startswith(
        f"image at {server.url('/huge')} is over the limit of {LIMIT} bytes (read at least "
    )


async def test_the_byte_cap_holds_across_a_redirect(serve: Callable[..., Server]) -> None:
    b = serve({"/huge": Route(body=b"\0" * (LIMIT + 1))})
    a = serve({"/start": Route(302, b"", {"Location": b.url("/huge")})})
    f = fetcher(allow="127.0.0.1")
    try:
        with pytest.raises(PayloadTooLargeError) as info:
            await f.load(a.url("/start"))
    finally:
        await f.aclose()
    assert info.value.message == (
        f"image at {a.url('/start')} (redirected to {b.url('/huge')}) is {LIMIT + 1} bytes, "
        f"over the limit of {LIMIT} bytes"
    )


# ---- file:// -------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): root holds cat.png, 'a b.png', a folder and escapes; outside holds secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "cat.png").write_bytes(PNG)
    (root / "a b.png").write_bytes(PNG)
    (root / "big.bin").write_bytes(b"\1" * (LIMIT + 1))
    (root / "empty.bin").write_bytes(b"")
    (outside / "secret.png").write_bytes(b"secret")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "inside-link.png").symlink_to(root / "cat.png")
    return root, outside


async def test_file_urls_under_a_root_are_read(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    f = fetcher(file_roots=str(root))
    assert await f.load(f"file://{root}/cat.png") == PNG
    assert await f.load(f"file://localhost{root}/a%20b.png") == PNG
    assert await f.load(f"file://{root}/sub/../inside-link.png") == PNG  # resolves inside the root
    assert await f.load(f"file://{root}/cat.png", "video") == PNG


@pytest.mark.parametrize(
    "path",
    ["{outside}/secret.png", "{root}/../outside/secret.png", "{root}/escape.png", "{root}/sub/../../outside"],
)
async def test_file_urls_outside_the_roots_are_refused(roots: tuple[Path, Path], path: str) -> None:
    root, outside = roots
    url = "file://" + path.format(root=root, outside=outside)
    message = await refused(fetcher(file_roots=[root]), url)
    assert message == (
        f"image URL {url}: {url[len('file://') :]} is outside the folders MODALMESH_FETCH_FILE_ROOTS "
        "opens (symlinks and '..' resolved)"
    )
    assert "secret" not in message.replace("secret.png", "")


async def test_file_url_errors(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    f = fetcher(file_roots=f"{root},")
    assert await refused(f, f"file://{root}/missing.png") == (
        f"image URL file://{root}/missing.png: no file at {root}/missing.png"
    )
    assert (
        await refused(f, f"file://{root}/sub")
        == f"image URL file://{root}/sub: {root}/sub is not a regular file"
    )
    assert await refused(f, f"file://{root}/empty.bin") == f"image at file://{root}/empty.bin is empty"
    assert await refused(f, f"file://example.com{root}/cat.png") == (
        f"image URL file://example.com{root}/cat.png: a file URL must name a local path (file:///path), "
        "got host 'example.com'"
    )
    with pytest.raises(PayloadTooLargeError) as info:
        await f.load(f"file://{root}/big.bin")
    assert info.value.message == (
        f"image at file://{root}/big.bin is {LIMIT + 1} bytes, over the limit of {LIMIT} bytes"
    )


async def test_accepted_schemes_name_file_when_roots_are_set(roots: tuple[Path, Path]) -> None:
    assert await refused(fetcher(file_roots=[roots[0]]), "ftp://x/y") == (
        "unsupported image URL scheme 'ftp' in ftp://x/y: accepted schemes are http, https, data and file"
    )


# ---- https: the certificate is checked against the host name, not the address --------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]]:
    """(server context for a "localhost"-only certificate, client context trusting its CA,
    the server names clients sent)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=modalmesh test CA", cwd=tmp_path)  # fmt: skip
    _openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost", cwd=tmp_path)
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf", cwd=tmp_path)  # fmt: skip
    names: list[str | None] = []
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")

    def record_name(_sock: ssl.SSLObject, name: str, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    server.sni_callback = record_name
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return server, client, names


async def test_https_connects_to_the_address_but_verifies_the_host_name(
    serve: Callable[..., Server], tls: tuple[ssl.SSLContext, ssl.SSLContext, list[str | None]]
) -> None:
    server_ctx, client_ctx, names = tls
    server = serve({"/cat.png": Route()}, tls=server_ctx)
    async with httpx.AsyncClient(verify=client_ctx) as client:
        f = fetcher(allow="localhost, 127.0.0.1", client=client)
        assert await f.load(server.url("/cat.png", host="localhost")) == PNG
        assert names[-1] == "localhost"
        assert server.seen == [("/cat.png", f"localhost:{server.port}")]
        # The certificate names only localhost: by address, verification must fail.
        message = await refused(f, server.url("/cat.png"))
        assert message.startswith(f"could not fetch image from {server.url('/cat.png')}: ")
        assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message


# ---- the policy pieces ---------------------------------------------------------------------


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    ip = ip_literal(address)
    assert ip is not None and classify(ip) is None


def addr(text: str) -> IPAddress:
    ip = ip_literal(text)
    assert ip is not None, text
    return ip


def test_allow_list_entries() -> None:
    allow = AllowList.parse(" Media.Internal. , 10.0.0.0/8,[::1], 169.254.169.254 ,,")
    assert allow.hosts == {"media.internal"}
    assert allow.allows("MEDIA.internal", addr("192.168.0.9"))  # by name: any address it resolves to
    assert allow.allows("x", addr("10.9.9.9")) and allow.allows("x", addr("::1"))
    assert allow.allows("x", addr("::ffff:10.0.0.1"))  # the IPv4 address inside counts
    assert not allow.allows("x", addr("192.168.0.9"))
    assert allow.allows("x", addr("169.254.169.254"))  # named itself


def test_metadata_addresses_open_only_when_named_themselves() -> None:
    ip = addr("169.254.169.254")
    assert not AllowList.parse("169.254.0.0/16, 0.0.0.0/0").allows("x", ip)
    assert not AllowList.parse("metadata.google.internal").allows("metadata.google.internal", ip)
    assert AllowList.parse("169.254.169.254/32").allows("x", ip)


@pytest.mark.parametrize("entry", ["http://example.com", "10.0.0.0/33", "a b", "-bad-.example"])
def test_a_bad_allow_entry_fails_at_start(entry: str) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        MediaFetcher(max_bytes=1, timeout_s=1.0, allow=f"localhost,{entry}")
    assert str(info.value) == (
        f"MODALMESH_FETCH_ALLOW entry {entry!r}: expected a host name, an IP address or a CIDR block "
        "(e.g. media.internal, 10.0.0.5, 10.0.0.0/8)"
    )


# ---- through the gateway's REST app ---------------------------------------------------------


def chat(url: str) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]
    return {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


async def test_the_app_answers_400_for_a_refused_url_and_still_serves(
    client: httpx.AsyncClient, media_server: str
) -> None:
    # The unit-test settings open 127.0.0.1 (the media server) and nothing else.
    r = await client.post("/v1/chat/completions", json=chat("http://10.0.0.5/x.png"))
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": "messages[0].content[0] (image 0): image URL http://10.0.0.5/x.png: address 10.0.0.5 "
        f"is private; {HINT}",
        "type": "BadRequestError",
        "param": "messages[0].content[0]",
        "code": 400,
    }
    r = await client.post("/v1/chat/completions", json=chat("http://169.254.169.254/latest/meta-data/"))
    assert r.status_code == 400 and "is a cloud metadata address" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json=chat(f"{media_server}/cat.png"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


async def test_the_app_refuses_loopback_unless_allowed(
    make_service: ServiceFactory, llm_server: tuple[Any, str], settings: Settings, media_server: str
) -> None:
    strict = settings.model_copy(update={"fetch_allow": ""})
    service: ChatService = make_service(llm_server[1], settings_=strict)
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        r = await client.post("/v1/chat/completions", json=chat(f"{media_server}/cat.png"))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == (
            f"messages[0].content[0] (image 0): image URL {media_server}/cat.png: address 127.0.0.1 is "
            f"loopback; {HINT}"
        )
        data = "data:image/png;base64," + base64.b64encode(PNG).decode()
        r = await client.post("/v1/chat/completions", json=chat(data))
        assert r.status_code == 200, r.text
