"""Offline checks of the Kubernetes manifests in deploy/k8s/ (no cluster needed).

Both overlays (`gpu`, `cpu-tiny`) are rendered with `kubectl kustomize` (skipped, with the
reason, where kubectl is not installed). Every rendered object is validated against the
Kubernetes OpenAPI schemas of `K8S_VERSION`, in strict mode (unknown fields are errors), with
`kubernetes-validate`, which bundles the schemas and works offline. The rest compares the
rendered objects with docker-compose.yml and docker/*.Dockerfile, which stay the reference:
images, commands, ports, environment and health checks agree; every container has readiness
and liveness probes, resource limits and a non-root security context; Services, PDBs, network
policies and the Ingress select pods and ports that exist.

Each check is a function that raises AssertionError on a list of rendered objects, so
`test_each_check_fails_on_a_broken_copy` can show that it catches the mistake it is for.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.settings import Settings
from tests.unit.deploy.compose_support import CPU_FILES, GPU_FILES, ROOT, env_example, stack
from tests.unit.deploy.test_dockerfiles import final_stage

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["gpu", "cpu-tiny"]
# The Kubernetes version the manifests target (its schemas ship in kubernetes-validate).
K8S_VERSION = "1.32.0"
GPU_TIERS = {"llm", "encoders", "decoders", "trainer"}
GRPC_TIERS = {"llm", "encoders", "decoders"}
MODALMESH_SERVICES = GPU_TIERS | {"gateway", "flower"}
WORKLOADS = {"Deployment", "StatefulSet"}
PRESET_VARIABLES = {"MODALMESH_MODELS_DIR"}  # preset-level path variable, not a Settings field
SHARED_MOUNTS = {  # mount path -> read-only (compose's volumes)
    "/var/lib/modalmesh/cache": False,
    "/var/lib/modalmesh/models": True,
    "/etc/modalmesh/presets": True,
    "/data": True,
}

Objects = list[dict[str, Any]]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered (kubectl kustomize)")
    return found


def render_dir(path: Path) -> Objects:
    """`kubectl kustomize <path>` as a list of objects; AssertionError with kustomize's message."""
    run = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"kubectl kustomize {path} failed:\n{run.stderr}"
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


@cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render_dir(K8S / "overlays" / overlay))


def rendered(overlay: str) -> Objects:
    """A fresh copy of the overlay's objects (rendered once per session)."""
    return copy.deepcopy(list(_rendered(overlay)))


def compose(overlay: str) -> dict[str, Any]:
    """The compose stack an overlay mirrors: the GPU stack, or GPU + CPU override."""
    return stack(GPU_FILES if overlay == "gpu" else CPU_FILES, env_example())


