"""`modalmesh eval`: run a benchmark against a running stack through /v1/chat/completions.

    modalmesh eval BENCHMARK --data PATH --model NAME[@VERSION] [--gateway URL] [--api-key KEY]
                   [--out DIR] [--concurrency N] [--limit N] [--media-root DIR] [--seed S]
                   [--temperature T] [--max-bad-ratio R]

Writes <out>/predictions.jsonl (resumed when present) and <out>/metrics.json, prints a summary
table; the logic is services.eval.runner. Exit 0 for a finished run, 1 when bad samples exceed
--max-bad-ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.eval.benchmarks import BENCHMARKS
from services.eval.runner import DEFAULT_MAX_BAD_RATIO, RunConfig, run_eval, summary_table


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `eval` subcommand to the `modalmesh` parser."""
    p = sub.add_parser("eval", help="run a benchmark against a running stack through its chat API")
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the benchmark's data file (shapes: heldout.json or its folder)",
    )
    p.add_argument("--model", required=True, help="model or pinned adapter version: tiny, tiny@3")
    p.add_argument(
        "--gateway",
        default=os.environ.get("MODALMESH_GATEWAY_URL", "http://127.0.0.1:8000"),
        help="gateway base URL (MODALMESH_GATEWAY_URL, default http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MODALMESH_API_KEY"),
        help="sent as a Bearer token (MODALMESH_API_KEY)",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default eval-<benchmark>-<model>)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument(
        "--media-root",
        type=Path,
        default=None,
        help="media paths resolve here (default: the data file's folder)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="base seed; sample i is asked with seed + i (default 0)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="default 0")
    p.add_argument(
        "--max-bad-ratio",
        type=float,
        default=DEFAULT_MAX_BAD_RATIO,
        help=f"stop (exit 1) when more than this share of samples is bad (default {DEFAULT_MAX_BAD_RATIO})",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or (args.limit is not None and args.limit < 0):
        raise SystemExit("modalmesh eval: --concurrency must be >= 1 and --limit >= 0")
    out = args.out or Path(f"eval-{args.benchmark}-{args.model.replace('@', '-')}")
    config = RunConfig(
        benchmark=args.benchmark,
        data=args.data,
        model=args.model,
        out=out,
        gateway=args.gateway,
        api_key=args.api_key,
        concurrency=args.concurrency,
        limit=args.limit,
        media_root=args.media_root,
        seed=args.seed,
        temperature=args.temperature,
        max_bad_ratio=args.max_bad_ratio,
    )
    result = run_eval(config, progress=sys.stderr)
    sys.stdout.write(summary_table(result.metrics, out) + "\n")
    return result.exit_code
