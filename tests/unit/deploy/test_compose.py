"""Static checks of docker-compose.yml (GPU stack) and docker-compose.cpu.yml (CPU override).

No Docker engine is needed: the files are validated against the Compose specification's JSON
schema (vendored in data/), merged the way Compose merges them (compose_support.py), and
checked for what docs/deployment.md promises.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from services.common.settings import Settings
from tests.unit.deploy.compose_support import (
    CPU_FILES,
    GPU_FILES,
    ROOT,
    SCHEMA_PATH,
    env_example,
    load,
    stack,
    strip_tags,
    variables,
)

COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"]
GPU_SERVICES = {"llm", "encoders", "decoders", "trainer"}
MODALMESH_SERVICES = GPU_SERVICES | {"gateway"}
# MODALMESH_* variables that are not Settings fields but preset-level path variables
# (services/common/presets.py: ${MODALMESH_MODELS_DIR} in the shipped presets' checkpoints).
PRESET_VARIABLES = {"MODALMESH_MODELS_DIR"}
DEFAULTS = Settings.model_fields
# Container ports each service may publish: the Settings defaults (flower: Flower's own 5555).
PORTS = {
    "gateway": {DEFAULTS["gateway_http_port"].default, DEFAULTS["gateway_grpc_port"].default},
    "llm": {DEFAULTS["llm_port"].default, DEFAULTS["llm_metrics_port"].default},
    "encoders": {
        DEFAULTS["encoder_http_port"].default,
        DEFAULTS["encoder_grpc_port"].default,
        DEFAULTS["encoder_metrics_port"].default,
    },
    "decoders": {
        DEFAULTS["decoder_http_port"].default,
        DEFAULTS["decoder_grpc_port"].default,
        DEFAULTS["decoder_metrics_port"].default,
    },
    "flower": {5555},
    "redis": set(),
}


@cache
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def assert_valid(model: dict[str, Any], what: str) -> None:
    errors = sorted(validator().iter_errors(model), key=lambda e: list(e.absolute_path))
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    assert not problems, f"{what} does not follow the Compose specification:\n" + "\n".join(problems)


def gpu_stack() -> dict[str, Any]:
    return stack(GPU_FILES, env_example())


def cpu_stack() -> dict[str, Any]:
    return stack(CPU_FILES, env_example())


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return [d for d in devices.get("devices") or [] if "gpu" in d.get("capabilities", [])]


# -- schema ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_each_file_follows_the_compose_spec(path: Path) -> None:
    assert_valid(strip_tags(load(path)), path.name)


@pytest.mark.parametrize("build", [gpu_stack, cpu_stack], ids=["gpu", "cpu"])
def test_merged_stack_follows_the_compose_spec(build) -> None:
    assert_valid(build(), f"the {build.__name__}")


@pytest.mark.parametrize("files", [GPU_FILES, CPU_FILES], ids=["gpu", "cpu"])
def test_stack_without_env_file_uses_valid_defaults(files) -> None:
    """Every ${VAR} but the API key file has a default, so the stack works with only that set."""
    assert_valid(stack(files, {"API_KEYS_FILE": "./keys.txt"}), "the stack without .env")


@pytest.mark.parametrize("files", [GPU_FILES, CPU_FILES], ids=["gpu", "cpu"])
def test_a_missing_api_key_file_setting_is_named(files) -> None:
    """`${API_KEYS_FILE:?...}`: `docker compose config` refuses the stack and says what to set."""
    with pytest.raises(KeyError, match=r"API_KEYS_FILE\} is required: set API_KEYS_FILE in .env"):
        stack(files, {})


def test_merge_handles_reset_and_unique_targets() -> None:
    from tests.unit.deploy.compose_support import Reset, merge

    base = {"s": {"ports": ["1:1", "2:2"], "command": ["a"], "deploy": {"x": 1}, "dns": ["a"]}}
    over = {"s": {"ports": ["9:2"], "command": ["b"], "deploy": Reset(None), "dns": ["b"]}}
    assert merge(base, over) == {"s": {"ports": ["1:1", "9:2"], "command": ["b"], "dns": ["a", "b"]}}


# -- services ----------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [gpu_stack, cpu_stack], ids=["gpu", "cpu"])
def test_every_service_has_a_healthcheck_and_restarts(build) -> None:
    services = build()["services"]
    assert set(services) >= MODALMESH_SERVICES | {"redis", "flower"}
    for name, svc in services.items():
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert svc.get("restart") == "unless-stopped", f"{name}: restart is {svc.get('restart')!r}"


def test_health_checks_use_each_services_own_protocol() -> None:
    services = gpu_stack()["services"]
    test = {name: " ".join(svc["healthcheck"]["test"]) for name, svc in services.items()}
    assert f"127.0.0.1:{DEFAULTS['gateway_http_port'].default}/health" in test["gateway"]
    assert "services.common.health grpc" in test["llm"] and f":{DEFAULTS['llm_port'].default}" in test["llm"]
    assert "modalmesh.v1.LLM" in test["llm"]
    assert f":{DEFAULTS['encoder_http_port'].default}/v2/health/ready" in test["encoders"]
    assert f":{DEFAULTS['decoder_http_port'].default}/v2/health/ready" in test["decoders"]
    assert "redis-cli ping" in test["redis"]
    assert "inspect ping" in test["trainer"] and "trainer@$HOSTNAME" in test["trainer"]
    assert "/healthcheck" in test["flower"]


@pytest.mark.parametrize("build", [gpu_stack, cpu_stack], ids=["gpu", "cpu"])
def test_health_checks_import_no_cli_module(build) -> None:
    """A service image's health check runs a service module (`services.common.health`), never
    the CLI package (`modalmesh` holds the CLI; only its generated `modalmesh.v1` is a library)."""
    for name in MODALMESH_SERVICES:
        test = " ".join(build()["services"][name]["healthcheck"]["test"])
        assert not re.search(r"\bmodalmesh\.(?!v1\b)\w+", test), f"{name}: {test}"
        if "python" in test.split():
            assert "-m services.common.health" in test, f"{name}: {test}"


def test_gpu_stack_reserves_a_gpu_for_each_gpu_service() -> None:
    services = gpu_stack()["services"]
    for name in GPU_SERVICES:
        devices = gpu_devices(services[name])
        assert devices, f"{name}: no GPU reservation in the GPU stack"
        for d in devices:
            assert d.get("driver") == "nvidia", f"{name}: driver {d.get('driver')!r}"
            assert d.get("count") or d.get("device_ids"), f"{name}: neither count nor device_ids"
    for name in set(services) - GPU_SERVICES:
        assert not gpu_devices(services[name]), f"{name} reserves a GPU but needs none"


def test_gpu_ids_come_from_env() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for name in GPU_SERVICES:
        assert f"${{{name.upper()}_GPU_IDS:-" in text, f"{name}: GPU ids not taken from .env"


def test_cpu_stack_reserves_no_gpu_and_serves_a_tiny_preset() -> None:
    services = cpu_stack()["services"]
    for name, svc in services.items():
        assert not gpu_devices(svc), f"{name} still reserves a GPU in the CPU stack"
    for name in MODALMESH_SERVICES:
        env = environment(services[name])
        assert env["MODALMESH_PRESET"].startswith("tiny"), f"{name}: preset {env['MODALMESH_PRESET']!r}"
    assert environment(services["trainer"])["MODALMESH_TRAINER_HARDWARE"] == "cpu"


def test_decoders_only_run_with_the_outputs_profile() -> None:
    services = gpu_stack()["services"]
    assert services["decoders"].get("profiles") == ["outputs"]
    for name, svc in services.items():
        if name != "decoders":
            assert not svc.get("profiles"), f"{name} should run without a profile"
    dep = services["gateway"]["depends_on"]["decoders"]
    assert dep["required"] is False, "the gateway must start without the outputs profile"


@pytest.mark.parametrize("build", [gpu_stack, cpu_stack], ids=["gpu", "cpu"])
def test_builds_point_at_existing_dockerfiles(build) -> None:
    for name, svc in build()["services"].items():
        if "build" not in svc:
            assert name == "redis", f"{name}: neither build nor the redis image"
            assert ":" in svc["image"] and not svc["image"].endswith(":latest")
            continue
        context = (ROOT / svc["build"]["context"]).resolve()
        dockerfile = (context / svc["build"]["dockerfile"]).resolve()
        assert context.is_dir(), f"{name}: context {context} is missing"
        assert dockerfile.is_file(), f"{name}: Dockerfile {dockerfile} is missing"
        assert dockerfile.parent == ROOT / "docker", f"{name}: Dockerfile outside docker/"


@pytest.mark.parametrize("build", [gpu_stack, cpu_stack], ids=["gpu", "cpu"])
def test_published_ports_match_settings_defaults(build) -> None:
    for name, svc in build()["services"].items():
        for port in svc.get("ports", []):
            m = re.fullmatch(r"(?:(?P<ip>[\d.]+):)?(?P<host>\d+):(?P<target>\d+)", str(port))
            assert m, f"{name}: expected [ip:]host:container, got {port!r}"
            assert int(m["target"]) in PORTS[name], f"{name}: {port!r} is not a Settings default port"
            assert m["host"] == m["target"], f"{name}: {port!r} publishes on another host port"
    gateway_ports = {str(p).rsplit(":", 1)[-1] for p in build()["services"]["gateway"]["ports"]}
    assert gateway_ports == {str(p) for p in PORTS["gateway"]}


def test_services_bind_all_interfaces_and_dial_each_other_by_name() -> None:
    services = gpu_stack()["services"]
    for name in MODALMESH_SERVICES:
        assert environment(services[name])["MODALMESH_HOST"] == "0.0.0.0", name
        assert environment(services[name])["MODALMESH_REDIS_URL"].startswith("redis://redis:6379/")
    env = environment(services["gateway"])
    # dns: names, so every replica of a scaled tier (`--scale encoders=2`) gets requests
    assert env["MODALMESH_LLM_ADDRESS"] == f"dns:///llm:{DEFAULTS['llm_port'].default}"
    assert env["MODALMESH_ENCODER_ADDRESS"] == f"dns:encoders:{DEFAULTS['encoder_grpc_port'].default}"
    assert env["MODALMESH_DECODER_ADDRESS"] == f"dns:decoders:{DEFAULTS['decoder_grpc_port'].default}"
    assert environment(services["flower"])["MODALMESH_REDIS_URL"].startswith("redis://redis:6379/")


def test_gateway_has_api_keys_on() -> None:
    model = gpu_stack()
    gateway = model["services"]["gateway"]
    env = environment(gateway)
    assert env["MODALMESH_API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert "api_keys" in gateway["secrets"] and "file" in model["secrets"]["api_keys"]


def test_services_share_the_cache_volume() -> None:
    model = gpu_stack()
    assert {"modalmesh-cache", "redis-data"} <= set(model["volumes"])
    for name in MODALMESH_SERVICES:
        svc = model["services"][name]
        env = environment(svc)
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc["volumes"]}
        assert mounts.get(env["MODALMESH_CACHE_DIR"]) == "modalmesh-cache", name
        # the artifact store stays <cache>/adapters, where presets keep their initial bundle
        assert "MODALMESH_ARTIFACT_DIR" not in env, name
        assert env["MODALMESH_PRESETS_DIR"] in mounts, f"{name}: presets dir not mounted"
    for name in GPU_SERVICES:
        svc = model["services"][name]
        mounts = {str(v).split(":")[1] for v in svc["volumes"]}
        assert environment(svc)["MODALMESH_MODELS_DIR"] in mounts, f"{name}: models not mounted"
    redis = model["services"]["redis"]
    assert "redis-data:/data" in redis["volumes"] and "--appendonly" in redis["command"]


# -- variables ---------------------------------------------------------------------------------
def documented_variables() -> dict[str, str]:
    """Variables of .env.example (set or commented out) -> the comment block right above."""
    out: dict[str, str] = {}
    comment: list[str] = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=.*", line.strip())
        if m:
            out[m[1]] = " ".join(comment)
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("# "))
        else:
            comment = []
    return out


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_variable_is_documented(path: Path) -> None:
    documented = documented_variables()
    for name in sorted(variables(path.read_text())):
        assert name in documented, f"{path.name}: ${{{name}}} is not in .env.example"
        assert documented[name].strip(), f".env.example: {name} has no comment above it"
        if name.startswith("MODALMESH_"):
            field = name.removeprefix("MODALMESH_").lower()
            assert field in Settings.model_fields, f"{name} is not a field of Settings"


@pytest.mark.parametrize("build", [gpu_stack, cpu_stack], ids=["gpu", "cpu"])
def test_modalmesh_environment_keys_are_real_settings(build) -> None:
    for name, svc in build()["services"].items():
        for key in environment(svc):
            if key.startswith("MODALMESH_") and key not in PRESET_VARIABLES:
                field = key.removeprefix("MODALMESH_").lower()
                assert field in Settings.model_fields, f"{name}: {key} is not a field of Settings"


def test_env_example_holds_no_secret() -> None:
    values = env_example()
    assert values.get("MODALMESH_API_KEYS", "") == "", ".env.example must not ship an API key"
    secrets_dir = ROOT / "docker" / "secrets"
    assert "*" in (secrets_dir / ".gitignore").read_text().split(), "docker/secrets must be git-ignored"
