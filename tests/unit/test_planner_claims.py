"""A trainer pod whose claim (a pvc:// base model, the model cache) does not exist stalls the run
with ClaimNotFound; creating the claim lets it start, so the run is not failed."""

from __future__ import annotations

from typing import Any

import pytest
from temper.planner import Observed, ObservedJob, plan

from tests.unit.test_planner import CONFIG, NOW, conds, sample_run
from tests.unit.test_planner_blocked import k8s_job

pytestmark = pytest.mark.unit

UNSCHEDULABLE = (
    '0/3 nodes are available: persistentvolumeclaim "weights" not found. preemption: 0/3 nodes are '
    "available: 3 Preemption is not helpful for scheduling."
)


def unscheduled_pod(message: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            ],
        },
    }


def test_missing_claim_stalls_the_run_naming_the_claim() -> None:
    seen = ObservedJob.from_k8s(k8s_job(), [unscheduled_pod(UNSCHEDULABLE)])
    assert (seen.waiting_reason, seen.waiting_message) == (
        "ClaimNotFound",
        "persistentvolumeclaim 'weights' not found",
    )
    p = plan(sample_run(baseModel={"uri": "pvc://weights/llama"}), Observed(jobs=[seen]), NOW, CONFIG)
    assert conds(p)["Stalled"] == ("True", "ClaimNotFound")
    assert conds(p)["Failed"][0] == "False"  # fixable: creating the claim lets the pod schedule
    assert "'weights' not found" in p.status["stages"][0]["message"]
    assert ("Warning", "ClaimNotFound") in [(e.type, e.reason) for e in p.events]


def test_other_scheduling_waits_are_not_stalls() -> None:
    busy = unscheduled_pod("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    assert ObservedJob.from_k8s(k8s_job(), [busy]).waiting_reason == ""
