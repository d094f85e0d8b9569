"""values.schema.json: helm rejects typos and wrong types, naming the field; schema, values and docs agree."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from tests.unit.test_chart_helm import CHART, ROOT, render, render_error

pytestmark = pytest.mark.unit

SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())

# Objects whose keys are free by nature (label/annotation maps, resource quantities) or whose
# contents are Kubernetes types validated by the API server. Everything else is closed.
FREE_FORM = {
    "commonLabels",
    "serviceAccount.annotations",
    "podAnnotations",
    "podLabels",
    "nodeSelector",
    "resources.requests",
    "resources.limits",
    "trainer.resources.requests",
    "trainer.resources.limits",
    "metrics.service.annotations",
    "metrics.serviceMonitor.labels",
    "metrics.podMonitor.labels",
    "metrics.prometheusRule.labels",
    "metrics.dashboard.labels",
    "networkPolicy.egress.dns.namespaceLabels",
    "networkPolicy.egress.dns.podLabels",
    "metrics.dashboard.annotations",
}
KUBERNETES_OBJECTS = {
    "affinity.nodeAffinity",
    "affinity.podAffinity",
    "affinity.podAntiAffinity",
    "operator.extraEnv[].valueFrom",
    "topologySpreadConstraints[].labelSelector",
    "networkPolicy.metricsFrom[]",
    "networkPolicy.extraEgress[]",
}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"replicaCont": 2}, "additional properties 'replicaCont' not allowed"),
        ({"operator": {"logLevl": "debug"}}, "at '/operator': additional properties 'logLevl' not allowed"),
        (
            {"metrics": {"serviceMonitor": {"enable": True}}},
            "at '/metrics/serviceMonitor': additional properties 'enable' not allowed",
        ),
        (
            {"storage": {"endpointUrl": "http://x"}},
            "at '/storage': additional properties 'endpointUrl' not allowed",
        ),
        ({"tolerations": [{"key": "a", "efect": "NoSchedule"}]}, "at '/tolerations/0'"),
    ],
    ids=["top-level", "nested", "deep", "storage", "in-list"],
)
def test_typo_fails_and_names_the_field(values: dict[str, Any], expected: str) -> None:
    assert expected in render_error(values)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"storage": {"credentialsSecret": "Bad_Name"}}, "/storage/credentialsSecret"),
        ({"storage": {"endpoint": "minio:9000"}}, "/storage/endpoint"),
        ({"trainer": {"gpuResourceName": "gpu"}}, "/trainer/gpuResourceName"),
        ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
        (
            {"metrics": {"prometheusRule": {"disabledAlerts": ["TemperRunFialed"]}}},
            "/metrics/prometheusRule/disabledAlerts/0",
        ),
        (
            {"metrics": {"prometheusRule": {"stageStuckFor": "30 minutes"}}},
            "/metrics/prometheusRule/stageStuckFor",
        ),
        (
            {"metrics": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
            "/metrics/dashboard/labels/grafana_dashboard",
        ),
        ({"strategy": {"type": "BlueGreen"}}, "/strategy/type"),
        ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_wrong_type_or_value_fails_and_names_the_field(values: dict[str, Any], field: str) -> None:
    assert f"at '{field}'" in render_error(values)


def test_required_service_account_name_is_named() -> None:
    assert "serviceAccount.name is required" in render_error({"serviceAccount": {"create": False}})


def test_valid_overrides_are_accepted() -> None:
    values = {
        "watchNamespaces": ["team-a"],
        "image": {"digest": "sha256:" + "0" * 64},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
        "securityContext": {"runAsUser": None},
        "resources": {"requests": {"cpu": 0.5, "memory": "1Gi"}},
        "operator": {"extraEnv": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        "metrics": {"prometheusRule": {"disabledAlerts": ["TemperGateFailed"], "stageStuckFor": "1h30m"}},
    }
    assert render(values)


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}" if path else key)
    items = node.get("items")
    if isinstance(items, dict):
        yield from _walk(items, f"{path}[]")


def test_every_object_in_the_schema_is_closed() -> None:
    objects = [(path, node) for path, node in _walk(SCHEMA, "") if "object" in node.get("type", [])]
    assert len(objects) > 30
    seen_free, seen_k8s = set(), set()
    for path, node in objects:
        if path in FREE_FORM:
            # Free keys, but typed values: a label value must still be a string.
            assert isinstance(node.get("additionalProperties"), dict), path
            seen_free.add(path)
        elif path in KUBERNETES_OBJECTS:
            seen_k8s.add(path)
        else:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
    assert seen_free == FREE_FORM
    assert seen_k8s == KUBERNETES_OBJECTS


def _leaf_paths(values: Any, path: str = "") -> Iterator[str]:
    if isinstance(values, dict) and values and path not in FREE_FORM:
        for key, child in values.items():
            yield from _leaf_paths(child, f"{path}.{key}" if path else key)
    else:
        yield path


def test_defaults_are_valid_and_complete() -> None:
    jsonschema.validate(DEFAULTS, SCHEMA)
    nodes = {path: node for path, node in _walk(SCHEMA, "") if path and "[]" not in path}
    leaves = {p for p, node in nodes.items() if not node.get("properties") or p in FREE_FORM}
    defaults = set(_leaf_paths(DEFAULTS))
    # Every default is typed, and every typed value has a default in values.yaml (affinity's
    # parts and the probes' successThreshold are the only optional ones).
    assert defaults <= set(nodes)
    missing = {p for p in leaves - defaults if not p.startswith("affinity.")}
    assert missing == {"livenessProbe.successThreshold", "readinessProbe.successThreshold"}


def test_every_value_is_documented() -> None:
    documented: set[str] = set()
    in_values_table = False
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        if not line.startswith("|"):
            in_values_table = False
        elif line.startswith("| value |"):
            in_values_table = True
        elif in_values_table and (match := re.match(r"^\|\s*`([^`]+)`", line)):
            documented.add(match.group(1))
    undocumented = set(_leaf_paths(DEFAULTS)) - documented
    assert not undocumented, f"add to docs/configuration.md: {sorted(undocumented)}"
    unknown = {d for d in documented if d not in set(_leaf_paths(DEFAULTS))}
    assert not unknown, f"docs/configuration.md documents values that do not exist: {sorted(unknown)}"
