"""What the PyTriton-based services (encoders, decoders) share: the libpython path of Triton's
stub and the serve loop of their `__main__`."""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from services.common.errors import ModalmeshError
from services.common.log import REQUEST_ID_HEADER
from services.common.settings import Settings

if TYPE_CHECKING:
    from services.common.presets import Preset


def ensure_libpython_on_path() -> None:
    """Put this interpreter's libpython folder first on LD_LIBRARY_PATH for Triton's children.

    PyTriton's Python-backend stub links libpython dynamically; without this it may load the
    system's libpython of another patch release and fail at model load (pytriton #51). The
    tritonserver process gets a copy of os.environ when it starts, so setting it here suffices.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir not in current.split(os.pathsep):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, current) if p)


class TritonService(Protocol):
    """A PyTriton server wrapper: the encoder or the decoder service."""

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    def stop(self) -> None: ...


def serve_triton(
    settings: Settings, what: str, build: Callable[[Preset], TritonService], logger: logging.Logger
) -> int:
    """Load the preset, build the service, start Triton and serve until SIGTERM/SIGINT.

    Args:
        settings: The preset and where its checkpoints are.
        what: "encoders" or "decoders", for the log lines.
        build: Loads the models of the preset (once) and wraps them in a server, not started.
        logger: The service's logger.

    Returns:
        The exit code: 0 after a stop signal, 1 when Triton fails to start or dies on its own,
        2 when the preset or its checkpoints cannot be loaded.
    """
    from services.common.presets import load_preset
    from services.models.tiny import ensure_generated

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        preset = load_preset(settings.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
        ensure_generated(preset)
        server = build(preset)
    except ModalmeshError as e:
        logger.error("cannot load the %s: %s", what, e.message)
        return 2
    ensure_libpython_on_path()
    try:
        if stop.is_set():
            return 0
        try:
            server.start()
        except Exception:
            logger.exception("Triton failed to start")
            return 1
        while not stop.wait(1.0):
            if not server.is_alive():
                logger.error("Triton stopped on its own; exiting")
                return 1
        return 0
    finally:
        server.stop()


def triton_config(settings: Settings, *, http_port: int, grpc_port: int, metrics_port: int) -> Any:
    """Triton's server settings: the service's addresses and ports, request-id forwarding.

    Triton's own gRPC server already accepts messages up to 2 GiB (INT32_MAX); TritonConfig has
    no message-size option to raise.
    """
    from pytriton.triton import TritonConfig

    forward = f"^{REQUEST_ID_HEADER}$"
    return TritonConfig(
        http_address=settings.host,
        http_port=http_port,
        grpc_address=settings.host,
        grpc_port=grpc_port,
        metrics_address=settings.host,
        metrics_port=metrics_port,
        grpc_header_forward_pattern=forward,
        http_header_forward_pattern=forward,
        exit_timeout_secs=max(1, int(settings.drain_seconds)),
    )


class TritonServer:
    """Triton serving a set of loaded models: warm up -> start -> serve -> stop.

    Subclasses say which models (`model_names`), how to warm them up and bind them, and what
    to release after Triton stops.

    Args:
        settings: Addresses and the drain time.
        ports: (http, grpc, metrics).
        logger: The service's logger.
    """

    def __init__(self, settings: Settings, ports: tuple[int, int, int], logger: logging.Logger) -> None:
        self.settings = settings
        self.ports = ports
        self.logger = logger
        self._triton: Any = None
        self._lock = threading.Lock()

    def model_names(self) -> list[str]:
        raise NotImplementedError

    def warmup(self) -> None:
        """Run every model once before Triton accepts requests."""

    def bind(self, triton: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the models hold once Triton has stopped."""

    def start(self) -> None:
        """Warm every model up, then start Triton (it accepts requests only after this)."""
        from pytriton.triton import Triton

        self.warmup()
        started = time.perf_counter()
        http, grpc, metrics = self.ports
        triton = Triton(
            config=triton_config(self.settings, http_port=http, grpc_port=grpc, metrics_port=metrics)
        )
        self.bind(triton)
        with self._lock:
            self._triton = triton
        triton.run()
        self.logger.info(
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
        """Stop Triton (in-flight requests finish, child processes exit), then `close`."""
        with self._lock:
            triton, self._triton = self._triton, None
        if triton is not None:
            self.logger.info("stopping Triton")
            triton.stop()
        self.close()
        self.logger.info("stopped")
