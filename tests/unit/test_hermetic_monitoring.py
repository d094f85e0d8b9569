"""Pure parts of the Kueue and Prometheus harness: webhook rewriting and scrape-config generation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from temper_dev.kueue import MANAGED_SELECTOR, loopback_webhooks, manager_config
from temper_dev.prometheus import endpoints_target_group, pod_monitor_jobs, service_monitor_jobs

from tests.fixtures.prometheus import render_monitoring

pytestmark = pytest.mark.unit


def _hook(name: str, group: str) -> dict[str, object]:
    return {
        "name": name,
        "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": f"/p-{name}"}},
        "rules": [{"apiGroups": [group], "resources": ["x"]}],
    }


def test_kueue_webhooks_go_to_loopback_and_only_for_integrations_that_run() -> None:
    manifests = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutating-webhook-configuration"},
            "webhooks": [_hook("mjob", "batch"), _hook("mcq", "kueue.x-k8s.io"), _hook("mpod", "")],
        }
    ]
    (config,) = loopback_webhooks(manifests, 9443)
    assert config["metadata"]["name"] == "kueue-mutating-webhook-configuration"  # the rotator's name
    hooks = {h["name"]: h for h in config["webhooks"]}
    assert set(hooks) == {"mjob", "mcq"}  # no pod integration runs here
    assert hooks["mjob"]["clientConfig"] == {"url": "https://127.0.0.1:9443/p-mjob"}
    assert hooks["mjob"]["namespaceSelector"] == MANAGED_SELECTOR
    assert "namespaceSelector" not in hooks["mcq"]


def test_kueue_manager_binds_loopback_and_manages_only_opted_in_namespaces() -> None:
    cfg = manager_config({"health": 1, "metrics": 2, "webhook": 3}, Path("/certs"))
    assert cfg["health"]["healthProbeBindAddress"] == "127.0.0.1:1"
    assert cfg["metrics"]["bindAddress"] == "127.0.0.1:2"
    assert cfg["webhook"] == {"port": 3, "host": "127.0.0.1", "certDir": "/certs"}
    assert cfg["internalCertManagement"]["enable"] is True
    assert cfg["managedJobsNamespaceSelector"] == MANAGED_SELECTOR
    assert cfg["featureGates"] == {"VisibilityOnDemand": False}


def test_pod_monitor_job_is_what_prometheus_operator_generates() -> None:
    (monitor,) = render_monitoring("team-a")["PodMonitor"]
    (job,) = pod_monitor_jobs(monitor, {"api_server": "https://127.0.0.1:1"})
    assert job["job_name"] == "podMonitor/team-a/temper-trainers/0"
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "api_server": "https://127.0.0.1:1"}]  # any: true
    rules = job["relabel_configs"]
    assert {
        "action": "keep",
        "source_labels": ["__meta_kubernetes_pod_labelpresent_temper_dev_run"],
        "regex": "true",
    } in rules
    assert {
        "action": "keep",
        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
        "regex": "metrics",
    } in rules
    assert {"target_label": "job", "replacement": "team-a/temper-trainers"} in rules
    # The chart's own relabelings, in Prometheus' spelling, after the operator's.
    assert {"source_labels": ["__meta_kubernetes_pod_label_temper_dev_run"], "target_label": "run"} in rules
    assert rules[-2]["action"] == "hashmod"


def test_service_monitor_job_keeps_only_the_chart_service_metrics_port() -> None:
    objs = render_monitoring("team-a")
    (monitor,) = objs["ServiceMonitor"]
    (job,) = service_monitor_jobs(monitor, Path("/sd.json"))
    assert job["honor_labels"] is True  # temper_run_* keep the run's namespace, not the operator's
    keeps = [
        r
        for r in job["relabel_configs"]
        if r.get("action") == "keep" and r["source_labels"] != ["__tmp_hash"]
    ]
    assert {
        "action": "keep",
        "source_labels": ["__meta_kubernetes_endpoint_port_name"],
        "regex": "metrics",
    } in keeps
    service = next(s for s in objs["Service"] if s["metadata"]["name"] == "temper-metrics")
    (group,) = endpoints_target_group(service, "127.0.0.1:9090", "temper-0")["groups"]
    # Every keep rule matches the Service's endpoint: the target survives relabeling.
    for rule in keeps:
        values = ";".join(group["labels"].get(label, "") for label in rule["source_labels"])
        assert re.fullmatch(rule["regex"], values), (rule, values)
