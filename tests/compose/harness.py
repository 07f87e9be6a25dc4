"""Running the production compose stack for real on a machine with no image registry.

`docker compose -f docker-compose.yml -f docker-compose.cpu.yml` is run unchanged; what this
machine lacks is supplied from here, never by editing the files users run:

- Base images. Docker Hub is out of reach, so stand-ins are built locally (`standins/`): a
  Debian bookworm root filesystem from `debootstrap --variant=minbase` (`docker import`), a
  Python 3.11 image on it (Debian's own 3.11, the host's CA certificates trusted), a CPU torch
  base from the pinned wheel (requirements/cpu.txt; a local file on this machine) and Redis
  from Debian. They reach the compose files through the variables those already read:
  `TORCH_IMAGE`, `PYTHON_IMAGE`, `REDIS_IMAGE`. Each stand-in's tag carries a digest of its
  recipe, so an edited recipe builds anew and an unchanged one is reused.
- Settings: an env file written here (`--env-file`, so a developer's own `.env` is not read),
  an API key file, a data folder with a small synthetic training set, and a project name of
  its own (`modalmesh-compose-test`), so `down -v` never touches a user's `modalmesh` stack.

Used by tests/compose/test_compose_stack.py (`make compose-test`); `python -m
tests.compose.harness up|down|standins` runs the same steps by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).resolve().parent / "standins"
PROJECT = "modalmesh-compose-test"
FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
SERVICE_IMAGES = ("encoders", "llm", "decoders", "gateway", "trainer", "flower")
WORK = Path(os.environ.get("MODALMESH_COMPOSE_WORK", "/var/tmp/modalmesh-compose-test"))
DEBIAN_MIRROR = os.environ.get("MODALMESH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path(os.environ.get("MODALMESH_HOST_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
TORCH_PIN = "2.13.0"
API_KEY = "compose-test-key-0123456789abcdef"
GATEWAY = "http://127.0.0.1:8000"


class HarnessError(RuntimeError):
    """A step of the harness failed; the message says which and quotes what docker said."""


def log(message: str) -> None:
    print(f"[compose-test] {message}", file=sys.stderr, flush=True)


def run(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 1800,
    check: bool = True,
    quiet: bool = False,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured; on failure raise with its last lines."""
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise HarnessError(f"`{' '.join(args)}` exited {proc.returncode}:\n{tail}")
    if not quiet and proc.returncode == 0 and os.environ.get("MODALMESH_COMPOSE_VERBOSE"):
        sys.stderr.write(proc.stdout + proc.stderr)
    return proc


# -- stand-in base images ----------------------------------------------------------------------
def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False, quiet=True).returncode == 0


def host_ca_certificates(bundle: Path = CA_BUNDLE) -> list[str]:
    """The PEM certificates of the host's trust bundle, one string each."""
    text = bundle.read_text()
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    if not certs:
        raise HarnessError(
            f"no certificate in {bundle}: set MODALMESH_HOST_CA_BUNDLE to the host's CA bundle"
        )
    return [c + "\n" for c in certs]


def torch_wheel() -> Path:
    """The pinned CPU torch wheel: in PIP_FIND_LINKS (this machine's /opt/wheels) or downloaded."""
    pattern = f"torch-{TORCH_PIN}*-cp311-cp311-*linux*_x86_64.whl"
    for folder in filter(None, os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()):
        found = sorted(Path(folder).glob(pattern)) if Path(folder).is_dir() else []
        if found:
            return found[0]
    dest = WORK / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(pattern))
    if not found:
        log(f"downloading torch=={TORCH_PIN} (CPU build) for the torch stand-in")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-d",
                str(dest),
                "--index-url",
                "https://download.pytorch.org/whl/cpu",
                f"torch=={TORCH_PIN}",
            ],
            timeout=1800,
        )
        found = sorted(dest.glob(pattern))
    if not found:
        raise HarnessError(f"no {pattern} found or downloadable")
    return found[0]


