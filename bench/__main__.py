"""`python -m bench [--out FILE.json] [--quick] [--only NAME,...]`: every benchmark in one run.

Starts what the selected benchmarks need on free loopback ports (a private Redis, the
modalmesh encoder and LLM services and gateway, the seed-style baseline server), runs them one
after another, prints a table and writes a JSON report: each figure with its baseline
(measured in this run), the ratio value / baseline and the gain (how many times better).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench._config import BenchConfig
from bench._report import Figure, table, write_json
from bench._stack import Stack, running
from services.common.procenv import service_env


@dataclass(frozen=True)
class _Bench:
    run: Callable[[Stack, BenchConfig], list[Figure]]
    modalmesh: bool = False
    encoders: bool = False
    baseline: bool = False


def _benches() -> dict[str, _Bench]:
    from bench import ceiling, chat, decoder, encoder, transport

    return {
        "throughput": _Bench(chat.throughput, modalmesh=True, baseline=True),
        "ttft": _Bench(chat.ttft_under_load, modalmesh=True, baseline=True),
        "encoder": _Bench(encoder.encoder_throughput, encoders=True),
        "cache": _Bench(chat.feature_cache, modalmesh=True),
        "transport": _Bench(lambda _stack, cfg: transport.transport(cfg)),
        "ceiling": _Bench(ceiling.ceiling),
        "decoder": _Bench(decoder.decoder_throughput),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = ",".join(_benches())
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--quick", action="store_true", help="fewer requests and shorter generations")
    p.add_argument("--only", help=f"comma-separated subset of: {names}")
    p.add_argument("--preset", default="tiny", help="preset name or YAML path (default tiny)")
    p.add_argument("--workdir", type=Path, help="cache and log folder (default: a new temporary one)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for every process started, modalmesh's and the baseline's alike "
        "(default 1: on a small CPU several torch processes with a thread per core each "
        "oversubscribe it; 0 leaves the environment as it is)",
    )
    return p.parse_args(argv)


def _with_service_env() -> None:
    """Re-run this process with the allocator settings modalmesh's services get
    (`services.common.procenv`), so the in-process benchmarks (transport) run as a service
    would; the processes it starts get them anyway."""
    if "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], service_env(os.environ))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    benches = _benches()
    selected = list(benches) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in selected if n not in benches]
    if unknown:
        sys.stderr.write(f"unknown benchmark(s) {unknown}; choose from {list(benches)}\n")
        return 2
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="modalmesh-bench-"))
    if args.threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    chosen = [benches[n] for n in selected]
    started = time.perf_counter()
    results: dict[str, list[Figure]] = {}
    with running(
        args.preset,
        root,
        modalmesh=any(b.modalmesh for b in chosen),
        encoders=any(b.encoders for b in chosen),
        baseline=any(b.baseline for b in chosen),
    ) as stack:
        for name in selected:
            t0 = time.perf_counter()
            sys.stdout.write(f"running {name} ...\n")
            sys.stdout.flush()
            results[name] = benches[name].run(stack, cfg)
            sys.stdout.write(f"  {name} done in {time.perf_counter() - t0:.1f} s\n")
    sys.stdout.write("\n" + table(results) + "\n")
    sys.stdout.write(
        "\nratio = value / baseline; gain = times better than the baseline (> 1 is better).\n"
        f"logs and models in {root}; total {time.perf_counter() - started:.0f} s\n"
    )
    if args.out:
        meta = {
            "preset": args.preset,
            "quick": args.quick,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "config": asdict(cfg),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "workdir": str(root),
            "seconds": time.perf_counter() - started,
        }
        write_json(args.out, results, meta)
        sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    _with_service_env()
    sys.exit(main())
