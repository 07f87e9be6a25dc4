"""Who may call the gateway and how much: API keys and per-caller limits, for REST and gRPC alike.

`ApiKeys` holds the configured keys (settings.api_keys plus settings.api_keys_file) and checks
a presented one in constant time; none configured = auth off. `KeyLimiter` gives each caller
(its key, or its address when auth is off) a token bucket of requests per minute and a cap on
requests in flight. `Guard` puts both together: the REST middleware and the gRPC servicer call
`Guard.admit` with what their transport says (the Authorization / x-api-key value and the peer
address) and release the `Permit` it returns when the reply is over. Keys are never logged: a
key is named by `key_id`, a short prefix of its SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import (
    FailedPreconditionError,
    ModalmeshError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from services.common.settings import Settings

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


def key_id(key: str) -> str:
    """A name for a key that is safe to log: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class RateLimitedError(ResourceExhaustedError):
    """A caller is over its request rate or its requests in flight (429, RESOURCE_EXHAUSTED).

    Args:
        message: What limit, and how far over it.
        retry_after_s: Whole seconds until a retry can pass (HTTP Retry-After).
    """

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def error_headers(error: ModalmeshError) -> dict[str, str]:
    """The HTTP headers an error response needs: WWW-Authenticate on 401, Retry-After on 429."""
    if isinstance(error, UnauthenticatedError):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(error, RateLimitedError):
        return {"Retry-After": str(error.retry_after_s)}
    if error.http_status == 429:  # a full queue downstream: temporary, come back soon
        return {"Retry-After": "1"}
    return {}


def read_keys_file(path: Path) -> list[str]:
    """The keys of a keys file: one per line, '#' starts a comment, blank lines ignored.

    Raises:
        FailedPreconditionError: The file is missing or unreadable, or holds no key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FailedPreconditionError(
            f"api_keys_file: expected a readable UTF-8 file of API keys, got {str(path)!r}: {e}"
        ) from None
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [k for k in keys if k]
    if not keys:
        raise FailedPreconditionError(
            f"api_keys_file: expected at least one key (one per line) in {str(path)!r}, got none"
        )
    return keys


class ApiKeys:
    """The configured API keys; empty = auth off.

    Args:
        keys: The keys clients may present (surrounding spaces and empty entries are dropped).
    """

    def __init__(self, keys: Iterable[str]) -> None:
        unique = dict.fromkeys(k.strip() for k in keys if k.strip())
        self._digests = [hashlib.sha256(k.encode()).digest() for k in unique]
        self._ids = [key_id(k) for k in unique]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """settings.api_keys (comma-separated) plus the lines of settings.api_keys_file.

        Raises:
            FailedPreconditionError: api_keys_file is set but missing, unreadable or empty.
        """
        keys = settings.api_keys.split(",")
        if settings.api_keys_file is not None:
            keys += read_keys_file(settings.api_keys_file)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else every caller is let in)."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: str | None) -> str:
        """The `key_id` of the configured key equal to `presented`.

        Every configured key is compared, in constant time, against the SHA-256 of the
        presented one, so neither where a key matches nor how long it is shows in the timing.

        Raises:
            UnauthenticatedError: No key presented, or not a configured one.
        """
        if not presented:
            raise UnauthenticatedError(
                "expected an API key (Authorization: Bearer <key>, or x-api-key), got none"
            )
        digest = hashlib.sha256(presented.encode()).digest()
        found = -1
        for i, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                found = i
        if found < 0:
            logger.info("refused an unknown API key (sha256 %s)", key_id(presented))
            raise UnauthenticatedError("the API key is not valid; expected one of the configured keys")
        return self._ids[found]


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


@dataclass
class _Caller:
    """One caller's token bucket and requests in flight."""

    tokens: float
    updated: float
    in_flight: int = 0


