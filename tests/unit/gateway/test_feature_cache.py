"""The Redis feature cache: features and frame times, against the real Redis at 127.0.0.1:6379
and an unreachable one."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from gateway.feature_cache import (
    KEY_PREFIX,
    FeatureCache,
    content_digest,
    decode_features,
    encode_features,
)
from tests.unit.gateway.support import REDIS_URL, needs_redis, redis_up

UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    p = f"mmtest:{uuid.uuid4().hex}:"
    yield p
    if redis_up():
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=p + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((16, 64)).astype(np.float32)


TIMES = np.array([0.0, 0.5, 1.0, 1.5], dtype=np.float32)


def test_value_round_trip() -> None:
    array = features()  # 4 frames of 4 tokens
    value = encode_features(array, TIMES)
    assert value.startswith(b'{"dtype": "FP32", "shape": [16, 64], "frames": 4}\n')
    assert len(value.split(b"\n", 1)[1]) == 16 * 64 * 4 + 4 * 4
    out, times = decode_features(value)
    np.testing.assert_array_equal(out, array)
    np.testing.assert_array_equal(times, TIMES)
    assert times.dtype == np.float32


def test_value_keeps_fp16() -> None:
    array = features().astype(np.float16)
    out, times = decode_features(encode_features(array, np.zeros(1, np.float32)))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, array)
    np.testing.assert_array_equal(times, [0.0])


@pytest.mark.parametrize(
    "value",
    [
        b"no header",
        b'{"dtype": "FP32", "shape": [2], "frames": 0}\nabc',
        b'{"dtype": "FP32", "shape": [1], "frames": 2}\n\0\0\0\0\0\0\0\0',  # times cut short
    ],
)
def test_malformed_values_raise(value: bytes) -> None:
    with pytest.raises(ValueError):
        decode_features(value)


def test_an_entry_without_frame_times_is_refused() -> None:
    old = b'{"dtype": "FP32", "shape": [1]}\n\0\0\0\0'  # the layout before frame times
    with pytest.raises(KeyError):
        decode_features(old)


def test_key_layout() -> None:
    cache = FeatureCache(None, ttl_s=1)
    digest = content_digest(b"abc")
    assert cache.key("image_clip_vision", digest) == f"{KEY_PREFIX}image_clip_vision:{digest}"
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@needs_redis
async def test_store_and_hit_in_real_redis(prefix: str) -> None:
    cache = FeatureCache(REDIS_URL, ttl_s=120, key_prefix=prefix)
    digest = content_digest(b"image bytes")
    try:
        assert await cache.get("m", digest) is None
        await cache.put("m", digest, features(1), TIMES)
        hit = await cache.get("m", digest)
        assert hit is not None
        np.testing.assert_array_equal(hit[0], features(1))
        np.testing.assert_array_equal(hit[1], TIMES)
        raw = aioredis.Redis.from_url(REDIS_URL)
        ttl = await raw.ttl(cache.key("m", digest))
        await raw.aclose()
        assert 0 < ttl <= 120
        assert await cache.get("other-model", digest) is None
    finally:
        await cache.aclose()


@needs_redis
async def test_malformed_entry_reads_as_miss(prefix: str) -> None:
    cache = FeatureCache(REDIS_URL, ttl_s=60, key_prefix=prefix)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        await raw.set(cache.key("m", "d"), b"garbage", ex=60)
        assert await cache.get("m", "d") is None
        await raw.set(cache.key("m", "d"), b'{"dtype": "FP32", "shape": [1]}\n\0\0\0\0', ex=60)
        assert await cache.get("m", "d") is None  # the layout before frame times
    finally:
        await raw.aclose()
        await cache.aclose()


async def test_unreachable_redis_is_a_miss_and_backs_off() -> None:
    cache = FeatureCache(UNREACHABLE, ttl_s=60)
    try:
        started = time.monotonic()
        assert await cache.get("m", "d") is None
        await cache.put("m", "d", features(), TIMES)  # logged, not raised
        assert await cache.get("m", "d") is None
        assert time.monotonic() - started < 2.0
        assert cache._redis() is None  # backing off: no further connection attempts for now
    finally:
        await cache.aclose()


async def test_disabled_cache() -> None:
    cache = FeatureCache("", ttl_s=60)
    await cache.put("m", "d", features(), TIMES)
    assert await cache.get("m", "d") is None
    await cache.aclose()
