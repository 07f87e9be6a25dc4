"""Fixtures shared by the trainer's unit tests (`redis_url` comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from services.trainer.store import JobStore


@pytest.fixture
def store(redis_url: str) -> JobStore:
    """A job store on the module's private Redis, emptied for each test."""
    s = JobStore.from_url(redis_url)
    s.client.flushdb()
    return s
