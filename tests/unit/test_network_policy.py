"""The per-run NetworkPolicy builder (temper.builders.network): selectors match the pods the Job
builder makes, and the rules are what docs/security.md promises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from temper.api.run import PostTrainingRun
from temper.builders.job import owner_reference, stage_labels
from temper.builders.network import trainer_network_policy
from temper.policy import NETWORK_ENV, TrainerNetwork

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> PostTrainingRun:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    raw["metadata"].update(namespace="team-a", uid="0f1e2d3c-aaaa-bbbb-cccc-000000000001")
    return PostTrainingRun.model_validate(raw)


ON = TrainerNetwork(
    enabled=True,
    metricsFrom=({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},),
    storage={"cidrs": ("10.20.0.0/16",), "ports": (9000,)},
    hub={"cidrs": (), "ports": (443,)},
)


def test_selects_the_runs_trainer_pods_only() -> None:
    run = quickstart()
    policy = trainer_network_policy(run, ON, 9400, owner_reference(run))
    assert policy is not None
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= stage_labels(run, "sft", 1, 1).items()
    assert policy["metadata"]["ownerReferences"][0]["uid"] == run.metadata["uid"]
    [peers, metrics] = policy["spec"]["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": selector}}]}
    assert metrics["ports"] == [{"port": 9400, "protocol": "TCP"}]


def test_egress_is_peers_dns_storage_and_hub() -> None:
    run = quickstart()
    policy = trainer_network_policy(run, ON, 9400, owner_reference(run))
    assert policy is not None
    peers, dns, storage, hub = policy["spec"]["egress"]
    assert peers["to"][0]["podSelector"] == policy["spec"]["podSelector"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert storage == {
        "ports": [{"port": 9000, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
    }
    assert hub == {"ports": [{"port": 443, "protocol": "TCP"}]}


def test_off_by_setting_and_read_from_the_chart_env() -> None:
    run = quickstart()
    assert trainer_network_policy(run, TrainerNetwork(), 9400, owner_reference(run)) is None
    env = {NETWORK_ENV: json.dumps({"enabled": True, "storage": {"cidrs": [], "ports": [443]}})}
    assert TrainerNetwork.from_env(env).storage.ports == (443,)
