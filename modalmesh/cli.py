"""The `modalmesh` command.

    modalmesh up [--preset tiny] [ports, URLs...]   run the stack until Ctrl-C / SIGTERM
    modalmesh demo [--no-train]                     up, train stage 1 + 3 through the queue, score, down
    modalmesh presets list | show NAME | generate NAME
    modalmesh train submit JOB.yaml [--wait] | status ID | list | cancel ID
    modalmesh data synth OUT_DIR [--train N] [--heldout N] [--seed S]
    modalmesh adapters list [NAME] | rollback NAME VERSION | publish BUNDLE   the adapter registry in Redis
    modalmesh import SYSTEM PATH [--preset NAME] [--out DIR] [--version V]   a seed checkpoint -> bundle
    modalmesh embed-captions --preset P --modality M --captions FILE --out DIR   stage-2 caption embeddings
    modalmesh add-tokens SRC --preset P [--out DIR] [--rows-from PATH]   base LLM + the preset's new tokens
    modalmesh eval BENCHMARK --data PATH --model NAME[@VERSION] [--gateway URL] [--out DIR] ...   score a running stack

Every flag has a MODALMESH_* environment variable (see services.common.settings.Settings);
a flag wins over the variable.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from modalmesh import train_cli
from modalmesh.adapters_cli import add_parser as add_adapters_parser
from modalmesh.embed_cli import add_parser as add_embed_parser
from modalmesh.eval_cli import add_parser as add_eval_parser
from modalmesh.import_cli import add_parser as add_import_parser
from modalmesh.tokens_cli import add_parser as add_tokens_parser
from services.common.errors import ModalmeshError

# flag -> Settings field
_STACK_FLAGS: dict[str, tuple[str, type, str]] = {
    "--preset": ("preset", str, "preset name or YAML path (MODALMESH_PRESET, default tiny)"),
    "--presets-dir": ("presets_dir", Path, "extra folder searched for presets"),
    "--cache-dir": ("cache_dir", Path, "where generated models live (default ~/.cache/modalmesh)"),
    "--host": ("host", str, "bind address of every service (default 127.0.0.1)"),
    "--gateway-port": ("gateway_http_port", int, "gateway HTTP port (default 8000)"),
    "--grpc-port": ("gateway_grpc_port", int, "gateway gRPC Chat port (default 50051)"),
    "--llm-port": ("llm_port", int, "LLM service port (default 50052)"),
    "--llm-metrics-port": (
        "llm_metrics_port",
        int,
        "LLM service Prometheus /metrics port (default 8120; 0: off)",
    ),
    "--encoder-http-port": ("encoder_http_port", int, "encoder Triton HTTP port (default 8100)"),
    "--encoder-grpc-port": ("encoder_grpc_port", int, "encoder Triton gRPC port (default 8101)"),
    "--encoder-metrics-port": ("encoder_metrics_port", int, "encoder Triton metrics port (default 8102)"),
    "--decoder-http-port": ("decoder_http_port", int, "decoder Triton HTTP port (default 8110)"),
    "--decoder-grpc-port": ("decoder_grpc_port", int, "decoder Triton gRPC port (default 8111)"),
    "--decoder-metrics-port": ("decoder_metrics_port", int, "decoder Triton metrics port (default 8112)"),
    "--redis-url": (
        "redis_url",
        str,
        "Redis URL; if none answers, one is started on this URL's port (data kept in <cache-dir>/redis)",
    ),
    "--supervisor-port": (
        "supervisor_port",
        int,
        "port of modalmesh up's own /metrics (restart counters) and /status (default 8130; 0: off)",
    ),
    "--max-restarts": (
        "restart_max",
        int,
        "restarts of one service allowed within --restart-window before it is given up on (default 5)",
    ),
    "--restart-window": ("restart_window_s", float, "seconds --max-restarts counts in (default 300)"),
}


def _add_stack_flags(p: argparse.ArgumentParser) -> None:
    for flag, (_field, typ, help_text) in _STACK_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_text)
    p.add_argument(
        "--log-dir", type=Path, default=None, help="service logs (default <cache-dir>/logs/<time>)"
    )
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for every service")
    p.add_argument(
        "--exit-on-failure",
        action="store_true",
        help="stop the whole stack (exit 1) when a service exits, instead of restarting it",
    )


def _settings(args: argparse.Namespace) -> Any:
    from services.common.settings import Settings

    overrides = {
        field: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, (field, _t, _h) in _STACK_FLAGS.items()
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None
    }
    return Settings(**overrides)


def _log_dir(args: argparse.Namespace, settings: Any) -> Path:
    if args.log_dir is not None:
        return Path(args.log_dir)
    return Path(settings.cache_dir) / "logs" / time.strftime("%Y%m%d-%H%M%S")


def _raise_interrupt(_signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    from modalmesh.stack import Stack, run_until_signal

    settings = _settings(args)
    stack = Stack(
        settings,
        log_dir=_log_dir(args, settings),
        out=lambda line: print(line, flush=True),
        exit_on_failure=args.exit_on_failure,
    )
    t0 = time.perf_counter()
    print(f"starting modalmesh (preset {settings.preset}); logs in {stack.log_dir}", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM during start-up stops what started
    try:
        stack.start(timeout_s=args.start_timeout)
    except KeyboardInterrupt:
        print("interrupted during start-up; stopped", file=sys.stderr)
        return 130
    print(f"modalmesh is up in {time.perf_counter() - t0:.1f}s (preset {settings.preset})", flush=True)
    print(stack.describe(), flush=True)
    print("Press Ctrl-C to stop.", flush=True)
    return run_until_signal(stack)


def cmd_demo(args: argparse.Namespace) -> int:
    from modalmesh.demo import run_demo

    return run_demo(
        _settings(args),
        log_dir=_log_dir(args, _settings(args)),
        start_timeout=args.start_timeout,
        train=not args.no_train,
    )


def cmd_presets(args: argparse.Namespace) -> int:
    from services.common.presets import load_preset, shipped_presets

    settings = _settings(args)
    if args.action == "list":
        for name in shipped_presets():
            preset = load_preset(name, cache_dir=settings.cache_dir)
            print(f"{name:12s} {preset.description}")
        return 0
    if not args.name:
        raise SystemExit(f"modalmesh presets {args.action}: a preset name is required")
    preset = load_preset(args.name, cache_dir=settings.cache_dir, presets_dir=settings.presets_dir)
    if args.action == "show":
        print(preset.model_dump_json(indent=2))
        return 0
    from services.models.tiny import generate

    wrote = generate(preset, force=args.force)
    print(f"{'generated' if wrote else 'already present'}: {preset.llm.checkpoint.parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modalmesh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the stack on loopback until Ctrl-C")
    _add_stack_flags(up)
    up.set_defaults(func=cmd_up)
    demo = sub.add_parser("demo", help="start the stack, train it through the queue, score it, stop it")
    demo.add_argument("--no-train", action="store_true", help="only ask one question, skip training")
    _add_stack_flags(demo)
    demo.set_defaults(func=cmd_demo)
    presets = sub.add_parser("presets", help="list, show or generate presets")
    presets.add_argument("action", choices=["list", "show", "generate"])
    presets.add_argument("name", nargs="?")
    presets.add_argument("--force", action="store_true", help="regenerate even if present")
    _add_stack_flags(presets)
    presets.set_defaults(func=cmd_presets)
    train_cli.add_commands(sub)
    add_adapters_parser(sub, _settings)
    add_import_parser(sub)
    add_embed_parser(sub)
    add_tokens_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModalmeshError as e:
        print(f"modalmesh: {e.message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"modalmesh: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
