"""Run the decoder service: `python -m services.decoders [--preset NAME] [--host H] [ports]`.

Flags override `Settings()` (MODALMESH_* environment variables). The service loads the preset
(generating the tiny checkpoints on first use), loads every output modality's decoder once
(on CUDA when there is one, else the CPU), warms each one up, starts Triton through PyTriton on
the HTTP/gRPC/metrics ports, serves until SIGTERM or SIGINT, then stops Triton and its child
processes and exits 0. It exits 1 if Triton fails to start or dies on its own, and 2 if the
preset or decoders cannot be loaded (also when the preset has no `outputs`).

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

logger = logging.getLogger("services.decoders")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; every flag defaults to the MODALMESH_* setting."""
    parser = argparse.ArgumentParser(prog="python -m services.decoders", description=__doc__)
    parser.add_argument("--preset", metavar="NAME", help="preset name or YAML path (MODALMESH_PRESET)")
    parser.add_argument("--host", metavar="H", help="bind address (MODALMESH_HOST)")
    for flag, dest, what in (
        ("--http-port", "decoder_http_port", "Triton HTTP port"),
        ("--grpc-port", "decoder_grpc_port", "Triton gRPC port"),
        ("--metrics-port", "decoder_metrics_port", "Triton metrics port"),
    ):
        parser.add_argument(flag, type=int, dest=dest, metavar="N", help=f"{what} (MODALMESH_{dest.upper()})")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    return Settings(**{k: v for k, v in vars(args).items() if v is not None})


def serve(settings: Settings) -> int:
    """Load, start, serve until a stop signal, stop; returns the exit code."""
    from services.decoders.server import DecoderServer, load_decoders

    return serve_triton(settings, "decoders", lambda p: DecoderServer(load_decoders(p), settings), logger)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m services.decoders`."""
    args = parse_args(argv)
    settings = settings_from(args)
    setup_logging("decoders", level=settings.log_level, json_lines=settings.log_json)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    logger.info(
        "starting decoders: preset %s, host %s, ports http %d grpc %d metrics %d",
        settings.preset,
        settings.host,
        settings.decoder_http_port,
        settings.decoder_grpc_port,
        settings.decoder_metrics_port,
    )
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
