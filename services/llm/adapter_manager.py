"""The adapter versions one LLM replica serves: loading, verifying, the current pointer, eviction.

An `AdapterVersion` is one bundle made servable: its connectors (an nn.ModuleDict of its own),
its timestamp heads where the preset has them, and, if the bundle has LoRA, a PEFT adapter on the shared LM (`services.models.lm.lora`). The
manager keeps several versions loaded at once and a pointer to the current one:

- A request resolves its version when it is prepared ("" or the adapter name = current,
  "name@version" = pinned), holds it (`acquire`/`release`) and keeps that object to the end,
  so requests in flight finish on their version after the pointer moves.
- `load` does the heavy work on the calling (background) thread: hashes, base fingerprint,
  connector keys and shapes, LoRA targets and shapes. Only the PEFT injection runs on the
  engine's worker thread (`WorkerCalls`), between requests or between two decode steps, so
  it never races a forward pass. Then the version is added and, if asked, the pointer moves
  under a lock: atomically for the next request. A bad bundle raises and changes nothing.
- A pinned version that is not loaded is loaded on demand if `catalog` (the registry) knows
  it; otherwise the request gets NotFound listing the loaded and the known versions.
- At most `max_loaded` versions stay loaded: the least recently used ones go first, never
  the current one nor one a request holds (they may exceed the limit until released).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from services.common.errors import FailedPreconditionError, NotFoundError, UnavailableError
from services.models.checkpoints.bundle import Bundle, base_fingerprint, load_bundle, read_manifest
from services.models.lm.loading import DTYPES, LoadedModel, load_connectors, load_heads
from services.models.lm.lora import LoraHost, check_lora, linear_shapes, peft_adapter_name
from services.models.lm.output_projector import OutputProjector, load_projectors
from services.models.lm.timestamps import TimestampHeads

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _order(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(eq=False)
class AdapterVersion:
    """One loaded bundle version.

    Attributes:
        bundle: The bundle (manifest, path; its tensors are dropped once loaded into modules).
        connectors: This version's connectors.
        lora_name: Its PEFT adapter name on the LM, or None without LoRA.
        load_seconds: How long loading and verifying it took.
        users: Requests holding it.
        last_used: time.monotonic() of its last acquire or release.
        heads: Its timestamp heads (presets with `heads.timestamps`), else None.
        projectors: Its output projectors per output modality (presets with `outputs`).
    """

    bundle: Bundle
    connectors: nn.ModuleDict
    lora_name: str | None
    load_seconds: float
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    heads: TimestampHeads | None = field(default=None, repr=False)
    projectors: dict[str, OutputProjector] = field(default_factory=dict, repr=False)

    @property
    def ref(self) -> str:
        return self.bundle.ref

    @property
    def version(self) -> str:
        return self.bundle.version


class WorkerCalls:
    """Runs model mutations on the engine's single worker thread.

    `call` queues a function and waits for it; `post` queues without waiting. The queue is
    drained by a job submitted to the worker's executor (when it is idle) or by the decode
    loop between tokens (`run_pending`), whichever comes first.
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._executor: Executor | None = None
        self._worker: int | None = None
        self._closed = False

    def bind(self, executor: Executor) -> None:
        """Use `executor` (one thread) from now on; until then calls run on the caller's thread."""
        self._executor = executor

    def mark_worker_thread(self) -> None:
        """Executor initializer: remember the worker thread (calls made on it run inline)."""
        self._worker = threading.get_ident()

    def close(self) -> None:
        """Fail what is still queued and refuse new calls (the engine closed its worker)."""
        self._closed = True
        while self._pending:
            try:
                _, future = self._pending.popleft()
            except IndexError:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(UnavailableError("the LLM engine is shutting down"))

    def _queue(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(UnavailableError("the LLM engine is shutting down"))
            return future
        item: tuple[Callable[[], Any], Future[Any]] = (fn, future)
        self._pending.append(item)
        assert self._executor is not None
        try:
            self._executor.submit(self.run_pending)
        except RuntimeError:  # the executor is shut down: the engine is closing
            if item in self._pending:
                self._pending.remove(item)
                future.set_exception(UnavailableError("the LLM engine is shutting down"))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker thread and return its result (blocks the caller)."""
        if self._executor is None or threading.get_ident() == self._worker:
            return fn()
        return self._queue(fn).result()

    def post(self, fn: Callable[[], object], what: str) -> None:
        """Queue `fn` for the worker thread without waiting; a failure is logged."""

        def logged() -> None:
            try:
                fn()
            except Exception:
                logger.exception("%s failed", what)

        if self._executor is None or threading.get_ident() == self._worker:
            logged()
        else:
            self._queue(logged)

    def run_pending(self) -> bool:
        """Run what is queued (worker thread only); True if anything ran."""
        ran = False
        while self._pending:
            try:
                fn, future = self._pending.popleft()
            except IndexError:
                break
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)
            ran = True
        return ran


class AdapterManager:
    """Loaded adapter versions of one replica and the current pointer.

    Args:
        loaded: The model with the preset's start bundle, which becomes the first version.
        max_loaded: Most versions kept loaded.
        worker: Where model mutations run (the engine binds it to its worker thread).
    """

    def __init__(
        self, loaded: LoadedModel, *, max_loaded: int = 4, worker: WorkerCalls | None = None
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded: expected >= 1, got {max_loaded}")
        self.preset = loaded.preset
        self.name = loaded.preset.adapter.name
        self.max_loaded = max_loaded
        self.worker = worker or WorkerCalls()
        self.catalog: Callable[[], Mapping[str, Path]] | None = None  # version -> path (registry)
        self.fingerprint = base_fingerprint(loaded.preset.llm.checkpoint)
        self._model = loaded.model
        self._linears = linear_shapes(loaded.model.lm)  # before any LoRA injection
        self._lora = LoraHost(loaded.model.lm)
        self._lock = threading.RLock()
        self._loading: dict[str, Future[AdapterVersion]] = {}
        start = loaded.bundle
        lora_name = None
        if start.lora_dir is not None:
            check_lora(start.lora_dir, self._linears)
            lora_name = peft_adapter_name(start.ref)
            self._lora.add(lora_name, start.lora_dir)  # nothing runs yet: safe on this thread
        self.start = AdapterVersion(
            _without_tensors(start),
            loaded.model.connectors,
            lora_name,
            0.0,
            heads=loaded.heads,
            projectors=loaded.projectors,
        )
        self._versions: dict[str, AdapterVersion] = {start.version: self.start}
        self._current = self.start

    # -- reading ----------------------------------------------------------------------------

    @property
    def current(self) -> AdapterVersion:
        """The version new unpinned requests get."""
        return self._current

    def loaded(self) -> list[AdapterVersion]:
        """Loaded versions in version order."""
        with self._lock:
            return [self._versions[v] for v in sorted(self._versions, key=_order)]

    def refs(self) -> tuple[str, ...]:
        """ "name@version" of every loaded version, in version order."""
        return tuple(v.ref for v in self.loaded())

    def get(self, version: str) -> AdapterVersion | None:
        """A loaded version, or None."""
        with self._lock:
            return self._versions.get(version)

    def resolve(self, ref: str) -> AdapterVersion:
        """The loaded version a request's adapter field selects ("" or the name = current).

        Raises:
            NotFoundError: No loaded version matches; the message lists the loaded ones.
        """
        with self._lock:
            if ref in ("", self.name):
                return self._current
            name, sep, version = ref.partition("@")
            if sep and name == self.name and version in self._versions:
                return self._versions[version]
        raise NotFoundError(f"adapter {ref!r} is not loaded; loaded: {list(self.refs())}", param="adapter")

    # -- requests ---------------------------------------------------------------------------

    def acquire(self, ref: str) -> AdapterVersion:
        """`resolve` and hold the version until `release` (it will not be evicted meanwhile)."""
        with self._lock:
            version = self.resolve(ref)
            version.users += 1
            version.last_used = time.monotonic()
            return version

    def release(self, version: AdapterVersion) -> None:
        """A request is done with `version`."""
        with self._lock:
            version.users -= 1
            version.last_used = time.monotonic()
            victims = self._pick_victims()
        self._evict(victims)

    def acquire_or_load(self, ref: str) -> AdapterVersion:
        """`acquire`, loading a pinned version the registry knows first (blocking).

        Raises:
            NotFoundError: Neither loaded nor known; lists the loaded and the known versions.
            FailedPreconditionError: The pinned version's bundle is refused.
        """
        try:
            return self.acquire(ref)
        except NotFoundError as e:
            name, sep, version = ref.partition("@")
            if not sep or name != self.name or self.catalog is None:
                raise
            try:
                known = dict(self.catalog())
            except Exception as lookup_error:
                raise NotFoundError(f"{e.message}; the registry is unavailable ({lookup_error})") from None
            if version not in known:
                raise NotFoundError(
                    f"{e.message}; known versions: {sorted(known, key=_order)}", param="adapter"
                ) from None
        logger.info("loading pinned adapter %s on demand", ref)
        return self.load(known[version], expect_version=version, hold=True)

    def select(self, version: AdapterVersion) -> nn.ModuleDict:
        """Worker thread: put `version`'s LoRA (or none) on the LM; returns its connectors."""
        self._lora.select(version.lora_name)
        return version.connectors

    def run_pending(self) -> bool:
        """Worker thread: apply queued model mutations; True if any ran (re-`select` then)."""
        return self.worker.run_pending()

    # -- loading and the pointer ------------------------------------------------------------

    def set_current(self, version: str) -> AdapterVersion:
        """Point new requests at a loaded version.

        Raises:
            NotFoundError: It is not loaded.
        """
        with self._lock:
            target = self._versions.get(version)
            if target is None:
                raise NotFoundError(
                    f"adapter {self.name}@{version} is not loaded; loaded: {list(self.refs())}"
                )
            self._make_current(target)
            return target

    def load(
        self, path: Path, *, make_current: bool = False, expect_version: str | None = None, hold: bool = False
    ) -> AdapterVersion:
        """Load, verify and add the bundle at `path`; blocking: call it from a background thread.

        Args:
            path: The bundle folder.
            make_current: Move the pointer to it once it is ready.
            expect_version: Refuse the bundle unless its manifest says this version.
            hold: Return it acquired (the caller must `release` it).

        Raises:
            NotFoundError: No bundle at `path`.
            FailedPreconditionError: The bundle is damaged, for another base model or adapter,
                or does not fit the model (connectors, LoRA). Nothing changed.
        """
        manifest = read_manifest(path)
        version = manifest["version"]
        if manifest["name"] != self.name:
            raise FailedPreconditionError(
                f"adapter bundle {path}: named {manifest['name']!r}, serving {self.name!r}"
            )
        if expect_version is not None and version != expect_version:
            raise FailedPreconditionError(
                f"adapter bundle {path}: holds version {version!r}, expected {expect_version!r}"
            )
        with self._lock:
            future = self._loading.get(version)
            owner = future is None and version not in self._versions
            if owner:
                future = self._loading[version] = Future()
        if future is not None and not owner:
            future.result()  # someone else is loading it; wait, then take it below
        if owner:
            assert future is not None
            try:
                built = self._build(path)
            except BaseException as e:
                with self._lock:
                    self._loading.pop(version, None)
                future.set_exception(e)
                raise
        with self._lock:
            if owner:
                self._versions[version] = built
                self._loading.pop(version, None)
                future.set_result(built)  # type: ignore[union-attr]
            target = self._versions.get(version)
            victims: list[AdapterVersion] = []
            if target is not None:
                if hold:
                    target.users += 1
                target.last_used = time.monotonic()
                if make_current:
                    self._make_current(target, fresh=owner)
                victims = self._pick_victims(keep=target)
        if target is None:  # evicted between its load and now (rare): load it again
            return self.load(path, make_current=make_current, expect_version=expect_version, hold=hold)
        self._evict(victims)
        return target

    def _build(self, path: Path) -> AdapterVersion:
        start = time.perf_counter()
        bundle = load_bundle(path, expected_fingerprint=self.fingerprint)
        lm, dtype = self._model.lm, DTYPES[self.preset.llm.dtype]
        connectors = load_connectors(
            self.preset, bundle.connectors, llm_dim=lm.config.hidden_size, dtype=dtype
        )
        modules = nn.ModuleDict(connectors).to(self._model.device)
        heads = load_heads(self.preset, bundle.heads, llm_dim=lm.config.hidden_size, dtype=dtype)
        if heads is not None:
            heads = heads.to(self._model.device)
        projectors = {
            m: p.to(self._model.device)
            for m, p in load_projectors(
                self.preset, bundle.heads, llm_dim=lm.config.hidden_size, dtype=dtype
            ).items()
        }
        lora_name = None
        lora_dir = bundle.lora_dir
        if lora_dir is not None:
            check_lora(lora_dir, self._linears)
            lora_name = peft_adapter_name(bundle.ref)
            name = lora_name
            self.worker.call(lambda: self._lora.add(name, lora_dir))
        seconds = time.perf_counter() - start
        logger.info(
            "loaded adapter %s from %s in %.2fs%s", bundle.ref, path, seconds, " (LoRA)" if lora_name else ""
        )
        return AdapterVersion(
            _without_tensors(bundle), modules, lora_name, seconds, heads=heads, projectors=projectors
        )

    def _make_current(self, target: AdapterVersion, *, fresh: bool = False) -> None:
        if target is self._current:
            return
        self._current = target
        how = f"loaded in {target.load_seconds:.2f}s" if fresh else "already loaded"
        logger.info("adapter %s is now current (%s)", target.ref, how)

    def _pick_victims(self, keep: AdapterVersion | None = None) -> list[AdapterVersion]:
        """Under the lock: remove the least recently used evictable versions over the limit.

        Never the current one, one in use, nor `keep` (the version just loaded).
        """
        candidates = sorted(
            (v for v in self._versions.values() if v not in (self._current, keep) and v.users <= 0),
            key=lambda v: v.last_used,
        )
        victims: list[AdapterVersion] = []
        while len(self._versions) > self.max_loaded and candidates:
            victim = candidates.pop(0)
            del self._versions[victim.version]
            victims.append(victim)
        return victims

    def _evict(self, victims: list[AdapterVersion]) -> None:
        for victim in victims:
            logger.info("evicted adapter %s (keeping at most %s loaded)", victim.ref, self.max_loaded)
            if victim.lora_name is not None:
                remove = functools.partial(self._lora.remove, victim.lora_name)
                self.worker.post(remove, f"removing the LoRA of {victim.ref}")


def _without_tensors(bundle: Bundle) -> Bundle:
    """The bundle's metadata only: its tensors now live in modules."""
    return dataclasses.replace(bundle, connectors={}, heads={})
