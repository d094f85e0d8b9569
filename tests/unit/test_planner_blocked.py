"""A trainer pod that can never start (missing Secret, bad image) stalls the run with the cause named."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from temper.planner import Observed, ObservedJob, plan

from tests.unit.test_planner import CONFIG, NOW, conds, job, sample_run, with_status

pytestmark = pytest.mark.unit

SECRET_MISSING = 'couldn\'t find key AWS_ACCESS_KEY_ID in Secret ml/s3-creds: secret "s3-creds" not found'


def k8s_job(name: str = "r1-sft-c1-a1") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"temper.dev/stage": "sft", "temper.dev/attempt": "1", "temper.dev/cycle": "1"},
        },
        "spec": {"suspend": False},
        "status": {"active": 1},
    }


def pod(container: str, reason: str, message: str = "", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p"}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T11:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "containerStatuses": [
                {"name": container, "state": {"waiting": {"reason": reason, "message": message}}}
            ]
        },
    }


def blocked_job(reason: str, message: str) -> ObservedJob:
    return ObservedJob.from_k8s(k8s_job(), [pod("trainer", reason, message)])


def test_observed_job_reads_stuck_waiting_reason_of_the_trainer_only() -> None:
    seen = blocked_job("CreateContainerConfigError", SECRET_MISSING)
    assert (seen.waiting_reason, seen.waiting_message) == ("CreateContainerConfigError", SECRET_MISSING)
    # Normal start-up states, sidecars and pods on their way out are not "stuck".
    for pods in (
        [pod("trainer", "ContainerCreating")],
        [pod("sidecar", "ImagePullBackOff")],
        [pod("trainer", "ImagePullBackOff", deleting=True)],
        [],
    ):
        assert ObservedJob.from_k8s(k8s_job(), pods).waiting_reason == ""


def test_missing_secret_stalls_the_run_with_secret_not_found() -> None:
    run = sample_run()
    p = plan(run, Observed(jobs=[blocked_job("CreateContainerConfigError", SECRET_MISSING)]), NOW, CONFIG)
    c = {x["type"]: x for x in p.status["conditions"]}
    assert (c["Stalled"]["status"], c["Stalled"]["reason"]) == ("True", "SecretNotFound")
    assert 's3-creds" not found' in c["Stalled"]["message"]
    assert "stage sft" in c["Stalled"]["message"]
    assert conds(p)["Reconciling"] == ("False", "SecretNotFound")
    assert conds(p)["Ready"] == ("False", "SecretNotFound")
    assert conds(p)["Failed"][0] == "False"  # fixable: creating the Secret lets the pod start
    assert p.phase == "Pending"
    assert p.status["phase"] == "Pending"
    sft = p.status["stages"][0]
    assert sft["state"] == "Pending"
    assert sft["message"].startswith("attempt 1 blocked: pod CreateContainerConfigError")
    assert p.running is None  # nothing to poll progress from
    assert p.create == []
    assert ("Warning", "SecretNotFound") in [(e.type, e.reason) for e in p.events]
    # The next pass with the same world writes the same status and no second event.
    again = plan(
        with_status(run, p),
        Observed(jobs=[blocked_job("CreateContainerConfigError", SECRET_MISSING)]),
        NOW,
        CONFIG,
    )
    assert again.events == []
    assert again.status["conditions"] == p.status["conditions"]


def test_image_pull_backoff_stalls_with_the_waiting_reason() -> None:
    p = plan(
        sample_run(),
        Observed(jobs=[blocked_job("ImagePullBackOff", 'Back-off pulling image "x"')]),
        NOW,
        CONFIG,
    )
    assert conds(p)["Stalled"] == ("True", "ImagePullBackOff")
    assert 'pulling image "x"' in p.status["stages"][0]["message"]


def test_stall_clears_once_the_pod_starts() -> None:
    run = sample_run()
    stuck = plan(run, Observed(jobs=[blocked_job("CreateContainerConfigError", SECRET_MISSING)]), NOW, CONFIG)
    running = plan(with_status(run, stuck), Observed(jobs=[job("sft")]), NOW, CONFIG)
    assert conds(running)["Stalled"] == ("False", "StageRunning")
    assert conds(running)["Reconciling"] == ("True", "StageRunning")
    assert running.status["phase"] == "Running"
    assert running.running is not None


def test_suspended_run_is_suspended_not_stalled() -> None:
    p = plan(
        sample_run(suspend=True),
        Observed(jobs=[blocked_job("CreateContainerConfigError", SECRET_MISSING)]),
        NOW,
        CONFIG,
    )
    assert conds(p)["Suspended"] == ("True", "Suspended")
    assert conds(p)["Stalled"][0] == "False"


@pytest.mark.parametrize(
    ("observed_jobs", "expected"),
    [
        # (phase, Ready, Succeeded, Failed, Suspended, Reconciling, Stalled) per outcome
        ([], ("Running", "False", "Unknown", "False", "False", "True", "False")),
        (
            [job("sft", 3, outcome="Failed", reason="BackoffLimitExceeded")],
            ("Failed", "False", "False", "True", "False", "False", "True"),
        ),
    ],
)
def test_run_conditions_are_consistent_per_outcome(
    observed_jobs: list[ObservedJob], expected: tuple[str, ...]
) -> None:
    p = plan(sample_run(), Observed(jobs=observed_jobs), NOW, CONFIG)
    c = {x["type"]: x for x in p.status["conditions"]}
    got = (
        p.phase,
        *(c[t]["status"] for t in ("Ready", "Succeeded", "Failed", "Suspended", "Reconciling", "Stalled")),
    )
    assert got == expected
    # A False Stalled/Failed never carries a stale message; Ready always explains itself.
    for t in ("Stalled", "Failed"):
        if c[t]["status"] == "False":
            assert c[t]["message"] == ""
    assert c["Ready"]["message"]


def test_failed_attempt_whose_pod_never_started_stays_stalled_then_fails_naming_it() -> None:
    first = replace(
        job("sft", 1, outcome="Failed", reason="BackoffLimitExceeded", finished=NOW),
        waiting_reason="CreateContainerConfigError",
        waiting_message=SECRET_MISSING,
    )
    waiting = plan(sample_run(), Observed(jobs=[first]), NOW, CONFIG)
    assert conds(waiting)["Stalled"] == ("True", "SecretNotFound")
    assert waiting.status["stages"][0]["state"] == "Pending"
    assert "retry 1 of 2" in waiting.status["stages"][0]["message"]
    last = replace(
        job("sft", 3, outcome="Failed", reason="BackoffLimitExceeded"),
        waiting_reason="CreateContainerConfigError",
        waiting_message=SECRET_MISSING,
    )
    failed = plan(sample_run(), Observed(jobs=[last]), NOW, CONFIG)
    assert conds(failed)["Failed"] == ("True", "StageFailed")
    assert conds(failed)["Stalled"] == ("True", "SecretNotFound")
    message = next(c["message"] for c in failed.status["conditions"] if c["type"] == "Failed")
    assert 'secret "s3-creds" not found' in message


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            "InvalidInput: baseModel 'builtin://nope': unknown builtin model; known: ['builtin://tiny']",
            "BaseModelNotFound",
        ),
        ('storage: Could not connect to the endpoint URL: "http://127.0.0.1:1/b"', "StorageUnreachable"),
        (
            'EndpointConnectionError: Could not connect to the endpoint URL: "http://127.0.0.1:1/b/p.json"',
            "StorageUnreachable",
        ),
        ("storage: AccessDenied", "StorageError"),
        ("HubUnavailable: hf://org/m@main: the Hub is unavailable: ConnectError: refused", "HubUnreachable"),
        ("RuntimeError: CUDA out of memory", "StageFailed"),
    ],
)
def test_failed_stage_names_its_root_cause_on_stalled(error: str, cause: str) -> None:
    last = job("sft", 1, outcome="Failed", reason="PodFailurePolicy", result={"error": error})
    p = plan(sample_run(), Observed(jobs=[last]), NOW, CONFIG)
    assert conds(p)["Failed"] == ("True", "StageFailed")  # the documented Failed reason is kept
    assert conds(p)["Stalled"] == ("True", cause)
    assert error in p.status["stages"][0]["message"]
