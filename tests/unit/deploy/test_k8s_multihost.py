"""Offline checks of deploy/k8s/components/multihost-training (no cluster needed).

The component is added to each overlay through a throw-away overlay in a copy of deploy/k8s,
rendered with `kubectl kustomize` and validated against the Kubernetes schemas, as
test_k8s.py does for the overlays. Then: the Indexed Job runs `deepspeed.nodes` pods at once;
the headless Service gives pod 0 the DNS name the command uses as master address; the
command's flags are the ones `python -m services.trainer.node` parses, with the node rank left
to JOB_COMPLETION_INDEX; the job file in the ConfigMap plans a node for every index; pods run
non-root with limits; the network policies let the nodes reach each other and node 0 Redis.
`check_multihost` raises AssertionError, and each mutation shows it catches its mistake.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.trainer import node
from services.trainer.jobs import parse_job
from tests.unit.deploy.test_k8s import (
    K8S,
    Objects,
    check_schemas,
    container,
    container_env,
    of_kind,
    pod_spec,
    render_dir,
    selects,
)

COMPONENT = K8S / "components" / "multihost-training"


@cache
def _rendered(overlay: str, workdir: str) -> tuple[dict[str, Any], ...]:
    copy_dir = Path(workdir) / f"k8s-{overlay}"
    if not copy_dir.exists():
        shutil.copytree(K8S, copy_dir)
    test_overlay = copy_dir / "overlays" / "multihost-test"
    test_overlay.mkdir(exist_ok=True)
    (test_overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"../{overlay}"],
                "components": ["../../components/multihost-training"],
            }
        )
    )
    return tuple(render_dir(test_overlay))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("k8s-multihost"))


def the_job(objs: Objects) -> dict[str, Any]:
    jobs = of_kind(objs, "Job")
    assert len(jobs) == 1, f"one Job expected, got {sorted(jobs)}"
    return next(iter(jobs.values()))


def job_file(objs: Objects, job: dict[str, Any], path: str) -> str:
    """The text at `path` in the container: a key of a ConfigMap volume mounted above it."""
    maps, spec = of_kind(objs, "ConfigMap"), pod_spec(job)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container(job)["volumeMounts"]:
        root = mount["mountPath"].rstrip("/") + "/"
        source = volumes[mount["name"]].get("configMap")
        if path.startswith(root) and source is not None:
            assert source["name"] in maps, f"ConfigMap {source['name']} is not rendered"
            data = maps[source["name"]]["data"]
            key = path.removeprefix(root)
            assert key in data, f"{path}: ConfigMap {source['name']} has {sorted(data)}"
            return str(data[key])
    raise AssertionError(f"{path}: no ConfigMap volume is mounted above it")


def check_multihost(objs: Objects) -> None:
    check_schemas(objs)
    job = the_job(objs)
    name, spec, c = job["metadata"]["name"], pod_spec(job), container(job)
    js = job["spec"]
    assert js.get("completionMode") == "Indexed", "completionMode: Indexed (JOB_COMPLETION_INDEX = node rank)"
    assert spec.get("restartPolicy") == "Never", "restartPolicy: Never (a failed node pod is replaced)"

    # the command: python -m services.trainer.node with the entry point's own flags
    assert c["command"][:3] == ["python", "-m", "services.trainer.node"], c["command"]
    env = {e["name"]: e for e in c.get("env", [])}
    ref = env.get("TRAIN_JOB_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    assert ref == "metadata.labels['batch.kubernetes.io/job-name']", "TRAIN_JOB_NAME from the Job's name"
    argv = [a.replace("$(TRAIN_JOB_NAME)", name) for a in c["command"][3:]]
    try:
        args = node.parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"python -m services.trainer.node does not take {argv}") from e
    assert args.node_rank is None, "--node-rank is left to JOB_COMPLETION_INDEX"
    assert args.job_id == name, "the job id is the Job's name"

    # pod 0's DNS name: <job>-0.<subdomain>, a headless Service selecting the Job's pods
    services = of_kind(objs, "Service")
    sub = spec.get("subdomain")
    assert sub in services, f"subdomain {sub!r}: no Service of that name"
    svc = services[sub]["spec"]
    assert svc.get("clusterIP") == "None", f"Service {sub}: headless (clusterIP: None)"
    assert selects(svc["selector"], job["spec"]["template"]["metadata"]["labels"]), f"{sub} selects the pods"
    assert args.master_addr == f"{name}-0.{sub}", f"--master-addr {args.master_addr}: expected {name}-0.{sub}"
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert args.master_port in ports.values(), f"--master-port {args.master_port}: not a container port"
    assert all(p["targetPort"] in ports for p in svc["ports"]), f"{sub}: target ports {svc['ports']}"

    # the job file: deepspeed.nodes = completions = parallelism, and a node for every index
    job_spec = parse_job(yaml.safe_load(job_file(objs, job, str(args.job))))
    nodes = job_spec.deepspeed.nodes
    assert js.get("completions") == js.get("parallelism") == nodes, (
        f"completions {js.get('completions')}, parallelism {js.get('parallelism')}: expected "
        f"deepspeed.nodes {nodes}"
    )
    for index in range(nodes):
        planned = node.plan(args, job_spec, {"JOB_COMPLETION_INDEX": str(index)})
        assert planned.node_rank == index and planned.nnodes == nodes
    assert "MODALMESH_REDIS_URL" in container_env(objs, job), "node 0 records the job in Redis"

    # the trainer's image, non-root, limits
    trainer = of_kind(objs, "Deployment")["trainer"]
    assert c["image"] == container(trainer)["image"], f"image {c['image']}: the trainer's expected"
    limits, requests = c.get("resources", {}).get("limits", {}), c.get("resources", {}).get("requests", {})
    assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), "requests+limits"
    pod_sc, c_sc = spec.get("securityContext", {}), c.get("securityContext", {})
    assert c_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, "runAsNonRoot"
    assert c_sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, "a non-root uid"
    assert c_sc.get("allowPrivilegeEscalation") is False and c_sc.get("capabilities", {}).get("drop") == [
        "ALL"
    ], "no privilege escalation, capabilities dropped"

    # network policies: the nodes reach each other (any port), node 0 reaches Redis
    labels = job["spec"]["template"]["metadata"]["labels"]
    policies = list(of_kind(objs, "NetworkPolicy").values())

    def rules_admitting(target: dict[str, str]) -> list[dict[str, Any]]:
        """Ingress rules of the policies over `target` that admit the job's pods."""
        return [
            rule
            for p in policies
            if selects(p["spec"]["podSelector"], target)
            for rule in p["spec"].get("ingress", [])
            if any(selects(f.get("podSelector", {}), labels) for f in rule.get("from", []))
        ]

    assert any("ports" not in r for r in rules_admitting(labels)), (
        "no network policy lets the nodes reach each other on every port"
    )
    redis = of_kind(objs, "StatefulSet")["redis"]["spec"]["template"]["metadata"]["labels"]
    assert rules_admitting(redis), "no network policy lets the job's pods reach Redis"


