"""Publishing adapter bundles to the artifact store and the registry, and rolling back.

`publish_bundle` takes a bundle folder the trainer exported (any version string in its
manifest), verifies it, allocates the next version in Redis, copies it to
`<artifact_dir>/<name>/<version>` (written aside in the same parent, fsynced, renamed into
place, so a reader never sees a partial folder), stamps the manifest's version, verifies the
copy, records it in the registry, moves the current pointer and announces it. Every LLM
replica subscribed to the events channel then loads, verifies and swaps to it.

Redis calls are retried for about 30 s while Redis cannot be reached (a restart of Redis
during a publish delays it rather than failing the job).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.common.adapter_registry import AdapterRegistry, VersionInfo, retry_redis
from services.common.errors import FailedPreconditionError
from services.models.checkpoints.bundle import load_bundle, stamp_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedVersion:
    """Where a published version lives."""

    name: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root` itself)."""
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(root)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_atomically(src: Path, dest: Path, *, version: str, job_id: str | None, fingerprint: str) -> None:
    """Copy `src` to `dest` through a hidden temporary folder beside it, stamped and verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        staged = tmp / "bundle"
        shutil.copytree(src, staged)
        stamp_manifest(staged, version=version, job_id=job_id)
        load_bundle(staged, expected_fingerprint=fingerprint)  # the copy, as it will be served
        _fsync_tree(staged)
        if dest.exists():
            raise FailedPreconditionError(f"publishing {dest}: the folder already exists")
        os.replace(staged, dest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_bundle(
    bundle_dir: Path,
    *,
    registry: AdapterRegistry,
    artifact_dir: Path,
    name: str,
    base_fingerprint: str,
    job_id: str | None = None,
    make_current: bool = True,
    redis_deadline_s: float = 30.0,
) -> PublishedVersion:
    """Publish an exported bundle as the next version of `name`.

    Args:
        bundle_dir: The bundle the trainer wrote (`write_bundle`); left untouched.
        registry: The adapter registry.
        artifact_dir: The artifact store; the version goes to `artifact_dir/name/<version>`.
        name: The adapter name; must match the bundle's manifest.
        base_fingerprint: The base LLM the bundle must have been trained on.
        job_id: The training job, recorded in the manifest and the registry.
        make_current: Move the current pointer to it (replicas swap); else only announce it.
        redis_deadline_s: How long to keep retrying while Redis is unreachable.

    Raises:
        NotFoundError: `bundle_dir` has no manifest.
        FailedPreconditionError: The bundle is damaged, built for another base model, or
            named otherwise.
        UnavailableError: Redis stayed unreachable for `redis_deadline_s`.
    """
    bundle = load_bundle(bundle_dir, expected_fingerprint=base_fingerprint)
    if bundle.name != name:
        raise FailedPreconditionError(
            f"adapter bundle {bundle_dir}: named {bundle.name!r}, publishing as {name!r}"
        )
    version = retry_redis(
        lambda: registry.allocate_version(name, artifact_dir),
        what=f"allocating a version of {name}",
        deadline_s=redis_deadline_s,
    )
    dest = artifact_dir / name / version
    _copy_atomically(bundle_dir, dest, version=version, job_id=job_id, fingerprint=base_fingerprint)
    info = VersionInfo(
        path=str(dest),
        stage=bundle.stage,
        preset=str(bundle.manifest["preset"]),
        base_fingerprint=base_fingerprint,
        job_id=job_id,
        created=bundle.created,
        metrics=dict(bundle.manifest.get("metrics") or {}),
    )
    retry_redis(
        lambda: registry.record(name, version, info, announce=True),
        what=f"recording {name}@{version}",
        deadline_s=redis_deadline_s,
    )
    if make_current:
        retry_redis(
            lambda: registry.set_current(name, version, announce=True),
            what=f"making {name}@{version} current",
            deadline_s=redis_deadline_s,
        )
    logger.info("published %s@%s at %s%s", name, version, dest, " (current)" if make_current else "")
    return PublishedVersion(name, version, dest)


def rollback(registry: AdapterRegistry, name: str, version: str, *, redis_deadline_s: float = 30.0) -> None:
    """Make a recorded version current again (a pointer move) and announce it.

    Raises:
        NotFoundError: `version` is not recorded; the message lists the known ones.
        UnavailableError: Redis stayed unreachable for `redis_deadline_s`.
    """
    retry_redis(
        lambda: registry.set_current(name, version, announce=True),
        what=f"rolling {name} back to {version}",
        deadline_s=redis_deadline_s,
    )
    logger.info("%s: current is now %s", name, version)


__all__ = ["PublishedVersion", "publish_bundle", "rollback"]
