"""`modalmesh adapters`: the adapter registry from the command line.

    modalmesh adapters list [NAME]              versions with stage, created, job, path; * = current
    modalmesh adapters rollback NAME VERSION    move NAME's current pointer back (replicas swap)
    modalmesh adapters publish BUNDLE [--preset P] [--no-current]
                                                a bundle folder (imported, copied from elsewhere)
                                                -> the next version in the artifact store + registry

The registry is the Redis at --redis-url (MODALMESH_REDIS_URL, default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.adapter_registry import AdapterRegistry, retry_redis

if TYPE_CHECKING:
    from services.common.settings import Settings

REDIS_WAIT_S = 5.0


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    settings_of: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add the `adapters` subcommand to the `modalmesh` parser."""
    adapters = sub.add_parser(
        "adapters", help="list adapter versions, roll one back, or publish a bundle (registry in Redis)"
    )
    actions = adapters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="versions of every adapter, or of NAME")
    listing.add_argument("name", nargs="?")
    back = actions.add_parser("rollback", help="make VERSION of NAME current again")
    back.add_argument("name")
    back.add_argument("version")
    pub = actions.add_parser("publish", help="publish a bundle folder as the next version of its adapter")
    pub.add_argument("bundle", type=Path, help="the bundle folder (manifest.json, connectors, ...)")
    pub.add_argument(
        "--preset", default=None, help="preset whose LLM folder it must fit (default: its manifest's)"
    )
    pub.add_argument("--no-current", action="store_true", help="record it without making it current")
    pub.add_argument("--cache-dir", type=Path, default=None, help="MODALMESH_CACHE_DIR")
    pub.add_argument("--presets-dir", type=Path, default=None, help="MODALMESH_PRESETS_DIR")
    pub.add_argument("--artifact-dir", type=Path, default=None, help="MODALMESH_ARTIFACT_DIR")
    for p in (listing, back, pub):
        p.add_argument("--redis-url", default=None, help="registry Redis (MODALMESH_REDIS_URL)")
        p.set_defaults(func=lambda args: cmd_adapters(args, settings_of(args)))


def _registry(settings: Settings) -> AdapterRegistry:
    return AdapterRegistry.from_url(settings.redis_url, timeout_s=2.0)


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _created(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def list_versions(registry: AdapterRegistry, name: str | None) -> list[str]:
    """The lines `adapters list` prints."""
    names = [name] if name else registry.names()
    if not names:
        return ["no adapters recorded"]
    lines = []
    for adapter in names:
        versions = registry.versions(adapter)
        current = registry.current(adapter)
        lines.append(f"{adapter} (current: {current or '-'})")
        if not versions:
            lines.append("  no versions recorded")
            continue
        lines.append(f"  {'':1} {'VERSION':8} {'STAGE':8} {'CREATED':19} {'JOB':14} PATH")
        for version, info in versions.items():
            mark = "*" if version == current else ""
            created, job = _created(info.created), info.job_id or "-"
            lines.append(f"  {mark:1} {version:8} {info.stage or '-':8} {created:19} {job:14} {info.path}")
    return lines


def cmd_adapters(args: argparse.Namespace, settings: Settings) -> int:
    """Run `modalmesh adapters list|rollback`."""
    registry = _registry(settings)
    if args.action == "list":
        lines = retry_redis(
            lambda: list_versions(registry, args.name), what="reading", deadline_s=REDIS_WAIT_S
        )
        _say("\n".join(lines))
        return 0
    if args.action == "publish":
        return _publish(args, settings, registry)
    # services.trainer.publisher.rollback is this same pointer move; not imported to keep torch out.
    before = retry_redis(lambda: registry.current(args.name), what="reading", deadline_s=REDIS_WAIT_S)
    retry_redis(
        lambda: registry.set_current(args.name, args.version, announce=True),
        what=f"rolling {args.name} back to {args.version}",
        deadline_s=REDIS_WAIT_S,
    )
    _say(f"{args.name}: current is now {args.version} (was {before or '-'}); replicas swap to it")
    return 0


def _publish(args: argparse.Namespace, settings: Settings, registry: AdapterRegistry) -> int:
    """`adapters publish`: the bundle is checked (hashes, files, LoRA config) against the
    preset's LLM folder, copied to <artifact store>/<name>/<next version> and recorded; made
    current unless --no-current, so every LLM replica swaps to it."""
    from services.common.presets import load_preset
    from services.models.checkpoints.bundle import base_fingerprint, read_manifest
    from services.trainer.publisher import publish_bundle

    manifest = read_manifest(args.bundle)
    preset = load_preset(
        args.preset or str(manifest["preset"]), cache_dir=settings.cache_dir, presets_dir=settings.presets_dir
    )
    name = str(manifest["name"])
    if name != preset.adapter.name:
        _say(f"note: adapter {name!r} is not preset {preset.name}'s own ({preset.adapter.name!r})")
    out = publish_bundle(
        args.bundle,
        registry=registry,
        artifact_dir=args.artifact_dir or settings.artifact_root(),
        name=name,
        base_fingerprint=base_fingerprint(preset.llm.checkpoint),
        make_current=not args.no_current,
        redis_deadline_s=REDIS_WAIT_S,
    )
    state = "recorded, not current" if args.no_current else "current; replicas swap to it"
    _say(f"published {out.name}@{out.version} at {out.path} ({state})")
    return 0