@pytest.mark.parametrize("overlay", ["cpu-tiny", "gpu"])
def test_component_renders_valid_and_consistent(overlay: str, workdir: str) -> None:
    check_multihost(copy.deepcopy(list(_rendered(overlay, workdir))))


def _job(objs: Objects) -> dict[str, Any]:
    return the_job(objs)


MUTATIONS: dict[str, Callable[[Objects], None]] = {
    "not-indexed": lambda o: _job(o)["spec"].update(completionMode="NonIndexed"),
    "completions-not-nodes": lambda o: _job(o)["spec"].update(completions=3, parallelism=3),
    "unknown-flag": lambda o: container(_job(o))["command"].append("--nodes=2"),
    "rank-hard-coded": lambda o: container(_job(o))["command"].extend(["--node-rank", "0"]),
    "wrong-master": lambda o: container(_job(o))["command"].__setitem__(
        container(_job(o))["command"].index("--master-addr") + 1, "$(TRAIN_JOB_NAME)-0.trainer"
    ),
    "no-subdomain": lambda o: pod_spec(_job(o)).pop("subdomain"),
    "root": lambda o: pod_spec(_job(o))["securityContext"].update(runAsNonRoot=False),
    "no-limits": lambda o: container(_job(o))["resources"].pop("limits"),
    "no-peer-policy": lambda o: o.remove(of_kind(o, "NetworkPolicy")["trainer-multihost-peers"]),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_mistake_is_caught(mutation: str, workdir: str) -> None:
    objs = copy.deepcopy(list(_rendered("cpu-tiny", workdir)))
    MUTATIONS[mutation](objs)
    with pytest.raises(AssertionError):
        check_multihost(objs)


def test_component_is_documented() -> None:
    from tests.unit.deploy.compose_support import ROOT

    for doc in ("training.md", "deployment.md"):
        assert "components/multihost-training" in (ROOT / "docs" / doc).read_text(), doc
    assert COMPONENT.is_dir()
