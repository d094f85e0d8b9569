"""Pure builder for a run's NetworkPolicy: what its trainer pods may reach and be reached from.

Ingress: the run's own pods (torchrun's rendezvous and NCCL/gloo pick ports at run time), and
the metrics port from the monitoring peers. Egress: the run's own pods, DNS, and the storage and
hub endpoints the platform configured (CIDRs and ports; no CIDRs means any address on the ports).
"""

from __future__ import annotations

from typing import Any

from temper.api.run import PostTrainingRun
from temper.builders.names import LABEL_COMPONENT, LABEL_RUN_UID, label_value
from temper.policy import Endpoints, TrainerNetwork


def network_policy_name(run: PostTrainingRun) -> str:
    return f"{run.metadata['name'][:52]}-trainers"


def _to(endpoints: Endpoints) -> dict[str, Any]:
    rule: dict[str, Any] = {"ports": [{"port": p, "protocol": "TCP"} for p in endpoints.ports]}
    if endpoints.cidrs:
        rule["to"] = [{"ipBlock": {"cidr": c}} for c in endpoints.cidrs]
    return rule


def trainer_network_policy(
    run: PostTrainingRun, settings: TrainerNetwork, metrics_port: int, owner: dict[str, Any]
) -> dict[str, Any] | None:
    """The run's NetworkPolicy, or None when the platform switched them off."""
    if not settings.enabled:
        return None
    pods = {LABEL_RUN_UID: label_value(run.metadata.get("uid", "")), LABEL_COMPONENT: "trainer"}
    peers = [{"podSelector": {"matchLabels": pods}}]
    ingress: list[dict[str, Any]] = [{"from": peers}]
    if settings.metrics_from:
        ingress.append(
            {"from": list(settings.metrics_from), "ports": [{"port": metrics_port, "protocol": "TCP"}]}
        )
    dns = {
        "namespaceSelector": {"matchLabels": settings.dns_namespace_labels},
        "podSelector": {"matchLabels": settings.dns_pod_labels},
    }
    egress = [
        {"to": peers},
        {"to": [dns], "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
        _to(settings.storage),
        _to(settings.hub),
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(run),
            "namespace": run.metadata["namespace"],
            "labels": {LABEL_COMPONENT: "trainer-network"},
            "ownerReferences": [owner],
        },
        "spec": {
            "podSelector": {"matchLabels": pods},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }
