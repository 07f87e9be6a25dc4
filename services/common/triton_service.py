"""One Triton service, written once for the encoders and the decoders: the command line, the
serve loop, the server (warm up -> bind -> run -> watch -> stop) and the binding of a batched
PyTriton model over its raw list of requests.

A service supplies only what is its own: how to load its models from a preset (`build`), and
per model how to warm it up, which tensors it takes and gives, and its inference callable.
`services/encoders/__main__.py` and `services/decoders/__main__.py` are each one
`TritonService(...)` record; `EncoderServer` and `DecoderServer` subclass `TritonServer`.

Lifecycle (`serve_triton`): load the preset, build the server (the service's `build` generates
a tiny preset's checkpoints on first use: `services.models` is the services' to import, not
`services.common`'s), warm every model up, start Triton, serve until SIGTERM/SIGINT or until Triton
dies, stop Triton (in-flight requests finish, child processes exit) and release the models.
Exit codes: 0 after a stop signal, 1 when Triton fails to start or dies on its own, 2 when the
preset or its models cannot be loaded.

Nothing here imports torch or PyTriton at import time; `pytriton` is imported when Triton
starts or a model is bound.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from services.common.errors import ModalmeshError
from services.common.log import REQUEST_ID_HEADER, bound_request_id, setup_logging
from services.common.procenv import StopSignals
from services.common.settings import Settings
from services.common.triton_env import ensure_libpython_on_path, triton_config

if TYPE_CHECKING:
    from services.common.presets import Preset

# PyTriton's raw interface: the batch's requests in, one dict of output arrays per request out.
InferFn = Callable[[list[Any]], list[dict[str, np.ndarray]]]
Outcome = TypeVar("Outcome")


# -- models -------------------------------------------------------------------------------------
class BoundModel(Protocol):
    """A loaded model and the Triton model name it is served under."""

    @property
    def model_name(self) -> str: ...


BoundT = TypeVar("BoundT", bound=BoundModel)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model, per item (the batch dimension is implied)."""

    name: str
    dtype: Any  # numpy dtype or `bytes` (Triton BYTES)
    shape: tuple[int, ...]


def bind_batched(
    triton: Any,
    *,
    model_name: str,
    infer_func: InferFn,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    batch_delay_us: int,
) -> None:
    """Bind one model to a (not yet running) `pytriton.triton.Triton` with the dynamic batcher."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    triton.bind(
        model_name=model_name,
        infer_func=infer_func,
        inputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in inputs],
        outputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape) for t in outputs],
        config=ModelConfig(
            max_batch_size=max_batch_size,
            batcher=DynamicBatcher(max_queue_delay_microseconds=batch_delay_us),
        ),
        strict=True,
    )


def request_id(request: Any) -> str | None:
    """The `x-request-id` header Triton forwarded into a request's parameters, if any."""
    params = getattr(request, "parameters", None) or {}
    value = params.get(REQUEST_ID_HEADER)
    return str(value) if value else None


def respond_per_request(
    requests: Sequence[Any],
    sizes: Sequence[int],
    outcomes: Sequence[Outcome],
    respond: Callable[[Sequence[Outcome]], dict[str, np.ndarray]],
    log: Callable[[int], None],
) -> list[dict[str, np.ndarray]]:
    """Split a batch's per-item outcomes back into one response per request.

    `outcomes` holds every request's items in order (`sizes[k]` of them for request k, all
    computed in one pass); `respond` makes one request's outputs of its slice, and `log` is
    called with its item count, both with that request's id bound to the log lines.
    """
    responses: list[dict[str, np.ndarray]] = []
    offset = 0
    for request, n in zip(requests, sizes, strict=True):
        with bound_request_id(request_id(request)):
            responses.append(respond(outcomes[offset : offset + n]))
            log(n)
        offset += n
    return responses


