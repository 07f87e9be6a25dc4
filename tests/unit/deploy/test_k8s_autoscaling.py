"""Offline checks of the autoscaling components in deploy/k8s/components/ (no cluster needed).

Rendered with `kubectl kustomize` (skipped where kubectl is missing): the `gpu-autoscaled`
overlay (gpu + autoscaling + trainer-keda), and cpu-tiny with both components through an
overlay written to a temporary folder. Kubernetes objects are validated against the 1.32
schemas in strict mode (kubernetes-validate, offline); KEDA's ScaledJob, a custom resource,
against tests/unit/deploy/data/keda-scaledjob.schema.json (a minimal schema written here, see
its README) with its job template validated as a batch/v1 Job. The rest ties the manifests to
the code and docs they depend on: the HPAs ask for metrics that prometheus-adapter-values.yaml's
rules serve, from series docs/metrics.md documents for that tier; the pods are scraped on their
metrics ports; the ScaledJob counts the Celery queue the worker consumes (queue_for), on the
Redis database the services use, and its worker takes one job and ends.

As in test_k8s.py, each check raises AssertionError on rendered objects, and
`test_each_check_fails_on_a_broken_copy` shows that it catches the mistake it is for.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.common.settings import Settings
from services.trainer.__main__ import parse_args
from services.trainer.jobs import queue_for
from tests.unit.deploy.compose_support import ROOT
from tests.unit.deploy.test_k8s import (
    K8S,
    K8S_VERSION,
    Objects,
    check_network_policies,
    check_schemas,
    container,
    container_ports,
    of_kind,
    render_dir,
    workloads,
)

COMPONENTS = K8S / "components"
ADAPTER_VALUES = COMPONENTS / "autoscaling" / "prometheus-adapter-values.yaml"
KEDA_SCHEMA = Path(__file__).parent / "data" / "keda-scaledjob.schema.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"
# Custom resources and the schema each is validated against; any other kind is Kubernetes'.
CUSTOM_KINDS = {"ScaledJob": KEDA_SCHEMA}
# The tiers the HPAs scale, and the docs/metrics.md section that documents their series.
HPA_TIERS = {"llm": "## LLM service", "encoders": "## Encoders and decoders"}
SCRAPED = {"llm", "encoders", "decoders"}
# Keys KEDA's redis scaler reads (keda.sh/docs/2.16/scalers/redis-lists/).
REDIS_SCALER_KEYS = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "usernameFromEnv",
    "passwordFromEnv",
}
CASES = ["gpu-autoscaled", "cpu-tiny-autoscaled"]


@cache
def _rendered(case: str) -> tuple[dict[str, Any], ...]:
    if case == "gpu-autoscaled":
        return tuple(render_dir(K8S / "overlays" / "gpu-autoscaled"))
    return tuple(_render_with_components("cpu-tiny"))


def _render_with_components(overlay: str) -> Objects:
    """`overlay` plus both components, through a kustomization in a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rel = Path(os.path.relpath(K8S, tmp))  # kustomize takes relative paths only
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [str(rel / "overlays" / overlay)],
                    "components": [str(rel / "components" / c) for c in ("autoscaling", "trainer-keda")],
                }
            )
        )
        return render_dir(Path(tmp))


def rendered(case: str) -> Objects:
    return copy.deepcopy(list(_rendered(case)))


@cache
def _plain(case: str) -> tuple[dict[str, Any], ...]:
    """The overlay the case starts from, without the components."""
    return tuple(render_dir(K8S / "overlays" / case.removesuffix("-autoscaled")))


def adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False, "only modalmesh's rules (rules.default: false)"
    return values["rules"]["custom"]


def hpa_metrics(hpa: dict[str, Any]) -> list[str]:
    names = []
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods", f"HPA {hpa['metadata']['name']}: per-pod metrics only, got {m['type']}"
        names.append(m["pods"]["metric"]["name"])
    return names


def doc_section(heading: str) -> str:
    text = METRICS_DOC.read_text()
    assert heading in text, f"docs/metrics.md has no section {heading!r}"
    rest = text.split(heading, 1)[1]
    return rest.split("\n## ", 1)[0]


def documented(series: str, section: str) -> bool:
    """`series` is in the section's tables, itself or as a histogram's _sum/_count/_bucket."""
    names = set(re.findall(r"`([a-z_:][a-z0-9_:]*)`", section))
    base = re.sub(r"_(sum|count|bucket)$", "", series)
    return series in names or base in names


