"""The chart's security objects, rendered: the operator's NetworkPolicy (no CNI enforces it in
the hermetic cluster, so its content and selectors are checked here) and the admission policy's
bindings and the operator's copy of the policy."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_chart_helm import by_kind, one, render

pytestmark = pytest.mark.unit


def _env(objs: list[dict]) -> dict[str, str]:
    container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_network_policy_selects_the_operator_pod_only() -> None:
    objs = render()
    policy = one(objs, "NetworkPolicy")
    pod = one(objs, "Deployment")["spec"]["template"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/component"] == "operator"
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    named_ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    [ingress] = policy["spec"]["ingress"]
    assert {p["port"] for p in ingress["ports"]} == named_ports == {"metrics", "health"}
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_network_policy_egress_is_apiserver_storage_and_dns() -> None:
    egress = one(render(), "NetworkPolicy")["spec"]["egress"]
    ports = [sorted((p["port"], p["protocol"]) for p in rule["ports"]) for rule in egress]
    assert [(443, "TCP"), (6443, "TCP")] in ports
    assert [(443, "TCP"), (9000, "TCP")] in ports
    assert [(53, "TCP"), (53, "UDP")] in ports
    assert len(egress) == 3
    dns = next(r for r in egress if r["ports"][0]["port"] == 53)
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    pinned = render({"networkPolicy": {"egress": {"apiServer": {"cidrs": ["10.0.0.1/32"], "ports": [6443]}}}})
    api = one(pinned, "NetworkPolicy")["spec"]["egress"][0]
    assert api == {"ports": [{"port": 6443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}


def test_network_policy_can_be_switched_off() -> None:
    assert by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


def test_admission_policy_binds_watched_namespaces_only() -> None:
    cluster_wide = by_kind(render(), "ValidatingAdmissionPolicyBinding")
    assert [b["spec"].get("matchResources") for b in cluster_wide] == [None, None]
    assert {b["spec"]["validationActions"][0] for b in cluster_wide} == {"Deny"}
    namespaced = by_kind(
        render({"watchNamespaces": ["team-a", "team-b"]}), "ValidatingAdmissionPolicyBinding"
    )
    for binding in namespaced:
        [expr] = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
        assert expr == {
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": ["team-a", "team-b"],
        }
    off = render({"policy": {"admission": {"enabled": False}}})
    assert by_kind(off, "ValidatingAdmissionPolicy") == []


def test_operator_gets_the_same_policy() -> None:
    values = {"policy": {"allowedStorage": ["s3://ml/{namespace}/"], "maxGpusPerRun": 32}}
    policy = json.loads(_env(render(values))["TEMPER_POLICY"])
    assert policy["allowedStorage"] == ["s3://ml/{namespace}/"]
    assert policy["maxGpusPerRun"] == 32
    assert policy["defaultTrainerImage"].startswith("ghcr.io/temper/trainer:")
    assert "admission" not in policy
    from temper.policy import PlatformPolicy

    assert PlatformPolicy.model_validate(policy).max_gpus_per_run == 32


def test_operator_gets_the_trainer_network_settings() -> None:
    from temper.policy import TrainerNetwork

    settings = TrainerNetwork.model_validate(json.loads(_env(render())["TEMPER_TRAINER_NETWORK_POLICY"]))
    assert settings.enabled
    assert settings.storage.ports == (443, 9000)
    assert settings.hub.ports == (443,)
    assert settings.dns_pod_labels == {"k8s-app": "kube-dns"}
