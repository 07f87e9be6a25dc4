"""Adapter versions on the tiny model: swap, pins, LoRA via PEFT, refusals, eviction, on-demand loads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.content import MediaFeatures, MediaPart, TextPart, Turn
from services.common.errors import FailedPreconditionError, NotFoundError, UnavailableError
from services.common.presets import Preset
from services.llm.adapter_manager import AdapterManager, WorkerCalls
from services.llm.domain import GenerationEvent, GenerationRequest
from services.llm.engine import Engine
from services.llm.sampling import SamplingParams
from services.models.checkpoints.bundle import stamp_manifest
from services.models.lm.loading import LoadedModel, load_model
from tests.helpers.bundles import make_bundle, rehash


@pytest.fixture(scope="module")
def bundles(tiny_preset: Preset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles v2..v5 for the tiny preset (read-only; copy one to damage it).

    v2: new connectors + LoRA; v3: new connectors only; v4: v1's connectors + LoRA (the LoRA
    alone differs from v1); v5: new connectors + another LoRA.
    """
    root = tmp_path_factory.mktemp("versions")
    v1 = {m: dict(sd) for m, sd in load_model(tiny_preset).bundle.connectors.items()}
    return {
        "2": make_bundle(root / "2", tiny_preset, version="2", seed=2, lora=True),
        "3": make_bundle(root / "3", tiny_preset, version="3", seed=3),
        "4": make_bundle(root / "4", tiny_preset, version="4", lora=True, lora_seed=4, connectors=v1),
        "5": make_bundle(root / "5", tiny_preset, version="5", seed=5, lora=True),
    }


@pytest.fixture
def fresh(tiny_preset: Preset) -> LoadedModel:
    """A model of its own: these tests inject LoRA into the LM."""
    return load_model(tiny_preset)


@contextlib.contextmanager
def never_eos(loaded: LoadedModel) -> Iterator[None]:
    """Push the EOS logit far down, so that a generation runs to max_tokens."""
    lm_head = loaded.model.lm.lm_head
    lm_head.bias = torch.nn.Parameter(torch.zeros(lm_head.out_features), requires_grad=False)
    lm_head.bias.data[list(loaded.eos_ids)] = -1e4
    try:
        yield
    finally:
        lm_head.bias = None


def request(adapter: str = "", max_tokens: int = 12) -> GenerationRequest:
    features = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))  # (16, 64)
    return GenerationRequest(
        turns=[Turn("user", [MediaPart(MediaFeatures("image", features)), TextPart("What is this?")])],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        adapter=adapter,
    )


async def run(engine: Engine, req: GenerationRequest) -> tuple[str | None, list[int]]:
    events: list[GenerationEvent] = [e async for e in engine.generate(req)]
    return events[0].adapter, [t for e in events for t in e.token_ids]


def logits(manager: AdapterManager, ref: str) -> torch.Tensor:
    """Next-token logits of a fixed text prompt under version `ref` (selected in place)."""
    version = manager.resolve(ref)
    manager.select(version)
    with torch.inference_mode():
        return manager._model.lm(input_ids=torch.tensor([[1, 40, 41, 42, 43]])).logits[0, -1]  # (V,)


async def test_a_request_in_flight_finishes_on_its_version(
    fresh: LoadedModel, bundles: dict[str, Path]
) -> None:
    engine = Engine(fresh)
    steps = {"n": 0}
    hook = fresh.model.lm.register_forward_hook(lambda *a: steps.__setitem__("n", steps["n"] + 1))
    try:
        with never_eos(fresh):
            _, v1_tokens = await run(engine, request(max_tokens=120))
            stream = engine.generate(request(max_tokens=120))
            first = await anext(stream)
            # v2 carries LoRA: it is injected between two tokens of the request in flight.
            await asyncio.to_thread(engine.adapters.load, bundles["2"], make_current=True)
            steps_at_swap = steps["n"]
            tokens = list(first.token_ids) + [t for e in [e async for e in stream] for t in e.token_ids]
            assert steps["n"] > steps_at_swap + 5, "the swap should land while the request decodes"
            assert (first.adapter, tokens) == ("tiny@1", v1_tokens)
            adapter, v2_tokens = await run(engine, request(max_tokens=120))
            assert adapter == "tiny@2" and v2_tokens != v1_tokens
            assert await run(engine, request("tiny@1", max_tokens=120)) == ("tiny@1", v1_tokens)
            assert await run(engine, request("tiny", max_tokens=120)) == ("tiny@2", v2_tokens)
        info = engine.info()
        assert (info.adapter, info.adapters) == ("tiny@2", ("tiny@1", "tiny@2"))
        assert info.created == json.loads((bundles["2"] / "manifest.json").read_text())["created"]
    finally:
        hook.remove()
        engine.close()


