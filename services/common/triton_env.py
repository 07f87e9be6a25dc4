"""What every PyTriton-based service (encoders, decoders) needs before it starts Triton."""

from __future__ import annotations

import os
import sysconfig


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