# -- server -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PortFields:
    """The `Settings` fields that hold a Triton service's HTTP, gRPC and metrics ports."""

    http: str
    grpc: str
    metrics: str

    @classmethod
    def named(cls, prefix: str) -> PortFields:
        """`{prefix}_http_port`, `{prefix}_grpc_port`, `{prefix}_metrics_port` (checked)."""
        fields = cls(f"{prefix}_http_port", f"{prefix}_grpc_port", f"{prefix}_metrics_port")
        unknown = [f for f in fields.all() if f not in Settings.model_fields]
        if unknown:
            raise ValueError(f"Settings has no {', '.join(unknown)}")
        return fields

    def all(self) -> tuple[str, str, str]:
        return (self.http, self.grpc, self.metrics)

    def of(self, settings: Settings) -> tuple[int, int, int]:
        """(http, grpc, metrics) in `settings`."""
        http, grpc, metrics = (int(getattr(settings, f)) for f in self.all())
        return http, grpc, metrics


class TritonServer(Generic[BoundT]):
    """Triton serving a set of loaded models: warm up -> start -> serve -> stop.

    Subclasses name their ports (`port_fields`) and logger (`log`) and say per model how to
    warm it up, bind it and release it once Triton has stopped.

    Args:
        bound: The loaded models, each with its Triton model name.
        settings: Addresses, ports and the drain time.
    """

    port_fields: ClassVar[PortFields]
    log: ClassVar[logging.Logger]

    def __init__(self, bound: Sequence[BoundT], settings: Settings) -> None:
        self.bound = list(bound)
        self.settings = settings
        self.ports = self.port_fields.of(settings)
        self._triton: Any = None
        self._lock = threading.Lock()

    @property
    def models(self) -> Mapping[str, BoundT]:
        """The served Triton model names and their models."""
        return {b.model_name: b for b in self.bound}

    def model_names(self) -> list[str]:
        return list(self.models)

    def warmup_model(self, bound: BoundT) -> None:
        """Run one model once before Triton accepts requests; raises if it fails."""

    def bind_model(self, triton: Any, bound: BoundT) -> None:
        raise NotImplementedError

    def close_model(self, bound: BoundT) -> None:
        """Release what one model holds once Triton has stopped."""

    def start(self) -> None:
        """Warm every model up, then start Triton (it accepts requests only after this)."""
        from pytriton.triton import Triton

        for bound in self.bound:
            self.warmup_model(bound)
        started = time.perf_counter()
        http, grpc, metrics = self.ports
        triton = Triton(
            config=triton_config(self.settings, http_port=http, grpc_port=grpc, metrics_port=metrics)
        )
        for bound in self.bound:
            self.bind_model(triton, bound)
        with self._lock:
            self._triton = triton
        triton.run()
        self.log.info(
            "Triton serving %s on %s (http %d, grpc %d, metrics %d) after %.1fs",
            ", ".join(self.model_names()),
            self.settings.host,
            http,
            grpc,
            metrics,
            time.perf_counter() - started,
        )

    def is_alive(self) -> bool:
        """Whether Triton and every model's proxy are still running."""
        with self._lock:
            return self._triton is not None and bool(self._triton.is_alive())

    def stop(self) -> None:
        """Stop Triton (in-flight requests finish, child processes exit), then release the models."""
        with self._lock:
            triton, self._triton = self._triton, None
        if triton is not None:
            self.log.info("stopping Triton")
            triton.stop()
        for bound in self.bound:
            self.close_model(bound)
        self.log.info("stopped")


class Server(Protocol):
    """What `serve_triton` needs of a server: a `TritonServer` (or a stand-in in tests)."""

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    def stop(self) -> None: ...