def _standin(tag: str, dockerfile: str, files: dict[str, Path | str], args: dict[str, str]) -> str:
    """Build `tag` from standins/`dockerfile` unless it exists. `files` go into the build context
    (name -> a file to link or copy, or text to write); the context is a fresh folder under WORK."""
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="standin-", dir=WORK) as folder:
        ctx = Path(folder)
        for name, source in {dockerfile: STANDINS / dockerfile, **files}.items():
            (ctx / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, str):
                (ctx / name).write_text(source)
            elif source.stat().st_dev == ctx.stat().st_dev:
                os.link(source, ctx / name)  # the torch wheel: no copy of 200 MB
            else:
                shutil.copy(source, ctx / name)
        cmd = ["docker", "build", "-t", tag, "-f", str(ctx / dockerfile)]
        for key, value in args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        start = time.monotonic()
        run([*cmd, str(ctx)], env=os.environ | {"DOCKER_BUILDKIT": "0"}, timeout=1800)
    log(f"built stand-in {tag} in {time.monotonic() - start:.0f} s")
    return tag


def bookworm_image() -> str:
    """A Debian bookworm minbase rootfs imported as an image (debootstrap; needs root)."""
    variant = ["--variant=minbase", "bookworm", DEBIAN_MIRROR]
    tag = f"modalmesh-standin/bookworm:{_digest(*variant)}"
    if image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise HarnessError("debootstrap is missing: run scripts/ensure-docker (apt-get install debootstrap)")
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=WORK, prefix="rootfs-") as rootfs:
        run(["debootstrap", *variant[:2], rootfs, variant[2]], timeout=1800)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "--change", 'CMD ["bash"]', "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise HarnessError(f"docker import of the bookworm rootfs failed: {imported.stderr.strip()}")
    log(f"imported stand-in {tag} (debootstrap) in {time.monotonic() - start:.0f} s")
    return tag


def python_image(base: str) -> str:
    certs = host_ca_certificates()
    recipe = (STANDINS / "python.Dockerfile").read_bytes()
    tag = f"modalmesh-standin/python:3.11-slim-bookworm-{_digest(base, recipe, *certs)}"
    files: dict[str, Path | str] = {f"host-ca/host-{i:03d}.crt": cert for i, cert in enumerate(certs)}
    return _standin(tag, "python.Dockerfile", files, {"BASE_IMAGE": base})


def torch_image(base: str) -> str:
    wheel = torch_wheel()
    recipe = (STANDINS / "torch-cpu.Dockerfile").read_bytes()
    tag = f"modalmesh-standin/torch-cpu:{TORCH_PIN}-{_digest(base, recipe, wheel.name, str(wheel.stat().st_size))}"
    args = {"BASE_IMAGE": base, "TORCH_WHEEL": wheel.name}
    return _standin(tag, "torch-cpu.Dockerfile", {wheel.name: wheel}, args)


def redis_image(base: str) -> str:
    recipe = (STANDINS / "redis.Dockerfile").read_bytes() + (STANDINS / "redis-entrypoint.sh").read_bytes()
    tag = f"modalmesh-standin/redis:7-bookworm-{_digest(base, recipe)}"
    entrypoint = STANDINS / "redis-entrypoint.sh"
    return _standin(tag, "redis.Dockerfile", {entrypoint.name: entrypoint}, {"BASE_IMAGE": base})


@dataclass
class Standins:
    bookworm: str
    python: str
    torch: str
    redis: str


def build_standins() -> Standins:
    """The stand-in base images (built when missing); with MODALMESH_COMPOSE_STANDINS=0, the real
    ones instead (TORCH_IMAGE, PYTHON_IMAGE, REDIS_IMAGE or the compose files' defaults), for a
    machine that reaches Docker Hub."""
    WORK.mkdir(parents=True, exist_ok=True)
    if os.environ.get("MODALMESH_COMPOSE_STANDINS", "1") == "0":
        return Standins(
            bookworm="",
            python=os.environ.get("PYTHON_IMAGE", "python:3.11-slim-bookworm"),
            torch=os.environ.get("TORCH_IMAGE", "pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime"),
            redis=os.environ.get("REDIS_IMAGE", "redis:7.4-alpine"),
        )
    bookworm = bookworm_image()
    python = python_image(bookworm)
    standins = Standins(bookworm, python, torch_image(python), redis_image(bookworm))
    _untag_superseded(standins)
    return standins


