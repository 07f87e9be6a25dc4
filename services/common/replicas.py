"""Client-side load balancing over the replicas of a tier (encoders, decoders).

The encoder and decoder clients dial tritonclient channels, which (unlike the LLM client's
grpc channel with `round_robin`) connect to one address each. `ReplicaPool` keeps one client
per replica and spreads calls over them:

- **Addresses.** A setting such as MODALMESH_ENCODER_ADDRESS is either a comma-separated list
  of `host:port` (`10.0.0.5:8101,10.0.0.6:8101`, `[::1]:8101`) or a `dns:` name
  (`dns:encoders:8101` or `dns:///encoders:8101`) whose A/AAAA records are the replicas (a
  Kubernetes headless Service). `parse_replicas` refuses a bad entry (empty, missing or
  invalid port, bad host syntax) with `InvalidArgumentError` naming the setting; `Settings`
  runs it at start, so a service never starts with a bad list.
- **Round robin.** `pick` returns the next replica that is up, in turn; `call` runs one call
  on it.
- **Skipping a dead replica.** A call that fails with `UnavailableError` (connection refused,
  the replica died mid-call) marks that replica down for `down_s` seconds; `pick` skips it
  meanwhile, then tries it again (its channel reconnects on its own after a restart). When
  every replica is down, `pick` still returns one (the least recently marked down) so that a
  tier that comes back is found without waiting. `ReplicaPool.ready` asks every replica
  and marks the unready ones down too.
- **Retry.** With `retry=True`, a call that failed with `UnavailableError` is made once more on
  another replica (not on the one that failed). Other errors (a refused item, a timeout) are
  never retried: the replica answered, or may still be working.
- **DNS.** A `dns:` name is resolved at the first call, again every `resolve_interval_s`, and
  again (at most once a second) when a call fails with every known replica down: replicas
  added to the Service are used, removed ones are dropped (their clients closed with the
  pool, since calls may still be in flight on them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.common.errors import InvalidArgumentError, UnavailableError

logger = logging.getLogger(__name__)

C = TypeVar("C")
T = TypeVar("T")

DNS_PREFIX = "dns:"
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


@dataclass(frozen=True)
class ReplicaSpec:
    """Where a tier's replicas are: a fixed list of addresses, or a DNS name to resolve.

    Attributes:
        addresses: "host:port" per replica (IPv6 hosts in brackets); empty for a `dns:` name.
        dns_host: The name to resolve (None for a fixed list).
        dns_port: The port every resolved replica listens on.
    """

    addresses: tuple[str, ...] = ()
    dns_host: str | None = None
    dns_port: int = 0


def _host_port(entry: str, *, setting: str, index: int) -> tuple[str, int]:
    """(host, port) of one `host:port` entry; `[v6]:port` for IPv6 hosts."""
    where = f"{setting}: entry {index} {entry!r}"
    if not entry:
        raise InvalidArgumentError(f"{where}: expected host:port, got an empty entry", param=setting)
    if entry.startswith("["):
        host, sep, port_text = entry[1:].partition("]:")
        if not sep:
            raise InvalidArgumentError(f"{where}: expected [ipv6]:port", param=setting)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidArgumentError(f"{where}: {host!r} is not an IPv6 address", param=setting) from None
    else:
        host, sep, port_text = entry.rpartition(":")
        if not sep:
            raise InvalidArgumentError(f"{where}: expected host:port, the port is missing", param=setting)
        if ":" in host:
            raise InvalidArgumentError(f"{where}: write an IPv6 host in brackets, [addr]:port", param=setting)
        if not _HOSTNAME.match(host):
            raise InvalidArgumentError(f"{where}: {host!r} is not a host name or IP address", param=setting)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgumentError(
            f"{where}: expected a port in [1, 65535], got {port_text!r}", param=setting
        )
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """ "host:port", with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_replicas(value: str, *, setting: str) -> ReplicaSpec:
    """The replicas of a setting's value: "h1:p1,h2:p2" or "dns:name:port" / "dns:///name:port".

    Args:
        value: The setting's text.
        setting: Named in errors, e.g. "MODALMESH_ENCODER_ADDRESS (--encoder-address)".

    Raises:
        InvalidArgumentError: An entry is empty, lacks a port, has a port outside [1, 65535] or
            a host that is neither a host name nor an IP address.
    """
    text = value.strip()
    if text.startswith(DNS_PREFIX):
        name = text[len(DNS_PREFIX) :].removeprefix("///")
        host, port = _host_port(name, setting=setting, index=0)
        return ReplicaSpec(dns_host=host, dns_port=port)
    entries = [e.strip() for e in text.split(",")]
    addresses = [format_address(*_host_port(e, setting=setting, index=i)) for i, e in enumerate(entries)]
    return ReplicaSpec(addresses=tuple(dict.fromkeys(addresses)))


@dataclass
class Replica(Generic[C]):
    """One replica: its address, its client, and until when it is considered down."""

    address: str
    client: C
    down_until: float = 0.0
    failures: int = 0

    def up(self, now: float) -> bool:
        return self.down_until <= now


