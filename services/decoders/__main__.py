"""Run the decoder service: `python -m services.decoders [--preset NAME] [--host H] [ports]`.

Flags override `Settings()` (MODALMESH_* environment variables). The service loads the preset
(generating the tiny checkpoints on first use), loads every output modality's decoder once
(on CUDA when there is one, else the CPU), warms each one up, starts Triton through PyTriton on
the HTTP/gRPC/metrics ports, serves until SIGTERM or SIGINT, then stops Triton and its child
processes and exits 0. It exits 1 if Triton fails to start or dies on its own, and 2 if the
preset or decoders cannot be loaded (also when the preset has no `outputs`).

The service's own log lines (JSON unless MODALMESH_LOG_JSON=false) go to stderr; Triton's
server log (plain text, from the tritonserver child) goes to stdout. The command line and the
serve loop are `services.common.triton_service`'s, shared with the encoder service.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from services.common.triton_service import PortFields, TritonService, settings_from

if TYPE_CHECKING:
    from services.common.presets import Preset
    from services.common.settings import Settings
    from services.decoders.server import DecoderServer

__all__ = ["SERVICE", "main", "parse_args", "serve", "settings_from"]


def build(preset: Preset, settings: Settings) -> DecoderServer:
    """Load every output modality's decoder of the preset (generating a tiny preset's models on
    first use) and wrap them in a server (not started)."""
    from services.decoders.server import DecoderServer, load_decoders
    from services.models.tiny import ensure_generated

    ensure_generated(preset)
    return DecoderServer(load_decoders(preset), settings)


SERVICE = TritonService(
    "decoders",
    ports=PortFields.named("decoder"),
    build=build,
    description=__doc__,
    quiet=("transformers", "diffusers"),
)
parse_args = SERVICE.parse_args
serve = SERVICE.serve
main = SERVICE.main

if __name__ == "__main__":
    sys.exit(main())
