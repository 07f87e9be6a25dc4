"""The encoder-feature cache in Redis: features of a media item, keyed by its content.

Key: "mm:feat:" + encoder id (`Preset.encoder_id`: the Triton model name and a digest of the
encoder spec) + ":" + sha256 hex of the encoded file, or "uuid:" + the client's uuid for a
part that names one (vLLM's `uuid`: the client vouches that equal uuids mean equal media). Value: a one-line JSON header
{"dtype": "FP32", "shape": [rows, dim], "frames": F} then a newline, then the raw
little-endian feature bytes, then the F frame times (float32 little-endian seconds of each
frame in the source; an image or an ImageBind embedding is one frame). Entries expire after
`feature_cache_ttl_s`; an entry in another layout (no "frames") reads as a miss.

The cache is an optimisation only: any Redis failure is logged and read as a miss (or a
skipped store), and after a failure Redis is left alone for a short back-off so that a down
Redis costs requests nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.tensor_codec import NUMPY_DTYPES, dtype_name

logger = logging.getLogger(__name__)

KEY_PREFIX = "mm:feat:"
_BACKOFF_S = 5.0


def content_digest(data: bytes) -> str:
    """sha256 hex digest of an encoded media file."""
    return hashlib.sha256(data).hexdigest()


def uuid_key(uuid: str) -> str:
    """The key part of an item the client named (vLLM's content-part `uuid`) instead of its hash."""
    return f"uuid:{uuid}"


def encode_features(array: np.ndarray, times: np.ndarray) -> bytes:
    """Header line + raw feature bytes + float32 frame times, as stored in Redis."""
    name = dtype_name(array.dtype)
    frames = np.ascontiguousarray(times, dtype="<f4").reshape(-1)  # (F,)
    header = json.dumps({"dtype": name, "shape": list(array.shape), "frames": int(frames.size)}).encode()
    body = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[name]).tobytes()
    return header + b"\n" + body + frames.tobytes()


def decode_features(value: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode_features`: (features, float32 (F,) frame times).

    Raises:
        ValueError: The value is not a well-formed entry.
        KeyError: The header lacks a field (an entry of an older layout).
    """
    header, sep, data = value.partition(b"\n")
    if not sep:
        raise ValueError("no header line")
    meta = json.loads(header)
    dtype = NUMPY_DTYPES[meta["dtype"]]
    shape = tuple(int(d) for d in meta["shape"])
    frames = int(meta["frames"])
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if frames < 0 or len(data) != size + 4 * frames:
        raise ValueError(
            f"{len(data)} bytes do not hold {meta['dtype']}{list(shape)} and {frames} frame times"
        )
    features = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize).reshape(shape)
    times = np.frombuffer(data, dtype="<f4", offset=size).astype(np.float32)  # (F,)
    return features, times


class FeatureCache:
    """Redis-backed feature cache that never fails a request.

    Args:
        redis_url: e.g. "redis://127.0.0.1:6379/0"; None or "" disables the cache.
        ttl_s: Lifetime of an entry in seconds.
        key_prefix: Prefix of every key (tests use their own).
        timeout_s: Socket connect/read timeout; kept short because a miss is always an option.
    """

    def __init__(
        self, redis_url: str | None, *, ttl_s: int, key_prefix: str = KEY_PREFIX, timeout_s: float = 0.5
    ) -> None:
        self.redis_url = redis_url or None
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self._client: aioredis.Redis | None = None
        self._down_until = 0.0

    def key(self, encoder_id: str, digest: str) -> str:
        """The Redis key of one item's features."""
        return f"{self.key_prefix}{encoder_id}:{digest}"

    def _redis(self) -> aioredis.Redis | None:
        if self.redis_url is None or time.monotonic() < self._down_until:
            return None
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=self.timeout_s,
                socket_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def _failed(self, what: str, error: Exception) -> None:
        self._down_until = time.monotonic() + _BACKOFF_S
        logger.warning("feature cache %s failed (treated as a miss for %.0fs): %s", what, _BACKOFF_S, error)

    async def get(self, encoder_id: str, digest: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(features, frame times) of one item, or None on a miss or any Redis problem."""
        client = self._redis()
        if client is None:
            return None
        try:
            value = await client.get(self.key(encoder_id, digest))
        except (RedisError, OSError) as e:
            self._failed("lookup", e)
            return None
        if not isinstance(value, bytes):
            return None
        try:
            return decode_features(value)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning(
                "feature cache entry %s is malformed, ignored: %s", self.key(encoder_id, digest), e
            )
            return None

    async def put(self, encoder_id: str, digest: str, features: np.ndarray, times: np.ndarray) -> None:
        """Store one item's features and frame times; failures are logged and otherwise ignored."""
        client = self._redis()
        if client is None:
            return
        try:
            await client.set(self.key(encoder_id, digest), encode_features(features, times), ex=self.ttl_s)
        except (RedisError, OSError) as e:
            self._failed("store", e)

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            try:
                await self._client.aclose()
            except (RedisError, OSError) as e:
                logger.debug("closing the feature cache: %s", e)
        self._client = None
