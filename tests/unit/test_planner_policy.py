"""The operator re-checks the platform policy before it creates anything, and creates the run's
trainer NetworkPolicy with its first Job."""

from __future__ import annotations

from dataclasses import replace

import pytest
from temper.planner import Observed, plan
from temper.policy import PlatformPolicy, TrainerNetwork

from tests.unit.test_planner import CONFIG, NOW, conds, sample_run, with_status

pytestmark = pytest.mark.unit

POLICY = PlatformPolicy(allowedStorage=("s3://bucket/{namespace}/",), defaultTrainerImage="trainer:test")


def test_a_run_outside_the_policy_creates_nothing_and_stalls_naming_the_field() -> None:
    run = sample_run(trainer={"image": "evil.example/miner:1"})
    p = plan(run, Observed(), NOW, replace(CONFIG, policy=POLICY))
    assert p.create == []
    assert conds(p)["Stalled"] == ("True", "PolicyViolation")
    stalled = next(c for c in p.status["conditions"] if c["type"] == "Stalled")
    assert "spec.trainer.image:" in stalled["message"]
    assert "spec.storage.uri:" in stalled["message"]  # s3://bucket/runs/r1/ is not under bucket/<ns>/
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "PolicyViolation")]
    again = plan(with_status(run, p), Observed(), NOW, replace(CONFIG, policy=POLICY))
    assert again.events == []  # no second event for the same refusal


def test_a_run_inside_the_policy_starts() -> None:
    run = sample_run()
    run["metadata"]["namespace"] = "runs"
    p = plan(run, Observed(), NOW, replace(CONFIG, policy=POLICY.model_copy(update={"allowed_storage": ()})))
    assert [o["kind"] for o in p.create] == ["Job"]


def test_the_trainer_network_policy_comes_with_the_first_job() -> None:
    config = replace(CONFIG, trainer_network=TrainerNetwork(enabled=True))
    p = plan(sample_run(), Observed(), NOW, config)
    assert [o["kind"] for o in p.create] == ["NetworkPolicy", "Job"]
    network, job = p.create
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert network["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
