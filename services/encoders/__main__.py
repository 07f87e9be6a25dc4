"""Run the encoder service: `python -m services.encoders [--preset NAME] [--host H] [ports]`.

Flags override `Settings()` (MODALMESH_* environment variables). The service loads the preset
(generating the tiny checkpoints on first use), loads and warms up every modality's encoder,
starts Triton through PyTriton on the HTTP/gRPC/metrics ports, serves until SIGTERM or SIGINT,
then stops Triton and its child processes and exits 0. It exits 1 if Triton fails to start or
dies on its own, and 2 if the preset or checkpoints cannot be loaded.

The service's own log lines (JSON unless MODALMESH_LOG_JSON=false) go to stderr; Triton's
server log (plain text, from the tritonserver child) goes to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from services.common.log import setup_logging
from services.common.settings import Settings
from services.common.triton_env import serve_triton

logger = logging.getLogger("services.encoders")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every flag defaults to the MODALMESH_* setting."""
    parser = argparse.ArgumentParser(prog="python -m services.encoders", description=__doc__)
    parser.add_argument("--preset", metavar="NAME", help="preset name or YAML path (MODALMESH_PRESET)")
    parser.add_argument("--host", metavar="H", help="bind address (MODALMESH_HOST)")
    parser.add_argument(
        "--http-port",
        type=int,
        dest="encoder_http_port",
        metavar="N",
        help="Triton HTTP port (MODALMESH_ENCODER_HTTP_PORT)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        dest="encoder_grpc_port",
        metavar="N",
        help="Triton gRPC port (MODALMESH_ENCODER_GRPC_PORT)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        dest="encoder_metrics_port",
        metavar="N",
        help="Triton metrics port (MODALMESH_ENCODER_METRICS_PORT)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def serve(settings: Settings) -> int:
    """Load, start, serve until a stop signal, stop; returns the exit code."""
    from services.encoders.triton import EncoderServer, load_encoders

    return serve_triton(
        settings, "encoders", lambda p: EncoderServer(load_encoders(p, settings), settings), logger
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m services.encoders`."""
    args = parse_args(argv)
    settings = settings_from(args)
    setup_logging("encoders", level=settings.log_level, json_lines=settings.log_json)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logger.info(
        "starting encoders: preset %s, host %s, ports http %d grpc %d metrics %d",
        settings.preset,
        settings.host,
        settings.encoder_http_port,
        settings.encoder_grpc_port,
        settings.encoder_metrics_port,
    )
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