def test_lora_changes_the_logits_and_versions_without_lora_run_the_bare_lm(
    fresh: LoadedModel, bundles: dict[str, Path]
) -> None:
    manager = AdapterManager(fresh)
    base = logits(manager, "tiny@1")
    lora = manager.load(bundles["4"])
    assert lora.lora_name is not None and manager.current.ref == "tiny@1"
    for key, value in lora.connectors.state_dict().items():  # same connectors as v1: only the LoRA differs
        assert torch.equal(value, manager.start.connectors.state_dict()[key])
    with_lora = logits(manager, "tiny@4")
    assert (with_lora - base).abs().max() > 1e-2
    assert torch.equal(logits(manager, "tiny@1"), base)
    manager.load(bundles["3"])
    assert torch.equal(logits(manager, "tiny@3"), base)  # no LoRA: LoRA layers disabled
    manager.load(bundles["5"])
    other = logits(manager, "tiny@5")
    assert (other - with_lora).abs().max() > 1e-2 and (other - base).abs().max() > 1e-2
    assert torch.equal(logits(manager, "tiny@4"), with_lora)
    assert not any(p.requires_grad for p in fresh.model.parameters())


def _damage_lora_shape(b: Path) -> None:
    stamp_manifest(b, version="6")
    path = b / "lora" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(65, 4)
    save_file(tensors, str(path))
    rehash(b, "lora/adapter_model.safetensors")


def _damage_file(b: Path) -> None:
    stamp_manifest(b, version="6")  # another version: an already loaded one is not read again
    with (b / "connectors.safetensors").open("ab") as f:
        f.write(b"x")


def _retarget(b: Path) -> None:
    stamp_manifest(b, version="6")
    config = json.loads((b / "lora" / "adapter_config.json").read_text())
    config["target_modules"] = ["lm.model.layers.0.self_attn.q_proj"]
    (b / "lora" / "adapter_config.json").write_text(json.dumps(config))
    rehash(b, "lora/adapter_config.json")


