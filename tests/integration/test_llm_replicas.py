"""Several LLM replicas behind one gateway: MODALMESH_LLM_ADDRESS names them all
("ipv4:host:port,host:port", or a dns: name resolving to each), the gateway's channel spreads
calls over them (round_robin), and when one replica dies the others take every request."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.procs import Process, free_port, free_ports, stop_all, wait_until
from tests.helpers.services import start_gateway, start_llm

pytestmark = pytest.mark.integration


def _chat(base_url: str, i: int) -> httpx.Response:
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": f"Hello {i}"}]}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def _served(log: Path) -> int:
    """Generations a replica logged."""
    return len(re.findall(r"generated \d+ tokens", log.read_text())) if log.exists() else 0


@pytest.fixture(scope="module")
def replicas(
    tiny_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[Process], list[Path]]]:
    logs = tmp_path_factory.mktemp("replica-logs")
    a, b, enc, gw_http, gw_grpc = free_ports(5)
    env = {
        "MODALMESH_CACHE_DIR": str(tiny_cache_dir),
        "MODALMESH_LLM_ADDRESS": f"ipv4:127.0.0.1:{a},127.0.0.1:{b}",
        "MODALMESH_ENCODER_ADDRESS": f"127.0.0.1:{enc}",  # text chats only: no encoder needed
        "MODALMESH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody listens
    }
    paths = [logs / "llm-a.log", logs / "llm-b.log"]
    procs = [start_llm(env, paths[0], port=a), start_llm(env, paths[1], port=b)]
    gateway, base_url, _ = start_gateway(env, logs / "gateway.log", ports=(gw_http, gw_grpc))
    procs.append(gateway)
    try:
        # each replica logs its warm-up generation once it serves
        wait_until(lambda: all(_served(p) >= 1 for p in paths), timeout=180, what="both replicas warm")
        wait_until(lambda: _chat(base_url, 0).status_code == 200, timeout=60, what="gateway serves")
        yield base_url, procs, paths
    finally:
        stop_all(procs)


def test_calls_are_spread_over_every_replica_and_survive_one_dying(
    replicas: tuple[str, list[Process], list[Path]],
) -> None:
    base_url, procs, paths = replicas
    before = [_served(p) for p in paths]
    for i in range(8):
        r = _chat(base_url, i)
        assert r.status_code == 200, r.text
    spread = [_served(p) - n for p, n in zip(paths, before, strict=True)]
    assert all(n >= 2 for n in spread), spread  # round_robin: both took a share

    procs[0].kill_group()  # replica A dies (SIGKILL); B takes everything from now on
    wait_until(lambda: not procs[0].alive(), timeout=10, what="replica A gone")
    after_b = _served(paths[1])
    codes = [_chat(base_url, i).status_code for i in range(6)]
    assert codes.count(200) >= 5, codes  # at most the call in flight to the dead one fails
    assert _served(paths[1]) - after_b >= 5