def serve_triton(
    settings: Settings, what: str, build: Callable[[Preset], Server], logger: logging.Logger
) -> int:
    """Load the preset, build the server, start Triton and serve until SIGTERM/SIGINT.

    Args:
        settings: The preset and where its checkpoints are.
        what: "encoders" or "decoders", for the log lines.
        build: Loads the models of the preset (once, generating a tiny preset's on first use)
            and wraps them in a server, not started.
        logger: The service's logger.

    Returns:
        The exit code: 0 after a stop signal, 1 when Triton fails to start or dies on its own,
        2 when the preset or its checkpoints cannot be loaded.
    """
    from services.common.presets import load_preset

    with StopSignals(on_signal=lambda name: logger.info("received %s", name)) as signals:
        try:
            preset = load_preset(
                settings.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir
            )
            server = build(preset)
        except ModalmeshError as e:
            logger.error("cannot load the %s: %s", what, e.message)
            return 2
        ensure_libpython_on_path()
        try:
            if signals.event.is_set():
                return 0
            try:
                server.start()
            except Exception:
                logger.exception("Triton failed to start")
                return 1
            if not signals.watch(server.is_alive, poll_s=1.0):
                logger.error("Triton stopped on its own; exiting")
                return 1
            return 0
        finally:
            server.stop()


# -- the command line -----------------------------------------------------------------------------
def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


EPILOG = """\
Flags override Settings() (MODALMESH_* environment variables). The service serves until
SIGTERM or SIGINT, then stops Triton and its child processes and exits 0. It exits 1 if
Triton fails to start or dies on its own, and 2 if the preset or its models cannot be
loaded. Its own log lines (JSON unless MODALMESH_LOG_JSON=false) go to stderr; Triton's
server log (plain text, from the tritonserver child) goes to stdout."""


def load_entry_point(spec: str) -> Callable[..., Any]:
    """The function an entry point "package.module:function" names (imported now)."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class TritonService:
    """A Triton service's `__main__`: `python -m services.<name> [--preset] [--host] [ports]`.

    Attributes:
        name: "encoders" or "decoders": the module, the log lines' service name.
        ports: The settings fields its three port flags set.
        build: The entry point ("module:function") of `(preset, settings) -> server`: loads the
            preset's models (generating a tiny preset's on first use) and wraps them in a
            server, not started. Imported only once the service runs (it imports torch), so
            `--help` and the flags stay light.
        description: The `--help` text (the `__main__` module's docstring); `EPILOG` follows.
        quiet: Libraries whose progress bars are turned off (`<lib>.utils.logging`).
    """

    name: str
    ports: PortFields
    build: str
    description: str | None = None
    quiet: tuple[str, ...] = ("transformers",)

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"services.{self.name}")

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The command line; every flag defaults to the MODALMESH_* setting."""
        parser = argparse.ArgumentParser(
            prog=f"python -m services.{self.name}",
            description=self.description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("--preset", metavar="NAME", help="preset name or YAML path (MODALMESH_PRESET)")
        parser.add_argument("--host", metavar="H", help="bind address (MODALMESH_HOST)")
        for flag, dest, what in (
            ("--http-port", self.ports.http, "Triton HTTP port"),
            ("--grpc-port", self.ports.grpc, "Triton gRPC port"),
            ("--metrics-port", self.ports.metrics, "Triton metrics port"),
        ):
            parser.add_argument(
                flag, type=int, dest=dest, metavar="N", help=f"{what} (MODALMESH_{dest.upper()})"
            )
        return parser.parse_args(argv)

    def serve(self, settings: Settings) -> int:
        """Load, start, serve until a stop signal, stop; returns the exit code."""
        build = load_entry_point(self.build)
        return serve_triton(settings, self.name, lambda preset: build(preset, settings), self.logger)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Entry point of `python -m services.<name>`."""
        settings = settings_from(self.parse_args(argv))
        setup_logging(self.name, level=settings.log_level, json_lines=settings.log_json)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for library in self.quiet:
            importlib.import_module(f"{library}.utils.logging").disable_progress_bar()
        http, grpc, metrics = self.ports.of(settings)
        self.logger.info(
            "starting %s: preset %s, host %s, ports http %d grpc %d metrics %d",
            self.name,
            settings.preset,
            settings.host,
            http,
            grpc,
            metrics,
        )
        return self.serve(settings)
