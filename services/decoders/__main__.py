"""Run the decoder service: `python -m services.decoders [--preset NAME] [--host H] [ports]`.

It loads every output modality's decoder of the preset once (on CUDA when there is one, else
the CPU; a tiny preset's pipelines are generated on first use), warms each one up and serves
them with Triton through PyTriton, one model per output modality. A preset without `outputs`
has no decoder to serve: the service exits 2.

The command line, the serve loop, the exit codes and the logs are the Triton service shell's
(`services.common.triton_service`, shared with the encoder service); the server is
`services.decoders.server.build_server`'s.
"""

from __future__ import annotations

import sys

from services.common.triton_service import PortFields, TritonService, settings_from

__all__ = ["SERVICE", "main", "parse_args", "serve", "settings_from"]

QUIET = ("transformers", "diffusers")  # their progress bars
SERVICE = TritonService(
    "decoders", PortFields.named("decoder"), "services.decoders.server:build_server", __doc__, QUIET
)
parse_args, serve, main = SERVICE.parse_args, SERVICE.serve, SERVICE.main

if __name__ == "__main__":
    sys.exit(main())
