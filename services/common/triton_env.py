"""What the PyTriton-based services (encoders, decoders) share: the libpython path of Triton's
stub and the serve loop of their `__main__`."""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from services.common.errors import ModalmeshError
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
    from modalmesh.tiny import ensure_generated
    from services.common.presets import load_preset

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