def _untag_superseded(standins: Standins) -> None:
    """Drop the tags of stand-ins an edited recipe replaced (their layers go once unused)."""
    current = set(standins.__dict__.values())
    listed = run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", "modalmesh-standin/*"], quiet=True
    ).stdout.split()
    stale = [tag for tag in listed if tag not in current]
    if stale:
        run(["docker", "image", "rm", *stale], check=False, quiet=True)
        log(f"untagged superseded stand-ins: {', '.join(stale)}")


# -- the compose project -----------------------------------------------------------------------
@dataclass
class Stack:
    """The compose project as the harness runs it."""

    standins: Standins
    work: Path = WORK
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def env_file(self) -> Path:
        return self.work / "compose.env"

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    def write_settings(self) -> None:
        """The env file, API key file and training data the compose files read."""
        self.work.mkdir(parents=True, exist_ok=True)
        keys = self.work / "api_keys.txt"
        keys.write_text(f"# compose test key\n{API_KEY}\n")
        presets = self.work / "presets"
        presets.mkdir(exist_ok=True)
        models = self.work / "models"
        models.mkdir(exist_ok=True)
        if not (self.data_dir / "captions.json").exists():
            from services.trainer.synth import synthesize

            synthesize(self.data_dir, train=16, heldout=2, seed=7, modalities=["image"])
        for path in self.data_dir.rglob("*"):  # readable by the containers' uid 10001
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.data_dir.chmod(0o755)
        settings = {
            "TORCH_IMAGE": self.standins.torch,
            "PYTHON_IMAGE": self.standins.python,
            "REDIS_IMAGE": self.standins.redis,
            "API_KEYS_FILE": str(keys),
            "MODELS_DIR": str(models),
            "PRESETS_DIR": str(presets),
            "DATA_DIR": str(self.data_dir),
            "CPU_PRESET": "tiny",
            "TRITON_SHM_SIZE": "1gb",
            "TRAINER_SHM_SIZE": "1gb",
        }
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))

    def env(self) -> dict[str, str]:
        """A clean environment: only what docker needs, so the shell's variables change nothing."""
        keep = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "TMPDIR")
        return {k: os.environ[k] for k in keep if k in os.environ} | {"DOCKER_BUILDKIT": "0"}

    def compose_args(self, *args: str) -> list[str]:
        files = [a for f in FILES for a in ("-f", str(ROOT / f))]
        return [
            "docker",
            "compose",
            "--project-name",
            PROJECT,
            "--env-file",
            str(self.env_file),
            *files,
            *args,
        ]

    def compose(
        self, *args: str, timeout: float = 1800, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(self.compose_args(*args), env=self.env(), timeout=timeout, check=check)

    def build(self, label: str) -> str:
        """Build every service image (the outputs profile included); returns the build output.

        One torch image first, alone: the classic builder caches per parent layer, and four
        builds started together would each make their own copy of the shared dependency layers
        (4x the work and the disk, and a rebuild that finds only one of the chains).
        """
        start = time.monotonic()
        first = self.compose("build", "llm")
        out = self.compose("--profile", "outputs", "build")
        self.timings[label] = time.monotonic() - start
        log(f"{label}: {self.timings[label]:.0f} s")
        return first.stdout + first.stderr + out.stdout + out.stderr

    def up(self, timeout: float = 900, services: Sequence[str] = ()) -> None:
        """`up -d --wait`; with `services`, those alone, recreated, without their dependencies. On
        failure raise with `docker compose ps` and each unhealthy service's first error line."""
        start = time.monotonic()
        args = ["up", "-d", "--wait", "--wait-timeout", str(int(timeout))]
        args += ["--no-deps", "--force-recreate", *services] if services else []
        proc = self.compose(*args, check=False, timeout=timeout + 120)
        label = "up_wait_s" if not services else f"up_wait_{'_'.join(services)}_s"
        self.timings[label] = time.monotonic() - start
        if proc.returncode != 0:
            raise HarnessError(
                f"`docker compose {' '.join(args)}` exited {proc.returncode}: "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}\n{self.diagnose()}"
            )
        log(f"up --wait {' '.join(services)}: healthy in {self.timings[label]:.0f} s")

    def ps(self) -> list[dict[str, object]]:
        out = self.compose("ps", "--all", "--format", "json").stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return list(json.loads(out))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def container(self, service: str) -> str:
        return self.compose("ps", "--all", "-q", service).stdout.strip()

    def inspect(self, service: str, template: str) -> str:
        return run(["docker", "inspect", "-f", template, self.container(service)], quiet=True).stdout.strip()

    def diagnose(self) -> str:
        """`docker compose ps` and, for each service not healthy, the first error line of its logs."""
        lines = ["docker compose ps:"]
        with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
            lines.append(self.compose("ps", "--all").stdout.rstrip())
            for row in self.ps():
                name, state, health = (
                    str(row.get("Service")),
                    str(row.get("State")),
                    str(row.get("Health", "")),
                )
                if state == "running" and health in ("healthy", ""):
                    continue
                logs = self.compose("logs", "--no-color", "--no-log-prefix", name, check=False).stdout
                lines.append(f"{name} is {state}{f' ({health})' if health else ''}: {first_error(logs)}")
        return "\n".join(lines)

    def down(self) -> None:
        self.compose("--profile", "outputs", "down", "-v", "--remove-orphans", "--timeout", "30", timeout=600)

    def image_sizes(self) -> dict[str, int]:
        sizes = {}
        for name in SERVICE_IMAGES:
            out = run(
                ["docker", "image", "inspect", "-f", "{{.Size}}", f"modalmesh/{name}:0.1.0"], quiet=True
            )
            sizes[name] = int(out.stdout.strip())
        return sizes

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks of the project still present."""
        label = f"label=com.docker.compose.project={PROJECT}"
        found = {}
        for kind, cmd in (
            ("containers", ["docker", "ps", "-a", "-q", "--filter", label]),
            ("volumes", ["docker", "volume", "ls", "-q", "--filter", label]),
            ("networks", ["docker", "network", "ls", "-q", "--filter", label]),
        ):
            found[kind] = run(cmd, quiet=True).stdout.split()
        return found


ERROR = re.compile(r"\b(error|exception|traceback|fatal|refus|cannot|can't|failed)\b", re.I)


def first_error(logs: str) -> str:
    """The first line of a service's logs that reads like an error (else its last line)."""
    lines = [line for line in logs.splitlines() if line.strip()]
    for line in lines:
        if ERROR.search(line):
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


def docker_ready() -> str | None:
    """None when the engine answers and Compose v2 is installed, else what is missing."""
    if shutil.which("docker") is None:
        return "no docker client: run scripts/ensure-docker"
    if run(["docker", "info"], check=False, quiet=True, timeout=60).returncode != 0:
        return "the Docker engine does not answer: run scripts/ensure-docker (it starts dockerd)"
    if run(["docker", "compose", "version"], check=False, quiet=True).returncode != 0:
        return "no Compose v2 plugin: run scripts/ensure-docker"
    return None


@contextlib.contextmanager
def running_stack() -> Iterator[Stack]:
    stack = Stack(build_standins())
    stack.write_settings()
    try:
        yield stack
    finally:
        stack.down()


def main(argv: Sequence[str]) -> int:
    command = argv[0] if argv else "up"
    if (missing := docker_ready()) is not None:
        print(missing, file=sys.stderr)
        return 2
    standins = build_standins()
    if command == "standins":
        print(json.dumps(standins.__dict__, indent=2))
        return 0
    stack = Stack(standins)
    stack.write_settings()
    if command == "up":
        stack.build("build_s")
        stack.up()
        print(f"up: {GATEWAY} (API key {API_KEY}); `python -m tests.compose.harness down` stops it")
    elif command == "down":
        stack.down()
    else:
        print(f"unknown command {command!r}: expected up, down or standins", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
