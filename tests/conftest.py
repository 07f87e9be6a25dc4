"""Session-wide fixtures: the tiny preset generated once into a temporary cache folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `compose` (the compose stack in Docker, tests/compose) run only when asked for
    with `-m compose` (`make compose-test`, its own step of .ci/run), never in a plain `make test`."""
    if "compose" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("compose") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("compose")])
        items[:] = kept


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the generated tiny preset (generated once per test session)."""
    from services.common.presets import load_preset
    from services.models.tiny import generate

    cache = tmp_path_factory.mktemp("modalmesh-cache")
    generate(load_preset("tiny", cache_dir=cache))
    return cache


@pytest.fixture(scope="session")
def tiny_preset(tiny_cache_dir: Path):
    """The validated tiny Preset whose checkpoints exist under `tiny_cache_dir`."""
    from services.common.presets import load_preset

    return load_preset("tiny", cache_dir=tiny_cache_dir)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port for the module's tests (killed afterwards)."""
    from tests.helpers.services import start_redis

    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        proc.kill_group()