def series_in(query: str) -> set[str]:
    """Metric names a PromQL template reads (identifiers followed by a `{` selector)."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query)) - {"sum", "rate", "clamp_min", "by"}


def expand(template: str, series: str) -> str:
    """A metricsQuery as prometheus-adapter fills it in for the pods of one namespace."""
    return (
        template.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="modalmesh",pod=~"llm-a|llm-b"')
        .replace("<<.GroupBy>>", "pod")
    )


def balanced(query: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r'"[^"]*"', '""', query):  # brackets inside label values do not count
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def scaled_job(objs: Objects) -> dict[str, Any]:
    jobs = list(of_kind(objs, "ScaledJob").values())
    assert len(jobs) == 1, f"one ScaledJob expected, got {len(jobs)}"
    return jobs[0]


# -- the checks ----------------------------------------------------------------------------------
def check_kubernetes_schemas(objs: Objects, _: str) -> None:
    """Kubernetes' own kinds; a custom kind missing from CUSTOM_KINDS fails here (no schema)."""
    check_schemas([o for o in objs if o["kind"] not in CUSTOM_KINDS])


def check_scaledjob_schema(objs: Objects, _: str) -> None:
    import kubernetes_validate

    sj = scaled_job(objs)
    schema = json.loads(KEDA_SCHEMA.read_text())
    errors = [
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(sj)
    ]
    assert not errors, "ScaledJob does not match keda-scaledjob.schema.json:\n" + "\n".join(errors)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "x"},
        "spec": sj["spec"]["jobTargetRef"],
    }
    try:
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"ScaledJob jobTargetRef: {'/'.join(map(str, e.path))}: {e.message}") from e
    for trigger in sj["spec"]["triggers"]:
        if trigger["type"] == "redis":
            extra = set(trigger["metadata"]) - REDIS_SCALER_KEYS
            assert not extra, f"keys KEDA's redis scaler does not read: {extra}"


def check_hpas(objs: Objects, _: str) -> None:
    hpas = of_kind(objs, "HorizontalPodAutoscaler")
    assert set(hpas) == set(HPA_TIERS), f"HPAs for {set(HPA_TIERS)}, got {set(hpas)}"
    deployments = {n: w for n, w in workloads(objs).items() if w["kind"] == "Deployment"}
    for name, hpa in hpas.items():
        spec = hpa["spec"]
        target = spec["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, f"HPA {name}: {target}"
        deployment = deployments[target["name"]]
        assert hpa["metadata"].get("namespace") == deployment["metadata"]["namespace"], (
            f"HPA {name}: namespace"
        )
        assert "replicas" not in deployment["spec"], f"{target['name']}: replicas is the HPA's to set"
        assert 1 <= spec["minReplicas"] < spec["maxReplicas"], f"HPA {name}: replica bounds"
        down = spec["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300, f"HPA {name}: scale down slowly"
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), (
            f"HPA {name}: scale down one pod at a time"
        )


def check_scraping(objs: Objects, _: str) -> None:
    for name in SCRAPED:
        w = workloads(objs)[name]
        notes = w["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true", f"{name}: not scraped"
        assert int(notes["prometheus.io/port"]) == container_ports(w)["metrics"], f"{name}: scrape port"
        assert notes.get("prometheus.io/path") == "/metrics", f"{name}: scrape path"
    policy = of_kind(objs, "NetworkPolicy")["metrics-from-monitoring"]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {"metrics"}, f"Prometheus may reach only the metrics ports, got {allowed}"
    check_network_policies(objs)


def check_adapter_rules(objs: Objects, _: str) -> None:
    """Every HPA metric is served by one rule, and every rule's series is documented for its tier."""
    rules = adapter_rules()
    served: dict[str, dict[str, Any]] = {}
    for rule in rules:
        for needed in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert needed in rule["metricsQuery"], f"rule {rule['name']['as']}: no {needed}"
        expanded = expand(rule["metricsQuery"], "s")
        assert balanced(expanded), f"rule {rule['name']['as']}: unbalanced brackets in {expanded}"
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }, "series map to pods by their namespace and pod labels"
        source = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*\}", rule["seriesQuery"])
        assert source, f"seriesQuery {rule['seriesQuery']!r}: one metric name and its labels"
        assert re.fullmatch(rule["name"]["matches"], source[1]), f"{rule['name']} does not match {source[1]}"
        served[rule["name"]["as"]] = {**rule, "_source": source[1]}
    hpas = of_kind(objs, "HorizontalPodAutoscaler")
    asked = {m: name for name, hpa in hpas.items() for m in hpa_metrics(hpa)}
    assert set(asked) == set(served), f"HPA metrics {set(asked)} != adapter rule outputs {set(served)}"
    autoscaling_doc = doc_section("## Custom metrics for autoscaling")
    for metric, tier in asked.items():
        section = doc_section(HPA_TIERS[tier])
        rule = served[metric]
        for series in {rule["_source"]} | series_in(
            rule["metricsQuery"].replace("<<.Series>>", rule["_source"])
        ):
            assert documented(series, section), (
                f"{series} (for {metric}) is not in {HPA_TIERS[tier]} of docs/metrics.md"
            )
        assert f"`{metric}`" in autoscaling_doc, f"custom metric {metric} is not in docs/metrics.md"


