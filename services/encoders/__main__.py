"""Run the encoder service: `python -m services.encoders [--preset NAME] [--host H] [ports]`.

It loads the preset's encoders, one per modality (modalities whose backbone is the same share
one loaded backbone; a tiny preset's checkpoints are generated on first use), warms each up and
serves them with Triton through PyTriton, one model per modality, on the HTTP, gRPC and metrics
ports.

The command line, the serve loop, the exit codes and the logs are the Triton service shell's
(`services.common.triton_service`, shared with the decoder service); the server is
`services.encoders.triton.build_server`'s.
"""

from __future__ import annotations

import sys

from services.common.triton_service import PortFields, TritonService, settings_from

__all__ = ["SERVICE", "main", "parse_args", "serve", "settings_from"]

SERVICE = TritonService(
    "encoders", PortFields.named("encoder"), "services.encoders.triton:build_server", __doc__
)
parse_args, serve, main = SERVICE.parse_args, SERVICE.serve, SERVICE.main

if __name__ == "__main__":
    sys.exit(main())
