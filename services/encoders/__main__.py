"""Run the encoder service: `python -m services.encoders [--preset NAME] [--host H] [ports]`.

Flags override `Settings()` (MODALMESH_* environment variables). The service loads the preset
(generating the tiny checkpoints on first use), loads and warms up every modality's encoder,
starts Triton through PyTriton on the HTTP/gRPC/metrics ports, serves until SIGTERM or SIGINT,
then stops Triton and its child processes and exits 0. It exits 1 if Triton fails to start or
dies on its own, and 2 if the preset or checkpoints cannot be loaded.

The service's own log lines (JSON unless MODALMESH_LOG_JSON=false) go to stderr; Triton's
server log (plain text, from the tritonserver child) goes to stdout. The command line and the
serve loop are `services.common.triton_service`'s, shared with the decoder service.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from services.common.triton_service import PortFields, TritonService, settings_from

if TYPE_CHECKING:
    from services.common.presets import Preset
    from services.common.settings import Settings
    from services.encoders.triton import EncoderServer

__all__ = ["SERVICE", "main", "parse_args", "serve", "settings_from"]


def build(preset: Preset, settings: Settings) -> EncoderServer:
    """Load every modality's encoder of the preset (generating a tiny preset's models on first
    use) and wrap them in a server (not started)."""
    from services.encoders.triton import EncoderServer, load_encoders
    from services.models.tiny import ensure_generated

    ensure_generated(preset)
    return EncoderServer(load_encoders(preset, settings), settings)


SERVICE = TritonService(
    "encoders", ports=PortFields.named("encoder"), build=build, description=__doc__, quiet=("transformers",)
)
parse_args = SERVICE.parse_args
serve = SERVICE.serve
main = SERVICE.main

if __name__ == "__main__":
    sys.exit(main())