@dataclass
class ReplicaPool(Generic[C]):
    """Round-robin over a tier's replicas, skipping those that failed recently.

    Create it inside the event loop that will use it when `make_client` binds to one.

    Args:
        spec: The replicas (`parse_replicas`).
        make_client: A client for one "host:port".
        tier: Named in errors ("encoder", "decoder").
        down_s: How long a failed replica is skipped before it is tried again.
        resolve_interval_s: How often a `dns:` name is resolved again.
        resolver: (host, port) -> addresses; `getaddrinfo` by default (tests pass their own).
    """

    spec: ReplicaSpec
    make_client: Callable[[str], C]
    tier: str
    down_s: float = 2.0
    resolve_interval_s: float = 30.0
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None
    replicas: list[Replica[C]] = field(default_factory=list, init=False)
    _retired: list[C] = field(default_factory=list, init=False)
    _turn: itertools.count[int] = field(default_factory=itertools.count, init=False)
    _resolved_at: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self.replicas = [Replica(a, self.make_client(a)) for a in self.spec.addresses]

    async def _resolve(self) -> list[str]:
        host, port = self.spec.dns_host or "", self.spec.dns_port
        if self.resolver is not None:
            return await self.resolver(host, port)
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(format_address(str(info[4][0]), port) for info in infos))

    async def refresh(self, *, force: bool = False) -> None:
        """Resolve the `dns:` name again when due (or `force`, at most once a second)."""
        if self.spec.dns_host is None:
            return
        now = time.monotonic()
        age = now - self._resolved_at
        if age < (1.0 if force else self.resolve_interval_s):
            return
        self._resolved_at = now
        try:
            addresses = await self._resolve()
        except OSError as e:
            logger.warning("%s: resolving %s failed: %s", self.tier, self.spec.dns_host, e)
            return
        if not addresses:
            return
        known = {r.address: r for r in self.replicas}
        for r in self.replicas:
            if r.address not in addresses:
                self._retired.append(r.client)
        self.replicas = [known.get(a) or Replica(a, self.make_client(a)) for a in addresses]
        if set(known) != set(addresses):
            logger.info("%s replicas of %s: %s", self.tier, self.spec.dns_host, ", ".join(addresses))

    def pick(self, exclude: Iterable[str] = ()) -> Replica[C] | None:
        """The next replica in turn that is up and not in `exclude`; when none is up, the one
        marked down longest ago (outside `exclude`); None when every replica is excluded."""
        skip = set(exclude)
        candidates = [r for r in self.replicas if r.address not in skip]
        if not candidates:
            return None
        now = time.monotonic()
        up = [r for r in candidates if r.up(now)]
        if not up:
            return min(candidates, key=lambda r: r.down_until)
        return up[next(self._turn) % len(up)]

    def mark_down(self, replica: Replica[C], reason: str) -> None:
        """Skip `replica` for `down_s` seconds."""
        replica.failures += 1
        replica.down_until = time.monotonic() + self.down_s
        logger.warning(
            "%s replica %s marked down for %.1fs: %s", self.tier, replica.address, self.down_s, reason
        )

    @staticmethod
    def mark_up(replica: Replica[C]) -> None:
        replica.down_until = 0.0
        replica.failures = 0

    async def call(self, fn: Callable[[Replica[C]], Awaitable[T]], *, retry: bool) -> T:
        """`fn(replica)` on the next replica; on `UnavailableError`, that replica is marked
        down and, with `retry`, the call is made once more on another one.

        Raises:
            UnavailableError: No replica is known (an unresolvable `dns:` name), or the call
                failed as unavailable (on the second replica too with `retry`).
        """
        await self.refresh()
        tried: list[str] = []
        for attempt in range(2 if retry else 1):
            replica = self.pick(exclude=tried)
            if replica is None:
                if attempt == 0:
                    raise UnavailableError(f"the {self.tier} service has no replica at {self.describe()}")
                break
            tried.append(replica.address)
            try:
                result = await fn(replica)
            except UnavailableError as e:
                self.mark_down(replica, e.message)
                if all(not r.up(time.monotonic()) for r in self.replicas):
                    await self.refresh(force=True)
                if attempt == 1 or not retry or len(self.replicas) < 2:
                    raise
                logger.info("%s: retrying on another replica after %s failed", self.tier, replica.address)
                continue
            if replica.failures:
                self.mark_up(replica)
            return result
        raise UnavailableError(f"the {self.tier} service has no other replica at {self.describe()}")

    def describe(self) -> str:
        """The replicas as written in the setting (for messages)."""
        if self.spec.dns_host is not None:
            return f"dns:{format_address(self.spec.dns_host, self.spec.dns_port)}"
        return ",".join(self.spec.addresses)

    def clients(self) -> list[C]:
        """Every client the pool made, current and retired (to close them)."""
        return [r.client for r in self.replicas] + list(self._retired)

    async def ready(self, check: Callable[[C], Awaitable[bool]]) -> bool:
        """Whether any replica passes `check`; replicas that fail it are marked down, those
        that pass are marked up."""
        await self.refresh()
        results = await asyncio.gather(*(check(r.client) for r in self.replicas))
        for replica, ok in zip(self.replicas, results, strict=True):
            if ok:
                self.mark_up(replica)
            elif replica.up(time.monotonic()):
                self.mark_down(replica, "not ready")
        return any(results)


def validate_setting(value: Any, *, setting: str) -> Any:
    """For a pydantic validator: `value` unchanged when it parses, ValueError naming `setting`
    otherwise (None and "" mean unset)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        parse_replicas(value, setting=setting)
    except InvalidArgumentError as e:
        raise ValueError(e.message) from None
    return value


# While a restarted Triton server loads its models it answers "Request for unknown model: 'x' is
# not found" (PyTriton registers each model after the server is up), then "... has no available
# versions", then serves: every one of these is "not loaded here (yet)", a 503 retried elsewhere.
# A misspelt model name reads the same; the message keeps Triton's words.
_NOT_LOADED = ("Request for unknown model", "has no available versions", "is not ready")


def triton_model_not_loaded(message: str) -> bool:
    """Whether a Triton error says the model is not (yet) loaded on that server: what a replica
    answers between its server coming up and its models finishing loading (a restart, a new pod),
    so the call is retried elsewhere and the caller gets a 503, not an internal error."""
    return any(marker in message for marker in _NOT_LOADED)