def check_trainer_keda(objs: Objects, case: str) -> None:
    sj = scaled_job(objs)
    plain = list(_plain(case))
    deployment = workloads(plain)["trainer"]
    assert "trainer" not in workloads(objs), "the ScaledJob replaces the trainer Deployment"
    assert "trainer" not in of_kind(objs, "PodDisruptionBudget"), "no PDB for a removed Deployment"
    assert sj["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    # The queue: the worker's hardware class, as the worker itself names its queue.
    env = {e["name"]: e.get("value") for e in container(deployment).get("env", [])}
    redis = next(t["metadata"] for t in sj["spec"]["triggers"] if t["type"] == "redis")
    assert redis["listName"] == queue_for(env["MODALMESH_TRAINER_HARDWARE"]), (
        f"KEDA counts {redis['listName']}, the worker consumes {queue_for(env['MODALMESH_TRAINER_HARDWARE'])}"
    )
    # The Redis: the services' MODALMESH_REDIS_URL, reached from KEDA's namespace.
    env_map = next(v for k, v in of_kind(objs, "ConfigMap").items() if k.startswith("modalmesh-env"))
    url = env_map["data"]["MODALMESH_REDIS_URL"]
    m = re.fullmatch(r"redis://([^:/]+):(\d+)/(\d+)", url)
    assert m, f"MODALMESH_REDIS_URL {url!r}"
    service = of_kind(objs, "Service")[m[1]]
    assert redis["address"] == f"{m[1]}.{service['metadata']['namespace']}.svc:{m[2]}", redis["address"]
    assert redis["databaseIndex"] == m[3], f"database {redis['databaseIndex']}, the services use {m[3]}"
    assert redis["listLength"] == "1", "one Job per waiting job"
    # Never kill a running job: jobs are only created; one job per worker; no deadline.
    spec = sj["spec"]
    assert spec["rollout"]["strategy"] == "gradual", "an update of the ScaledJob must not delete running Jobs"
    assert spec["scalingStrategy"]["strategy"] == "accurate", "the list holds only jobs nobody took"
    job = spec["jobTargetRef"]
    assert "activeDeadlineSeconds" not in job, "a deadline would kill a long training job"
    pod = job["template"]
    c = container({"spec": {"template": pod}})
    _, lifetime = parse_args(c["args"])
    assert lifetime.max_jobs == 1, "a Job's worker takes one job"
    settings = Settings()
    assert lifetime.idle_exit_s is not None
    assert lifetime.idle_exit_s > settings.trainer_lease_s + settings.trainer_recover_interval_s, (
        "a pod started for a lost job must outlive its lease to requeue it"
    )
    assert pod["spec"]["restartPolicy"] == "Never"
    # Otherwise the Deployment's pod: same image, command, env, resources, volumes, probes.
    same = copy.deepcopy(pod)
    same["spec"].pop("restartPolicy")
    c = same["spec"]["containers"][0]
    c.pop("args")
    same["metadata"].pop("annotations")
    assert same == deployment["spec"]["template"], "the Job's pod drifted from the trainer Deployment's"
    keda = of_kind(objs, "NetworkPolicy")["redis-from-keda"]
    assert keda["metadata"]["namespace"] == service["metadata"]["namespace"]


CHECKS: dict[str, Callable[[Objects, str], None]] = {
    "kubernetes-schemas": check_kubernetes_schemas,
    "scaledjob-schema": check_scaledjob_schema,
    "hpas": check_hpas,
    "scraping": check_scraping,
    "adapter-rules": check_adapter_rules,
    "trainer-keda": check_trainer_keda,
}


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("check", list(CHECKS))
def test_rendered_components_pass(check: str, case: str) -> None:
    CHECKS[check](rendered(case), case)


def _hpa(objs: Objects, name: str) -> dict[str, Any]:
    return of_kind(objs, "HorizontalPodAutoscaler")[name]


def _set(fn: Callable[[Objects], None]) -> Callable[[Objects], Objects]:
    def apply(objs: Objects) -> Objects:
        fn(objs)
        return objs

    return apply


def _redis_trigger(objs: Objects) -> dict[str, str]:
    return scaled_job(objs)["spec"]["triggers"][0]["metadata"]


MUTATIONS: dict[str, tuple[str, Callable[[Objects], Objects]]] = {
    "hpa-typo": ("kubernetes-schemas", _set(lambda o: _hpa(o, "llm")["spec"].update(maxReplica=3))),
    "sj-typo": ("scaledjob-schema", _set(lambda o: scaled_job(o)["spec"].update(maxReplicas=3))),
    "sj-int-metadata": ("scaledjob-schema", _set(lambda o: _redis_trigger(o).update(databaseIndex=0))),
    "sj-job-typo": (
        "scaledjob-schema",
        _set(lambda o: scaled_job(o)["spec"]["jobTargetRef"].update(backOffLimit=3)),
    ),
    "sj-redis-key": ("scaledjob-schema", _set(lambda o: _redis_trigger(o).update(list="train.gpu"))),
    "hpa-target": (
        "hpas",
        _set(lambda o: _hpa(o, "encoders")["spec"]["scaleTargetRef"].update(name="encoder")),
    ),
    "replicas-kept": ("hpas", _set(lambda o: workloads(o)["llm"]["spec"].update(replicas=1))),
    "fast-scale-down": (
        "hpas",
        _set(lambda o: _hpa(o, "llm")["spec"]["behavior"]["scaleDown"].update(stabilizationWindowSeconds=0)),
    ),
    "scrape-port": (
        "scraping",
        _set(
            lambda o: workloads(o)["encoders"]["spec"]["template"]["metadata"]["annotations"].update(
                {"prometheus.io/port": "8100"}
            )
        ),
    ),
    "metric-name": (
        "adapter-rules",
        _set(lambda o: _hpa(o, "llm")["spec"]["metrics"][0]["pods"]["metric"].update(name="requests_held")),
    ),
    "queue": ("trainer-keda", _set(lambda o: _redis_trigger(o).update(listName="train"))),
    "redis-db": ("trainer-keda", _set(lambda o: _redis_trigger(o).update(databaseIndex="1"))),
    "rollout": ("trainer-keda", _set(lambda o: scaled_job(o)["spec"]["rollout"].update(strategy="default"))),
    "many-jobs": (
        "trainer-keda",
        _set(
            lambda o: scaled_job(o)["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0].update(
                args=[]
            )
        ),
    ),
    "drift": (
        "trainer-keda",
        _set(
            lambda o: scaled_job(o)["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0].update(
                image="modalmesh/trainer:latest"
            )
        ),
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_check_fails_on_a_broken_copy(mutation: str) -> None:
    check, mutate = MUTATIONS[mutation]
    with pytest.raises(AssertionError):
        CHECKS[check](mutate(rendered("gpu-autoscaled")), "gpu-autoscaled")


def test_every_check_has_a_mutation() -> None:
    assert {check for check, _ in MUTATIONS.values()} == set(CHECKS)


def test_an_undocumented_series_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "metrics.md"
    doc.write_text(METRICS_DOC.read_text().replace("`modalmesh_llm_requests_held`", "`requests_held`"))
    monkeypatch.setattr(f"{__name__}.METRICS_DOC", doc)
    with pytest.raises(AssertionError, match="modalmesh_llm_requests_held"):
        check_adapter_rules(rendered("gpu-autoscaled"), "gpu-autoscaled")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[2m])) by (<<.GroupBy>>) / 1e6", "[2m]) by (<<.GroupBy>>) / 1e6", "unbalanced"),
        ("as: modalmesh_llm_requests_held", "as: llm_requests_held", "adapter rule outputs"),
        ("default: false", "default: true", "only modalmesh's rules"),
    ],
)
def test_a_broken_adapter_rule_is_caught(
    old: str, new: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = tmp_path / "values.yaml"
    text = ADAPTER_VALUES.read_text()
    assert old in text
    values.write_text(text.replace(old, new, 1))
    monkeypatch.setattr(f"{__name__}.ADAPTER_VALUES", values)
    with pytest.raises(AssertionError, match=message):
        check_adapter_rules(rendered("gpu-autoscaled"), "gpu-autoscaled")


def test_the_plain_overlays_have_no_autoscaling() -> None:
    """Autoscaling is opt-in: gpu and cpu-tiny render without HPAs, KEDA objects or annotations."""
    for overlay in ("gpu", "cpu-tiny"):
        objs = list(_plain(overlay))
        assert not of_kind(objs, "HorizontalPodAutoscaler") and not of_kind(objs, "ScaledJob"), overlay


def test_docs_walk_through_names_the_autoscaling_steps() -> None:
    text = (ROOT / "docs" / "deployment.md").read_text()
    for needed in (
        "kubectl kustomize deploy/k8s/overlays/gpu-autoscaled",
        "prometheus-adapter-values.yaml",
        "kubectl get hpa",
        "kubectl get scaledjob",
        "--max-jobs 1",
        "lease",
    ):
        assert needed in text, f"docs/deployment.md does not mention {needed}"
