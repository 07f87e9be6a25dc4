"""What Triton's processes need from the PyTriton-based services (encoders, decoders): the
libpython path of Triton's Python-backend stub and Triton's server settings. The service shell
itself (command line, serve loop, server base, model binding) is `services.common.triton_service`."""

from __future__ import annotations

import os
import sysconfig
from typing import Any

from services.common.log import REQUEST_ID_HEADER
from services.common.settings import Settings


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
