"""Replica lists: parsing and refusing bad addresses, round robin, skipping and retrying."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from services.common.replicas import Replica, ReplicaPool, ReplicaSpec, parse_replicas
from services.common.settings import Settings

SETTING = "MODALMESH_ENCODER_ADDRESS"


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        ("127.0.0.1:8101", ("127.0.0.1:8101",)),
        ("a:1, b.example.com:2,[::1]:3", ("a:1", "b.example.com:2", "[::1]:3")),
        (
            "encoders-0.encoders.default.svc.cluster.local:8101",
            ("encoders-0.encoders.default.svc.cluster.local:8101",),
        ),
        ("a:1,a:1", ("a:1",)),
    ],
)
def test_parse_lists(value: str, addresses: tuple[str, ...]) -> None:
    assert parse_replicas(value, setting=SETTING) == ReplicaSpec(addresses=addresses)


@pytest.mark.parametrize("value", ["dns:encoders:8101", "dns:///encoders:8101"])
def test_parse_dns(value: str) -> None:
    assert parse_replicas(value, setting=SETTING) == ReplicaSpec(dns_host="encoders", dns_port=8101)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a:1,,b:2", "entry 1 '': expected host:port, got an empty entry"),
        ("a:1,", "entry 1 '': expected host:port, got an empty entry"),
        ("encoders", "the port is missing"),
        ("a:0", "expected a port in [1, 65535], got '0'"),
        ("a:70000", "expected a port in [1, 65535], got '70000'"),
        ("a:http", "expected a port in [1, 65535], got 'http'"),
        ("a:", "expected a port in [1, 65535], got ''"),
        ("bad host:1", "'bad host' is not a host name or IP address"),
        ("-a:1", "'-a' is not a host name or IP address"),
        (":8101", "'' is not a host name or IP address"),
        ("::1:8101", "write an IPv6 host in brackets"),
        ("[::g]:1", "'::g' is not an IPv6 address"),
        ("[::1]8101", "expected [ipv6]:port"),
        ("dns:encoders", "the port is missing"),
    ],
)
def test_bad_addresses_are_refused_naming_the_setting(value: str, expected: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_replicas(value, setting=SETTING)
    assert info.value.message.startswith(f"{SETTING}: entry ")
    assert expected in info.value.message
    assert info.value.param == SETTING


def test_settings_refuse_a_bad_list_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALMESH_DECODER_ADDRESS", "127.0.0.1:8111,127.0.0.1")
    with pytest.raises(
        ValidationError, match=r"MODALMESH_DECODER_ADDRESS: entry 1 '127.0.0.1'.*port is missing"
    ):
        Settings()
    monkeypatch.delenv("MODALMESH_DECODER_ADDRESS")
    with pytest.raises(ValidationError, match=r"MODALMESH_ENCODER_ADDRESS \(--encoder-address\): entry 0"):
        Settings(encoder_address="a:99999")
    settings = Settings(encoder_address="a:1,b:2", decoder_address="dns:decoders:8111")
    assert settings.encoder_target() == "a:1,b:2"
    assert settings.decoder_target() == "dns:decoders:8111"
    assert Settings(encoder_address="").encoder_target() == f"127.0.0.1:{settings.encoder_grpc_port}"


def _pool(*addresses: str, down_s: float = 60.0) -> ReplicaPool[str]:
    return ReplicaPool(
        ReplicaSpec(addresses=addresses), lambda a: f"client {a}", tier="encoder", down_s=down_s
    )


def test_round_robin_spreads_and_skips_a_down_replica() -> None:
    pool = _pool("a:1", "b:1", "c:1")
    assert [pool.pick().address for _ in range(6)] == ["a:1", "b:1", "c:1"] * 2  # type: ignore[union-attr]
    pool.mark_down(pool.replicas[1], "connection refused")
    picked = {pool.pick().address for _ in range(10)}  # type: ignore[union-attr]
    assert picked == {"a:1", "c:1"}
    assert pool.pick(exclude=["a:1", "c:1"]).address == "b:1"  # type: ignore[union-attr]
    assert pool.pick(exclude=["a:1", "b:1", "c:1"]) is None


def test_all_down_picks_the_longest_down_and_a_short_down_comes_back() -> None:
    pool = _pool("a:1", "b:1")
    pool.mark_down(pool.replicas[1], "x")
    pool.mark_down(pool.replicas[0], "x")
    assert pool.pick().address == "b:1"  # type: ignore[union-attr]
    quick = _pool("a:1", "b:1", down_s=0.0)
    quick.mark_down(quick.replicas[0], "x")
    assert {quick.pick().address for _ in range(4)} == {"a:1", "b:1"}  # type: ignore[union-attr]


async def test_call_retries_unavailable_once_on_another_replica() -> None:
    pool = _pool("a:1", "b:1")
    seen: list[str] = []

    async def fn(replica: Replica[str]) -> str:
        seen.append(replica.address)
        if replica.address == "a:1":
            raise UnavailableError("connection refused")
        return replica.client

    assert await pool.call(fn, retry=True) == "client b:1"
    assert seen == ["a:1", "b:1"]
    assert pool.replicas[0].failures == 1
    # a:1 is now skipped: the next calls go to b:1 only, at once.
    seen.clear()
    for _ in range(3):
        await pool.call(fn, retry=True)
    assert seen == ["b:1"] * 3


async def test_call_without_retry_and_non_retryable_errors() -> None:
    pool = _pool("a:1", "b:1")
    calls: list[str] = []

    async def unavailable(replica: Replica[str]) -> str:
        calls.append(replica.address)
        raise UnavailableError(f"{replica.address} down")

    with pytest.raises(UnavailableError, match="a:1 down"):
        await pool.call(unavailable, retry=False)
    assert calls == ["a:1"]
    calls.clear()
    with pytest.raises(UnavailableError, match="down"):
        await pool.call(unavailable, retry=True)
    assert len(calls) == 2 and len(set(calls)) == 2  # each replica once, never the same twice

    async def slow(replica: Replica[str]) -> str:
        calls.append(replica.address)
        raise DeadlineExceededError("too slow")

    calls.clear()
    fresh = _pool("a:1", "b:1")
    with pytest.raises(DeadlineExceededError):
        await fresh.call(slow, retry=True)
    assert calls == ["a:1"]
    assert all(r.failures == 0 for r in fresh.replicas)  # a timeout does not mark a replica down


async def test_success_marks_a_replica_up_again() -> None:
    pool = _pool("a:1", down_s=0.0)
    pool.mark_down(pool.replicas[0], "x")

    async def ok(replica: Replica[str]) -> str:
        return replica.address

    assert await pool.call(ok, retry=True) == "a:1"
    assert pool.replicas[0].failures == 0


async def test_dns_names_are_resolved_and_re_resolved() -> None:
    answers = [["10.0.0.1:8101", "10.0.0.2:8101"], ["10.0.0.2:8101", "10.0.0.3:8101"]]
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [a.replace("8101", str(port)) for a in answers[min(len(asked), 2) - 1]]

    pool: ReplicaPool[str] = ReplicaPool(
        parse_replicas("dns:encoders:8101", setting=SETTING),
        lambda a: a,
        tier="encoder",
        resolver=resolver,
        resolve_interval_s=0.0,
    )
    assert pool.replicas == []

    async def where(replica: Replica[str]) -> str:
        return replica.address

    assert await pool.call(where, retry=True) in {"10.0.0.1:8101", "10.0.0.2:8101"}
    assert asked == [("encoders", 8101)]
    await pool.call(where, retry=True)
    assert [r.address for r in pool.replicas] == ["10.0.0.2:8101", "10.0.0.3:8101"]
    assert pool.clients()[-1] == "10.0.0.1:8101"  # the dropped replica's client is closed with the pool
    assert pool.describe() == "dns:encoders:8101"


async def test_dns_name_with_the_system_resolver() -> None:
    pool: ReplicaPool[str] = ReplicaPool(
        parse_replicas("dns:localhost:8101", setting=SETTING), lambda a: a, tier="encoder"
    )
    await pool.refresh()
    assert pool.replicas and all(r.address.endswith(":8101") for r in pool.replicas)


async def test_no_replica_is_unavailable() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return []

    pool: ReplicaPool[str] = ReplicaPool(
        parse_replicas("dns:nowhere:1", setting=SETTING), lambda a: a, tier="decoder", resolver=resolver
    )

    async def fn(replica: Replica[str]) -> str:
        return replica.address

    with pytest.raises(UnavailableError, match="the decoder service has no replica at dns:nowhere:1"):
        await pool.call(fn, retry=True)


@pytest.mark.parametrize("tier", ["encoder", "decoder"])
async def test_a_model_still_loading_is_unavailable_not_an_internal_error(tier: str) -> None:
    """Between a restarted Triton server answering and its models loading, Triton says "unknown
    model ... has no available versions": the clients make that a 503 (retried on another
    replica), while other Triton errors keep their own code."""
    from tritonclient.utils import InferenceServerException

    from services.common.errors import UnavailableError
    from services.common.replicas import triton_model_not_loaded
    from services.common.settings import Settings
    from services.decoders.client import DecoderClient
    from services.encoders.client import EncoderClient

    client = (
        EncoderClient("127.0.0.1:1", settings=Settings())
        if tier == "encoder"
        else DecoderClient("127.0.0.1:1", timeout_s=5, models={"image": "image_decoder"})
    )
    loading = InferenceServerException(
        "Request for unknown model: 'image_decoder' has no available versions", status="StatusCode.NOT_FOUND"
    )
    error = client._error(loading, "10.0.0.9:8111")
    assert isinstance(error, UnavailableError) and error.http_status == 503
    assert f"{tier} service" in error.message and "10.0.0.9:8111" in error.message
    assert "not loaded" in error.message
    other = client._error(
        InferenceServerException("in ensemble: bad input", status="StatusCode.INVALID_ARGUMENT"), "a:1"
    )
    assert not isinstance(other, UnavailableError) and other.http_status == 400
    assert triton_model_not_loaded("Request for unknown model: 'x' is not ready")
    assert triton_model_not_loaded("Request for unknown model: 'x' is not found")  # registered after start
    assert not triton_model_not_loaded("expected 3 channels, got 4")
