"""Which addresses and files a media URL may reach: the gateway's SSRF guard.

`classify` names what is wrong with an IP address a media URL resolved to (loopback, private,
link-local, a cloud metadata address, ...), judging the IPv4 address inside IPv4-mapped, 6to4
and NAT64 IPv6 forms; `AllowList` is `MODALMESH_FETCH_ALLOW` parsed (host names, IP addresses,
CIDR blocks that open such addresses); `resolve` turns a host into its addresses without
blocking the event loop; `FileRoots` is `MODALMESH_FETCH_FILE_ROOTS`, the folders file:// URLs
may read under. Nothing here does network I/O except `resolve`'s DNS lookup; the fetching
itself is `gateway.media.MediaFetcher`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import FailedPreconditionError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata endpoints (AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba, Azure's
# wireserver). Only an allow-list entry naming the address itself opens one (see AllowList).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: the low 32 bits are IPv4
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, 6to4, NAT64), else None."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def classify(ip: IPAddress) -> str | None:
    """What makes `ip` unfit to fetch from ("loopback", "private", ...), or None for a public one.

    An IPv6 address that carries an IPv4 address is judged by that address, so
    ::ffff:127.0.0.1, 2002:7f00:1:: and 64:ff9b::7f00:1 are all loopback.
    """
    inner = embedded_ipv4(ip)
    if inner is not None:
        why = classify(inner)
        return None if why is None else f"{why} (it carries IPv4 address {inner})"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip in _SHARED, "in the carrier-grade NAT block 100.64.0.0/10"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not a global address"),
    )
    return next((why for bad, why in checks if bad), None)


@dataclass(frozen=True)
class AllowList:
    """Host names and IP blocks that may be fetched although `classify` refuses their addresses.

    A host name entry matches the URL's host exactly (case-insensitive, trailing dot ignored) and
    opens every address it resolves to, except a cloud metadata address: that opens only for an
    entry naming the address itself (169.254.169.254 or 169.254.169.254/32), so neither a wide
    block such as 169.254.0.0/16 nor a host name someone else's DNS answers for reaches it.
    """

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, text: str, *, source: str = "MODALMESH_FETCH_ALLOW") -> AllowList:
        """The allow-list of a comma-separated `text` ("localhost, 10.0.0.0/8, ::1").

        Raises:
            FailedPreconditionError: An entry is neither a host name, an IP address nor a CIDR block.
        """
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.rstrip(".")
            if not _HOST_NAME.match(name):
                raise FailedPreconditionError(
                    f"{source} entry {raw.strip()!r}: expected a host name, an IP address or a CIDR "
                    "block (e.g. media.internal, 10.0.0.5, 10.0.0.0/8)"
                )
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def allows(self, host: str, ip: IPAddress) -> bool:
        """Whether an address `ip` that `host` resolved to is opened by this list."""
        candidates = [ip] + [v4 for v4 in (embedded_ipv4(ip),) if v4 is not None]
        if any(c in METADATA_ADDRESSES for c in candidates):
            return any(
                c == net.network_address and net.prefixlen == net.max_prefixlen
                for c in candidates
                for net in self.networks
            )
        if host.lower().rstrip(".") in self.hosts:
            return True
        return any(c in net for c in candidates for net in self.networks if c.version == net.version)


def ip_literal(host: str) -> IPAddress | None:
    """`host` as an IP address when it is one written in standard form ("10.0.0.5", "::1")."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order, without duplicates.

    The lookup runs in the event loop's executor (asyncio's getaddrinfo), not on the loop.
    Non-standard IPv4 spellings ("127.1", "2130706433") resolve here too, as a connect would.

    Raises:
        OSError: The name does not resolve (socket.gaierror).
    """
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise socket.gaierror(socket.EAI_NONAME, f"no addresses for {host}")
    return found


@dataclass(frozen=True)
class FileRoots:
    """The folders (symlinks resolved) file:// media URLs may be read under."""

    roots: tuple[Path, ...] = ()

    @classmethod
    def parse(cls, text: str | Iterable[str | os.PathLike[str]]) -> FileRoots:
        """Roots from a comma-separated string or a list of folders; each is resolved once."""
        parts = text.split(",") if isinstance(text, str) else [os.fspath(p) for p in text]
        return cls(tuple(Path(os.path.realpath(p.strip())) for p in parts if p.strip()))

    def __bool__(self) -> bool:
        return bool(self.roots)

    def contains(self, real_path: str) -> bool:
        """Whether an already resolved path lies inside one of the roots."""
        path = Path(real_path)
        return any(path == root or path.is_relative_to(root) for root in self.roots)