class KeyLimiter:
    """Per-caller request rate (token bucket) and requests in flight; a 0 limit is off.

    A bucket holds `capacity` tokens (the burst) and refills at rpm/60 per second; each
    request takes one. A caller with a full bucket and nothing in flight is the same as one
    never seen, so such entries are dropped now and then: memory holds only recent callers.
    Not thread-safe: the REST and gRPC servers of a gateway share one event loop.

    Args:
        rpm: Requests per minute per caller; 0 = no rate limit.
        burst: Bucket capacity; 0 = max(1, rpm/60) (one second's worth).
        max_concurrent: Requests in flight per caller; 0 = no cap.
        clock: Seconds, monotonic (tests pass their own).
    """

    def __init__(self, *, rpm: float, burst: int = 0, max_concurrent: int = 0, clock: Clock = time.monotonic):
        self.rate = rpm / 60.0
        self.capacity = float(burst) if burst > 0 else max(1.0, self.rate)
        self.max_concurrent = max_concurrent
        self.clock = clock
        self._callers: dict[str, _Caller] = {}
        self._swept = clock()
        # Long enough that a sweep is rare, short enough that idle callers go: a full refill.
        self._sweep_every = max(60.0, self.capacity / self.rate) if self.rate > 0 else 60.0

    @property
    def enabled(self) -> bool:
        """Whether any limit is on."""
        return self.rate > 0 or self.max_concurrent > 0

    def __len__(self) -> int:
        """How many callers are remembered (bounded by the sweep)."""
        return len(self._callers)

    def acquire(self, caller: str) -> Permit:
        """Take a token and a slot for one request of `caller`.

        Raises:
            RateLimitedError: Over the rate (Retry-After: until the next token) or over the
                requests in flight (Retry-After: 1).
        """
        now = self.clock()
        self._sweep(now)
        state = self._callers.get(caller)
        if state is None:
            state = self._callers[caller] = _Caller(tokens=self.capacity, updated=now)
        if self.max_concurrent and state.in_flight >= self.max_concurrent:
            raise RateLimitedError(
                f"too many requests in flight for this caller: expected at most {self.max_concurrent} "
                f"at once, got one more",
                retry_after_s=1,
            )
        if self.rate > 0:
            state.tokens = min(self.capacity, state.tokens + (now - state.updated) * self.rate)
            state.updated = now
            if state.tokens < 1.0:
                wait = math.ceil((1.0 - state.tokens) / self.rate)
                raise RateLimitedError(
                    f"rate limit exceeded: expected at most {self._rpm_text()} requests per minute "
                    f"(burst {self.capacity:g}); retry in {wait} s",
                    retry_after_s=max(1, wait),
                )
            state.tokens -= 1.0
        state.in_flight += 1
        return Permit(self, caller)

    def _release(self, caller: str) -> None:
        state = self._callers.get(caller)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def _rpm_text(self) -> str:
        return f"{self.rate * 60:g}"

    def _sweep(self, now: float) -> None:
        if now - self._swept < self._sweep_every:
            return
        self._swept = now
        idle = [
            name
            for name, s in self._callers.items()
            if s.in_flight == 0
            and (self.rate == 0 or s.tokens + (now - s.updated) * self.rate >= self.capacity)
        ]
        for name in idle:
            del self._callers[name]


class Permit:
    """One admitted request's slot; `release` (idempotent) when its reply is over."""

    def __init__(self, limiter: KeyLimiter | None, caller: str) -> None:
        self._limiter = limiter
        self.caller = caller

    def release(self) -> None:
        """Give back the in-flight slot (the rate token is spent for good)."""
        if self._limiter is not None:
            self._limiter._release(self.caller)
            self._limiter = None


class Guard:
    """API keys and per-caller limits in front of the chat and training routes.

    Args:
        keys: The configured keys; empty = auth off.
        limiter: The per-caller limits (a caller is a key, or a client address when auth is off).
    """

    def __init__(self, keys: ApiKeys, limiter: KeyLimiter) -> None:
        self.keys = keys
        self.limiter = limiter

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = time.monotonic) -> Guard:
        """The guard the settings describe.

        Raises:
            FailedPreconditionError: api_keys_file is set but missing, unreadable or empty.
        """
        keys = ApiKeys.from_settings(settings)
        limiter = KeyLimiter(
            rpm=settings.key_rate_limit_rpm,
            burst=settings.key_rate_limit_burst,
            max_concurrent=settings.key_max_concurrent,
            clock=clock,
        )
        if keys.enabled:
            logger.info("API keys on: %d key(s)", len(keys))
        return cls(keys, limiter)

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> str | None:
        """The caller's key_id, or None when auth is off.

        Args:
            authorization: The Authorization header (or gRPC metadata) value.
            api_key: The x-api-key value, used when there is no Bearer token.

        Raises:
            UnauthenticatedError: Auth is on and the key is missing or wrong.
        """
        if not self.keys.enabled:
            return None
        return self.keys.identify(bearer_token(authorization) or api_key)

    def admit(
        self, authorization: str | None, api_key: str | None, peer: str, *, counted: bool = True
    ) -> Permit:
        """Authenticate, then take a slot under the caller's limits (when `counted`).

        Args:
            authorization: The Authorization value.
            api_key: The x-api-key value.
            peer: The client's address, the caller's name when auth is off.
            counted: Whether the request counts against the limits.

        Raises:
            UnauthenticatedError: Missing or wrong key.
            RateLimitedError: Over the caller's rate or requests in flight.
        """
        key = self.authenticate(authorization, api_key)
        caller = f"key:{key}" if key is not None else f"addr:{peer}"
        if not counted or not self.limiter.enabled:
            return Permit(None, caller)
        return self.limiter.acquire(caller)