# -- helpers on rendered objects ---------------------------------------------------------------
def workloads(objs: Objects) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] in WORKLOADS}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def of_kind(objs: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container_env(objs: Objects, workload: dict[str, Any]) -> dict[str, str]:
    """What the container sees: envFrom ConfigMaps, then env (plain values only)."""
    maps = of_kind(objs, "ConfigMap")
    c = container(workload)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"{workload['metadata']['name']}: ConfigMap {name} is not rendered"
        env.update(maps[name].get("data", {}))
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            assert ref["name"] in maps, f"{workload['metadata']['name']}: ConfigMap {ref['name']} missing"
            env[item["name"]] = maps[ref["name"]]["data"][ref["key"]]
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels / matchExpressions with In) matches `labels`."""
    match = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", f"unsupported operator in {expr}"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def pods_selected(objs: Objects, selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        w for w in workloads(objs).values() if selects(selector, w["spec"]["template"]["metadata"]["labels"])
    ]


def dockerfile_cmd(name: str) -> list[str]:
    cmd = [args for op, args in final_stage(ROOT / "docker" / f"{name}.Dockerfile") if op == "CMD"]
    return yaml.safe_load(cmd[-1])


def dockerfile_ports(name: str) -> set[int]:
    exposed = [args for op, args in final_stage(ROOT / "docker" / f"{name}.Dockerfile") if op == "EXPOSE"]
    return {int(p) for args in exposed for p in args.split()}


def container_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(workload).get("ports", [])}


# -- the checks ----------------------------------------------------------------------------------
def check_schemas(objs: Objects) -> None:
    import kubernetes_validate

    problems = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(map(str, e.path)) or "<root>"
            problems.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {where}: {e.message}")
    assert not problems, f"not valid Kubernetes {K8S_VERSION}:\n" + "\n".join(problems)


def check_one_workload_per_compose_service(objs: Objects, overlay: str) -> None:
    assert set(workloads(objs)) == set(compose(overlay)["services"]), "one workload per compose service"
    assert workloads(objs)["redis"]["kind"] == "StatefulSet"
    claims = workloads(objs)["redis"]["spec"].get("volumeClaimTemplates", [])
    assert any(
        m["name"] in {c["metadata"]["name"] for c in claims}
        for m in container(workloads(objs)["redis"])["volumeMounts"]
    ), "redis keeps its data on a PVC"


def check_probes_limits_security(objs: Objects) -> None:
    for name, w in workloads(objs).items():
        c = container(w)
        assert "readinessProbe" in c and "livenessProbe" in c, f"{name}: readiness and liveness probes"
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), (
            f"{name}: requests+limits"
        )
        pod_sc, c_sc = pod_spec(w).get("securityContext", {}), c.get("securityContext", {})
        assert c_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot"
        assert c_sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, f"{name}: a non-root uid"
        assert c_sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation: false"
        assert c_sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities dropped"


def check_images_commands_ports(objs: Objects, overlay: str) -> None:
    services = compose(overlay)["services"]
    for name, w in workloads(objs).items():
        c, svc = container(w), services[name]
        assert c["image"] == svc["image"], f"{name}: image {c['image']} is not compose's {svc['image']}"
        published = {int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])}
        ports = set(container_ports(w).values())
        if name == "redis":
            assert c["args"] == [str(a) for a in svc["command"]], f"{name}: compose's command"
            assert ports == {6379}
            continue
        assert c["command"] == dockerfile_cmd(name), f"{name}: command is not the Dockerfile's CMD"
        assert ports == published == dockerfile_ports(name), (
            f"{name}: ports {ports} != compose/EXPOSE {published}"
        )


def check_environment(objs: Objects, overlay: str) -> None:
    services = compose(overlay)["services"]
    for name, w in workloads(objs).items():
        if name == "redis":
            continue
        env = container_env(objs, w)
        want = {k: "" if v is None else str(v) for k, v in (services[name].get("environment") or {}).items()}
        secret_refs = {
            e["name"] for e in container(w).get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
        }
        for key, value in want.items():
            if key in secret_refs:
                continue
            assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}, compose has {value!r}"
        for key in env:
            if key.startswith("MODALMESH_") and key not in PRESET_VARIABLES:
                assert key.removeprefix("MODALMESH_").lower() in Settings.model_fields, f"{name}: {key}"


def check_health_protocols(objs: Objects, overlay: str) -> None:
    """Readiness probes test what compose's health checks test, on the service's own protocol."""
    services = compose(overlay)["services"]
    for name, w in workloads(objs).items():
        probe = container(w)["readinessProbe"]
        test = services[name]["healthcheck"]["test"]
        ports = container_ports(w)
        if test[:4] == ["CMD", "python", "-m", "services.common.health"]:
            kind, target = test[4], test[5]
            if kind == "http":
                m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/.*)", target)
                assert m and "httpGet" in probe, f"{name}: an HTTP readiness probe, as compose"
                assert ports[probe["httpGet"]["port"]] == int(m[1]) and probe["httpGet"]["path"] == m[2], name
            else:
                assert "grpc" in probe, f"{name}: a gRPC readiness probe, as compose"
                assert probe["grpc"]["port"] == int(target.rsplit(":", 1)[1]), name
                assert probe["grpc"]["service"] == test[6], f"{name}: gRPC health of {test[6]}"
        elif test[0] == "CMD-SHELL":
            shell = test[1].replace("$$", "$")
            assert probe.get("exec", {}).get("command") == ["sh", "-c", shell], f"{name}: compose's check"
        else:  # flower: urllib on a URL
            m = re.search(r"http://127\.0\.0\.1:(\d+)(/[^'\"]*)", " ".join(test))
            assert m and ports[probe["httpGet"]["port"]] == int(m[1]) and probe["httpGet"]["path"] == m[2], (
                name
            )
    gateway = container(workloads(objs)["gateway"])
    assert gateway["livenessProbe"].get("grpc", {}).get("port") == Settings().gateway_grpc_port, (
        "gateway gRPC health"
    )


def check_services_and_selectors(objs: Objects) -> None:
    for name, svc in of_kind(objs, "Service").items():
        pods = pods_selected(objs, svc["spec"]["selector"])
        assert pods, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            for w in pods:
                assert port["targetPort"] in container_ports(w), (
                    f"Service {name}: no port {port['targetPort']}"
                )
    for name in GRPC_TIERS:
        assert of_kind(objs, "Service")[name]["spec"].get("clusterIP") == "None", f"{name}: headless Service"
    for name, pdb in of_kind(objs, "PodDisruptionBudget").items():
        assert pods_selected(objs, pdb["spec"]["selector"]), f"PDB {name} selects no pods"
    covered = {
        w
        for pdb in of_kind(objs, "PodDisruptionBudget").values()
        for w in workloads(objs)
        if selects(pdb["spec"]["selector"], workloads(objs)[w]["spec"]["template"]["metadata"]["labels"])
    }
    assert covered == set(workloads(objs)), f"no PodDisruptionBudget for {set(workloads(objs)) - covered}"
    for ing in of_kind(objs, "Ingress").values():
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "gateway", "only the gateway is exposed through an Ingress"
                service_ports = {
                    p["name"] for p in of_kind(objs, "Service")[backend["name"]]["spec"]["ports"]
                }
                assert backend["port"]["name"] in service_ports, f"Ingress: no port {backend['port']}"


def check_network_policies(objs: Objects) -> None:
    policies = of_kind(objs, "NetworkPolicy").values()
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies), (
        "default deny"
    )
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            if not rule.get("from"):  # from anywhere
                names = {w["metadata"]["name"] for w in pods_selected(objs, p["spec"]["podSelector"])}
                assert names == {"gateway"}, (
                    f"NetworkPolicy {p['metadata']['name']} opens {names} to the world"
                )
            assert pods_selected(objs, p["spec"]["podSelector"]), f"{p['metadata']['name']} selects no pods"


def check_volumes_and_secret(objs: Objects) -> None:
    claims = of_kind(objs, "PersistentVolumeClaim")
    for name, w in workloads(objs).items():
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        for m in container(w).get("volumeMounts", []):
            if m["mountPath"] in SHARED_MOUNTS and m["name"] in volumes:  # not redis's own claim
                claim = volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
                assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], f"{name}: {claim} is RWX"
                assert m.get("readOnly", False) is SHARED_MOUNTS[m["mountPath"]], (
                    f"{name}: {m['mountPath']} readOnly"
                )
    gateway = workloads(objs)["gateway"]
    env = {e["name"]: e for e in container(gateway)["env"]}
    keys_file = env["MODALMESH_API_KEYS_FILE"]["value"]
    mount = next(m for m in container(gateway)["volumeMounts"] if m["mountPath"] == keys_file)
    volume = next(v for v in pod_spec(gateway)["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, "the gateway's API keys come from a Secret"


def check_gpu_scheduling(objs: Objects, overlay: str) -> None:
    for name, w in workloads(objs).items():
        gpus = container(w)["resources"]["limits"].get("nvidia.com/gpu")
        if overlay == "gpu" and name in GPU_TIERS:
            assert gpus == 1 and container(w)["resources"]["requests"].get("nvidia.com/gpu") == 1, (
                f"{name}: a GPU"
            )
            assert pod_spec(w).get("nodeSelector"), f"{name}: a GPU node selector"
        else:
            assert gpus is None, f"{name}: no GPU in {overlay}"


CHECKS: dict[str, Callable[[Objects, str], None]] = {
    "schemas": lambda objs, _: check_schemas(objs),
    "workloads": check_one_workload_per_compose_service,
    "probes-limits-security": lambda objs, _: check_probes_limits_security(objs),
    "images-commands-ports": check_images_commands_ports,
    "environment": check_environment,
    "health-protocols": check_health_protocols,
    "services-selectors": lambda objs, _: check_services_and_selectors(objs),
    "network-policies": lambda objs, _: check_network_policies(objs),
    "volumes-secret": lambda objs, _: check_volumes_and_secret(objs),
    "gpu-scheduling": check_gpu_scheduling,
}


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", list(CHECKS))
def test_rendered_overlay_passes(check: str, overlay: str) -> None:
    CHECKS[check](rendered(overlay), overlay)


def _workload(objs: Objects, name: str) -> dict[str, Any]:
    return workloads(objs)[name]


def _mutate(fn: Callable[[Objects], None]) -> Callable[[Objects], Objects]:
    def apply(objs: Objects) -> Objects:
        fn(objs)
        return objs

    return apply


# (check, overlay, a small break of the rendered objects it must catch)
MUTATIONS: dict[str, tuple[str, str, Callable[[Objects], Objects]]] = {
    "typo-field": (
        "schemas",
        "gpu",
        _mutate(lambda o: container(_workload(o, "llm")).update(readinesProbe={})),
    ),
    "bad-port-type": (
        "schemas",
        "cpu-tiny",
        _mutate(lambda o: container(_workload(o, "gateway"))["ports"][0].update(containerPort="8000")),
    ),
    "no-flower": (
        "workloads",
        "gpu",
        lambda o: [x for x in o if x["metadata"]["name"] != "flower" or x["kind"] != "Deployment"],
    ),
    "no-liveness": (
        "probes-limits-security",
        "gpu",
        _mutate(lambda o: container(_workload(o, "encoders")).pop("livenessProbe")),
    ),
    "no-limits": (
        "probes-limits-security",
        "gpu",
        _mutate(lambda o: container(_workload(o, "trainer"))["resources"].pop("limits")),
    ),
    "root": (
        "probes-limits-security",
        "gpu",
        _mutate(lambda o: pod_spec(_workload(o, "gateway"))["securityContext"].pop("runAsNonRoot")),
    ),
    "image-tag": (
        "images-commands-ports",
        "gpu",
        _mutate(lambda o: container(_workload(o, "llm")).update(image="modalmesh/llm:latest")),
    ),
    "port": (
        "images-commands-ports",
        "gpu",
        _mutate(lambda o: container(_workload(o, "encoders"))["ports"][1].update(containerPort=9101)),
    ),
    "command": (
        "images-commands-ports",
        "gpu",
        _mutate(
            lambda o: container(_workload(o, "llm")).update(command=["python", "-m", "services.encoders"])
        ),
    ),
    "env": (
        "environment",
        "cpu-tiny",
        _mutate(lambda o: container(_workload(o, "gateway"))["env"][0].update(value="llm:50053")),
    ),
    "setting": (
        "environment",
        "gpu",
        _mutate(
            lambda o: container(_workload(o, "trainer"))["env"].append(
                {"name": "MODALMESH_NO_SUCH", "value": "1"}
            )
        ),
    ),
    "probe": (
        "health-protocols",
        "gpu",
        _mutate(lambda o: container(_workload(o, "llm"))["readinessProbe"]["grpc"].update(service="x")),
    ),
    "probe-path": (
        "health-protocols",
        "cpu-tiny",
        _mutate(lambda o: container(_workload(o, "encoders"))["readinessProbe"]["httpGet"].update(path="/")),
    ),
    "selector": (
        "services-selectors",
        "gpu",
        _mutate(
            lambda o: of_kind(o, "Service")["llm"]["spec"]["selector"].update(
                {"app.kubernetes.io/name": "lm"}
            )
        ),
    ),
    "not-headless": (
        "services-selectors",
        "gpu",
        _mutate(lambda o: of_kind(o, "Service")["encoders"]["spec"].pop("clusterIP")),
    ),
    "no-pdb": (
        "services-selectors",
        "gpu",
        lambda o: [
            x for x in o if not (x["kind"] == "PodDisruptionBudget" and x["metadata"]["name"] == "llm")
        ],
    ),
    "open-redis": (
        "network-policies",
        "gpu",
        _mutate(
            lambda o: of_kind(o, "NetworkPolicy")["redis-from-modalmesh"]["spec"]["ingress"][0].pop("from")
        ),
    ),
    "no-deny": (
        "network-policies",
        "gpu",
        lambda o: [x for x in o if x["metadata"]["name"] != "default-deny-ingress"],
    ),
    "rw-models": (
        "volumes-secret",
        "gpu",
        _mutate(
            lambda o: next(
                m
                for m in container(_workload(o, "llm"))["volumeMounts"]
                if m["mountPath"] == "/var/lib/modalmesh/models"
            ).pop("readOnly")
        ),
    ),
    "rwo": (
        "volumes-secret",
        "gpu",
        _mutate(
            lambda o: of_kind(o, "PersistentVolumeClaim")["modalmesh-shared"]["spec"].update(
                accessModes=["ReadWriteOnce"]
            )
        ),
    ),
    "no-gpu": (
        "gpu-scheduling",
        "gpu",
        _mutate(lambda o: container(_workload(o, "llm"))["resources"]["limits"].pop("nvidia.com/gpu")),
    ),
    "gpu-on-cpu": (
        "gpu-scheduling",
        "cpu-tiny",
        _mutate(
            lambda o: container(_workload(o, "llm"))["resources"]["limits"].update({"nvidia.com/gpu": 1})
        ),
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_check_fails_on_a_broken_copy(mutation: str) -> None:
    check, overlay, mutate = MUTATIONS[mutation]
    with pytest.raises(AssertionError):
        CHECKS[check](mutate(rendered(overlay)), overlay)


def test_every_check_has_a_mutation() -> None:
    assert {check for check, _, _ in MUTATIONS.values()} == set(CHECKS)


def test_a_broken_kustomization_does_not_render(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    base = tmp_path / "k8s" / "base" / "kustomization.yaml"
    base.write_text(base.read_text().replace("  - llm.yaml\n", "  - llm.yaml\n  - missing.yaml\n"))
    with pytest.raises(AssertionError, match="kustomize"):
        render_dir(tmp_path / "k8s" / "overlays" / "gpu")


def test_docs_walk_through_names_the_manual_steps() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    for needed in (
        "kubectl kustomize deploy/k8s/overlays/gpu",
        "modalmesh-api-keys",
        "ReadWriteMany",
        "newName",
    ):
        assert needed in text, f"docs/deployment.md does not mention {needed}"
