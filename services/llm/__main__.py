"""Command line: `python -m services.llm [--preset NAME] [--host H] [--port N]`.

Flags override the MODALMESH_* settings (MODALMESH_PRESET, MODALMESH_HOST,
MODALMESH_LLM_PORT). Exits 0 after a graceful drain on SIGTERM/SIGINT, 2 when the preset
or its checkpoints cannot be loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from services.common.errors import ModalmeshError
from services.common.log import setup_logging
from services.common.presets import load_preset
from services.common.settings import Settings

logger = logging.getLogger("services.llm")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset flags stay None and leave the settings alone."""
    parser = argparse.ArgumentParser(prog="python -m services.llm", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="preset name or YAML path (default: $MODALMESH_PRESET or tiny)")
    parser.add_argument("--host", help="address to bind (default: $MODALMESH_HOST or 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help="port to bind, 0 = any free one (default: $MODALMESH_LLM_PORT or 50052)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the LLM service; returns the process exit code."""
    args = parse_args(argv)
    overrides = {"preset": args.preset, "host": args.host, "llm_port": args.port}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    setup_logging("llm", level=settings.log_level, json_lines=settings.log_json)
    from transformers.utils import logging as hf_logging

    from services.llm.server import serve
    from services.models.tiny import ensure_generated

    hf_logging.disable_progress_bar()
    try:
        preset = load_preset(settings.preset, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
        ensure_generated(preset)
        asyncio.run(serve(preset, settings, host=settings.host, port=settings.llm_port))
    except ModalmeshError as e:
        logger.error("cannot serve: %s", e.message)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