# kind: (make(dest, preset, good bundles), message)
REFUSED = {
    "another base model": (
        lambda b, p, good: make_bundle(b, p, version="6", fingerprint="0" * 64),
        "built for base model 000000000000",
    ),
    "connector shapes": (
        lambda b, p, good: make_bundle(
            b, p, version="6", connectors={"image": {"fc1.weight": torch.zeros(3, 3)}}
        ),
        "image connector: missing key",
    ),
    "lora targets": (
        lambda b, p, good: _retarget(Path(shutil.copytree(good["2"], b))),
        "match no linear layer",
    ),
    "lora shapes": (
        lambda b, p, good: _damage_lora_shape(Path(shutil.copytree(good["2"], b))),
        r"q_proj\.lora_B\.weight: expected shape \(64, 4\), got \(65, 4\)",
    ),
    "a damaged file": (
        lambda b, p, good: _damage_file(Path(shutil.copytree(good["3"], b))),
        "sha256 expected",
    ),
    "another adapter name": (
        lambda b, p, good: make_bundle(b, p, version="6", name="other"),
        "named 'other'",
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_bad_bundle_is_refused_and_nothing_changes(
    kind: str, fresh: LoadedModel, bundles: dict[str, Path], tiny_preset: Preset, tmp_path: Path
) -> None:
    make, message = REFUSED[kind]
    make(tmp_path / "bad", tiny_preset, bundles)
    manager = AdapterManager(fresh)
    manager.load(bundles["3"], make_current=True)
    with pytest.raises(FailedPreconditionError, match=message):
        manager.load(tmp_path / "bad", make_current=True)
    assert (manager.current.ref, manager.refs(), manager._lora.adapters) == (
        "tiny@3",
        ("tiny@1", "tiny@3"),
        [],
    )
    with pytest.raises(FailedPreconditionError, match="holds version '3', expected '7'"):
        manager.load(bundles["3"], expect_version="7")


def test_eviction_spares_the_current_version_and_versions_in_use(
    fresh: LoadedModel, bundles: dict[str, Path]
) -> None:
    manager = AdapterManager(fresh, max_loaded=2)
    manager.load(bundles["2"])
    held = manager.acquire("tiny@2")
    manager.load(bundles["3"])  # over the limit, but v1 is current, v2 held, v3 just loaded
    assert manager.refs() == ("tiny@1", "tiny@2", "tiny@3")
    manager.release(held)  # v2 was just used: v3 is the least recently used evictable one
    assert manager.refs() == ("tiny@1", "tiny@2") and manager._lora.adapters == ["v_tiny_2"]
    manager.set_current("2")
    manager.load(bundles["5"])  # v1 is no longer current: it goes
    assert manager.refs() == ("tiny@2", "tiny@5") and manager.current.ref == "tiny@2"
    with pytest.raises(
        NotFoundError, match=r"adapter 'tiny@1' is not loaded; loaded: \['tiny@2', 'tiny@5'\]"
    ):
        manager.acquire("tiny@1")
    manager.set_current("5")
    manager.load(bundles["3"])  # v2 goes, and its LoRA leaves the LM
    assert manager.refs() == ("tiny@3", "tiny@5") and manager._lora.adapters == ["v_tiny_5"]


async def test_a_pinned_version_the_registry_knows_is_loaded_on_demand(
    fresh: LoadedModel, bundles: dict[str, Path]
) -> None:
    engine = Engine(fresh, max_loaded_adapters=2)
    try:
        with pytest.raises(NotFoundError, match=r"'tiny@3' is not loaded; loaded: \['tiny@1'\]$"):
            await run(engine, request("tiny@3"))  # no registry
        engine.adapters.catalog = lambda: {"3": bundles["3"], "5": bundles["5"]}
        assert (await run(engine, request("tiny@3")))[0] == "tiny@3"
        assert (await run(engine, request("tiny@5")))[0] == "tiny@5"  # evicts v3
        assert engine.info().adapters == ("tiny@1", "tiny@5") and engine.info().adapter == "tiny@1"
        with pytest.raises(
            NotFoundError, match=r"loaded: \['tiny@1', 'tiny@5'\]; known versions: \['3', '5'\]"
        ):
            await run(engine, request("tiny@9"))
        with pytest.raises(NotFoundError, match=r"^adapter 'other@3' is not loaded"):
            await run(engine, request("other@3"))

        def down() -> dict[str, Path]:
            raise ConnectionError("redis down")

        engine.adapters.catalog = down
        with pytest.raises(NotFoundError, match=r"the registry is unavailable \(redis down\)"):
            await run(engine, request("tiny@3"))
    finally:
        engine.close()


def test_one_version_loaded_by_two_threads_is_built_once(
    fresh: LoadedModel, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = AdapterManager(fresh)
    builds: list[Path] = []
    gate = threading.Event()
    original = manager._build

    def slow_build(path: Path):
        builds.append(path)
        gate.wait(5)
        return original(path)

    monkeypatch.setattr(manager, "_build", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(manager.load(bundles["2"]))) for _ in range(2)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results[0] is results[1] and manager._lora.adapters == ["v_tiny_2"]


def test_a_start_bundle_with_lora_is_served_with_it(tiny_preset: Preset, bundles: dict[str, Path]) -> None:
    adapter = tiny_preset.adapter.model_copy(update={"path": bundles["4"]})
    loaded = load_model(tiny_preset.model_copy(update={"adapter": adapter}))
    manager = AdapterManager(loaded)
    assert manager.current.ref == "tiny@4" and manager.current.lora_name == "v_tiny_4"
    plain = AdapterManager(load_model(tiny_preset))
    assert (logits(manager, "tiny@4") - logits(plain, "tiny@1")).abs().max() > 1e-2


def test_worker_calls_run_on_the_worker_thread_between_steps_and_fail_once_closed() -> None:
    calls = WorkerCalls()
    executor = ThreadPoolExecutor(max_workers=1, initializer=calls.mark_worker_thread)
    calls.bind(executor)
    worker = executor.submit(threading.get_ident).result()
    assert calls.call(threading.get_ident) == worker
    busy, ran = threading.Event(), []

    def decode_loop() -> None:  # a long request: drains the queue between its steps
        busy.set()
        for _ in range(200):
            if calls.run_pending():
                ran.append("between steps")
            threading.Event().wait(0.005)

    running = executor.submit(decode_loop)
    busy.wait(5)
    assert calls.call(lambda: threading.get_ident()) == worker
    running.result()
    assert ran == ["between steps"]
    executor.shutdown(wait=True)
    calls.close()
    with pytest.raises(UnavailableError, match="shutting down"):
        calls.call(lambda: 1)
