"""The pure planner: spec + observed children -> creates, patches, status, events. No cluster."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temper.api.contract import StageContract, StageProgress
from temper.builders.names import adapter_name, job_name
from temper.config import OperatorConfig
from temper.planner import Observed, ObservedAdapter, ObservedJob, Plan, backoff_seconds, plan

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
CONFIG = OperatorConfig(trainer_image="trainer:test", default_storage_endpoint="http://127.0.0.1:9000")


def sample_run(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "builtin://tiny"},
        "storage": {"uri": "s3://bucket/runs/r1/", "secretRef": {"name": "s3-creds"}},
        "datasets": [
            {
                "name": "tickets",
                "uri": "builtin://arith?n=16",
                "format": "prompt-completion",
                "task": "arith",
            },
            {"name": "prefs", "uri": "s3://bucket/prefs.jsonl", "format": "preference"},
            {"name": "heldout", "uri": "builtin://arith?n=8&split=eval"},
        ],
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": {"train": ["tickets"]},
                "retries": {"maxRetries": 2, "backoffSeconds": 10},
            },
            {"name": "align", "type": "dpo", "from": "sft", "data": {"train": ["prefs"]}},
            {
                "name": "regress",
                "type": "eval",
                "from": "align",
                "suites": [{"name": "old", "dataset": "heldout", "metric": "exact_match"}],
            },
        ],
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "temper.dev/v1alpha1",
        "kind": "PostTrainingRun",
        "metadata": {"name": "r1", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }


def job(
    stage: str,
    attempt: int = 1,
    *,
    outcome: str | None = None,
    reason: str = "",
    result: dict[str, Any] | None = None,
    finished: datetime | None = None,
    suspended: bool = False,
    disruptions: int = 0,
) -> ObservedJob:
    from temper.api.contract import StageResult

    return ObservedJob(
        name=job_name("r1", stage, 1, attempt),
        stage=stage,
        cycle=1,
        attempt=attempt,
        created=NOW - timedelta(minutes=10),
        outcome=outcome,  # type: ignore[arg-type]
        reason=reason,
        finished=finished or (NOW - timedelta(minutes=1) if outcome else None),
        result=StageResult.model_validate(result) if result is not None else None,
        suspended=suspended,
        disruptions=disruptions,
    )


def ready_adapter(stage: str, ready: str = "True", reason: str = "ArtifactVerified") -> ObservedAdapter:
    return ObservedAdapter(
        name=adapter_name("r1", stage, 1),
        manifest_uri=f"s3://bucket/runs/r1/g1/{stage}/manifest.json",
        ready=ready,
        reason=reason,
        run_uid="uid-1",  # type: ignore[arg-type]
    )


def conds(p: Plan) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in p.status["conditions"]}


def with_status(run: dict[str, Any], p: Plan) -> dict[str, Any]:
    out = copy.deepcopy(run)
    out["status"] = copy.deepcopy(p.status)
    return out


def created_kinds(p: Plan) -> list[tuple[str, str]]:
    return [(o["kind"], o["metadata"]["name"]) for o in p.create]


def test_fresh_run_creates_only_the_first_stage_job() -> None:
    p = plan(sample_run(), Observed(), NOW, CONFIG)
    assert created_kinds(p) == [("Job", "r1-sft-c1-a1")]
    assert conds(p)["Reconciling"] == ("True", "StageRunning")
    assert conds(p)["Succeeded"][0] == "Unknown"
    assert [s["state"] for s in p.status["stages"]] == ["Running", "Pending", "Pending"]
    assert p.status["observedGeneration"] == 1
    assert [e.reason for e in p.events] == ["StageStarted"]
    assert p.running is not None
    assert p.running.progress_uri == "s3://bucket/runs/r1/g1/sft/attempts/1/progress.json"


def test_replanning_an_observed_job_creates_nothing_and_keeps_status() -> None:
    run = sample_run()
    first = plan(run, Observed(), NOW, CONFIG)
    run = with_status(run, first)
    second = plan(run, Observed(jobs=[job("sft")]), NOW + timedelta(seconds=5), CONFIG)
    assert second.create == []
    assert second.events == []
    assert second.status["conditions"] == first.status["conditions"]  # lastTransitionTime kept
    # The whole status, startTime included (the Job's creationTimestamp differs from the planned
    # time), so the pass that first sees the Job writes nothing: idle runs cost no API writes.
    assert second.status == first.status


def test_completed_stage_publishes_adapter_then_next_stage_gets_parent() -> None:
    run = sample_run()
    done = job(
        "sft",
        outcome="Complete",
        result={"manifestUri": "s3://bucket/runs/r1/g1/sft/manifest.json", "metrics": {"train_loss": 0.9}},
    )
    p = plan(run, Observed(jobs=[done]), NOW, CONFIG)
    assert created_kinds(p) == [("Adapter", "r1-sft-g1")]
    adapter = p.create[0]
    assert adapter["spec"]["artifact"]["uri"] == "s3://bucket/runs/r1/g1/sft/manifest.json"
    assert "ownerReferences" not in adapter["metadata"]
    assert adapter["metadata"]["labels"]["temper.dev/stage"] == "sft"
    assert p.status["stages"][0]["state"] == "Running"  # not done until the Adapter verifies
    assert p.status["stages"][0]["metrics"] == {"train_loss": 0.9}

    p2 = plan(
        with_status(run, p), Observed(jobs=[done], adapters={"r1-sft-g1": ready_adapter("sft")}), NOW, CONFIG
    )
    assert created_kinds(p2) == [("Job", "r1-align-c1-a1")]
    contract = StageContract.from_env(
        p2.create[0]["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    )
    assert contract.parent is not None
    assert contract.parent.manifest_uri.endswith("/g1/sft/manifest.json")
    assert contract.parent.name == "r1-sft-g1"
    assert {e.reason for e in p2.events} == {"StageSucceeded", "StageStarted"}
    assert p2.transitions[0].result == "Succeeded"
    assert p2.transitions[0].stage_type == "sft"


def test_all_stages_done_sets_succeeded_and_ready() -> None:
    run = sample_run()
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": "s3://bucket/runs/r1/g1/sft/manifest.json"}),
        job(
            "align", outcome="Complete", result={"manifestUri": "s3://bucket/runs/r1/g1/align/manifest.json"}
        ),
        job("regress", outcome="Complete", result={"metrics": {"suite/old/exact_match": 0.5}}),
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"))}
    p = plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG)
    assert p.create == []
    c = conds(p)
    assert c["Succeeded"] == ("True", "AllStagesSucceeded")
    assert c["Ready"][0] == "True"
    assert c["Reconciling"][0] == "False"
    assert c["Failed"][0] == "False"
    assert p.phase == "Succeeded"
    assert p.status["stages"][2]["metrics"] == {"suite/old/exact_match": 0.5}
    assert "RunSucceeded" in [e.reason for e in p.events]
    assert p.running is None


def test_failed_attempt_waits_for_backoff_then_retries() -> None:
    run = sample_run()
    failed = job("sft", outcome="Failed", reason="BackoffLimitExceeded", finished=NOW - timedelta(seconds=4))
    p = plan(run, Observed(jobs=[failed]), NOW, CONFIG)
    assert p.create == []
    assert p.requeue_after == pytest.approx(6.0)  # 10 s base backoff - 4 s elapsed
    assert "retry 1 of 2" in p.status["stages"][0]["message"]
    p2 = plan(run, Observed(jobs=[failed]), NOW + timedelta(seconds=7), CONFIG)
    assert created_kinds(p2) == [("Job", "r1-sft-c1-a2")]
    assert p2.create[0]["metadata"]["labels"]["temper.dev/attempt"] == "2"
    assert p2.retries == ["sft"]
    assert p2.failed_attempts == [("sft", "BackoffLimitExceeded")]


def test_retries_exhausted_fail_the_run_naming_the_stage() -> None:
    jobs = [job("sft", a, outcome="Failed", reason="BackoffLimitExceeded") for a in (1, 2, 3)]
    p = plan(sample_run(), Observed(jobs=jobs), NOW, CONFIG)
    assert p.create == []
    c = conds(p)
    assert c["Failed"] == ("True", "StageFailed")
    assert c["Stalled"][0] == "True"
    assert c["Succeeded"][0] == "False"
    failed_msg = next(x["message"] for x in p.status["conditions"] if x["type"] == "Failed")
    assert "stage sft" in failed_msg
    assert "retries exhausted" in failed_msg
    assert [s["state"] for s in p.status["stages"]] == ["Failed", "Skipped", "Skipped"]
    assert p.status["stages"][0]["attempts"] == 3
    assert {"StageFailed", "RunFailed"} <= {e.reason for e in p.events}
    assert [(t.stage_type, t.result) for t in p.transitions] == [("sft", "Failed")]
    # Once recorded, a failure is neither re-announced nor re-counted.
    again = plan(with_status(sample_run(), p), Observed(jobs=jobs), NOW, CONFIG)
    assert again.events == []
    assert again.transitions == []


def test_non_retryable_exit_fails_without_retry() -> None:
    failed = job("sft", outcome="Failed", reason="PodFailurePolicy")
    p = plan(sample_run(), Observed(jobs=[failed]), NOW + timedelta(hours=1), CONFIG)
    assert p.create == []
    assert p.phase == "Failed"
    assert "not retryable" in p.status["stages"][0]["message"]


def test_preempted_pods_do_not_count_as_attempts() -> None:
    p = plan(sample_run(), Observed(jobs=[job("sft", disruptions=2)]), NOW, CONFIG)
    assert p.create == []
    assert p.status["stages"][0]["attempts"] == 1
    assert "preempted 2x" in p.status["stages"][0]["message"]


def test_suspend_patches_running_job_and_resume_unpatches() -> None:
    run = sample_run(suspend=True)
    p = plan(run, Observed(jobs=[job("sft")]), NOW, CONFIG)
    assert p.job_patches == [("r1-sft-c1-a1", {"spec": {"suspend": True}})]
    assert conds(p)["Suspended"] == ("True", "Suspended")
    assert p.phase == "Suspended"
    resumed = sample_run(suspend=False)
    resumed["status"] = p.status
    p2 = plan(resumed, Observed(jobs=[job("sft", suspended=True)]), NOW, CONFIG)
    assert p2.job_patches == [("r1-sft-c1-a1", {"spec": {"suspend": False}})]
    assert conds(p2)["Suspended"][0] == "False"


def test_suspended_run_creates_no_jobs() -> None:
    p = plan(sample_run(suspend=True), Observed(), NOW, CONFIG)
    assert p.create == []
    assert p.phase == "Suspended"


def test_kueue_queue_creates_suspended_labelled_job_and_leaves_admission_to_kueue() -> None:
    run = sample_run(queueName="gpu-team-a", priorityClassName="training-low")
    p = plan(run, Observed(), NOW, CONFIG)
    created = p.create[0]
    assert created["spec"]["suspend"] is True
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    assert created["spec"]["template"]["spec"]["priorityClassName"] == "training-low"
    p2 = plan(run, Observed(jobs=[job("sft", suspended=True)]), NOW, CONFIG)
    assert p2.job_patches == []  # Kueue unsuspends on admission, not the operator
    assert "Kueue" in p2.status["stages"][0]["message"]


def test_invalid_spec_stalls_with_the_field_named() -> None:
    run = sample_run()
    run["spec"]["stages"][1]["from"] = "nope"
    p = plan(run, Observed(), NOW, CONFIG)
    assert p.create == []
    status, reason = conds(p)["Stalled"]
    assert (status, reason) == ("True", "InvalidSpec")
    message = next(c["message"] for c in p.status["conditions"] if c["type"] == "Stalled")
    assert "from" in message


def test_progress_block_from_polled_progress() -> None:
    progress = StageProgress(
        step=42, totalSteps=100, percent=42.0, loss=0.61234, etaSeconds=90.4, updatedAt="x"
    )
    p = plan(
        sample_run(), Observed(jobs=[job("sft")], progress=progress, progress_key=("sft", 1)), NOW, CONFIG
    )
    assert p.status["progress"] == {
        "stage": "sft",
        "percent": 14.0,
        "step": 42,
        "totalSteps": 100,
        "loss": 0.6123,
        "etaSeconds": 90.0,
        "updatedAt": "x",
    }
    assert "sft running 14%" in next(
        c["message"] for c in p.status["conditions"] if c["type"] == "Reconciling"
    )
    # A reconcile without a fresh poll keeps the block rather than flapping it.
    p2 = plan(with_status(sample_run(), p), Observed(jobs=[job("sft")]), NOW, CONFIG)
    assert p2.status["progress"] == p.status["progress"]


def test_adapter_failing_verification_fails_the_stage() -> None:
    done = job("sft", outcome="Complete", result={"manifestUri": "s3://bucket/runs/r1/g1/sft/manifest.json"})
    bad = ready_adapter("sft", ready="False", reason="VerificationFailed")
    p = plan(sample_run(), Observed(jobs=[done], adapters={bad.name: bad}), NOW, CONFIG)
    assert p.phase == "Failed"
    assert "failed verification" in p.status["stages"][0]["message"]


def test_adapter_storage_read_error_keeps_the_stage_verifying() -> None:
    """An S3 blip during verification is retried by the Adapter controller, not a verdict."""
    done = job("sft", outcome="Complete", result={"manifestUri": "s3://bucket/runs/r1/g1/sft/manifest.json"})
    unreachable = ready_adapter("sft", ready="False", reason="ReadError")
    p = plan(sample_run(), Observed(jobs=[done], adapters={unreachable.name: unreachable}), NOW, CONFIG)
    assert p.phase == "Running"
    assert p.status["stages"][0]["state"] == "Running"
    assert p.status["stages"][0]["message"].startswith("verifying Adapter")


def test_adapter_name_owned_by_another_run_is_not_adopted() -> None:
    done = job("sft", outcome="Complete", result={"manifestUri": "s3://bucket/runs/r1/g1/sft/manifest.json"})
    other = ObservedAdapter(
        name="r1-sft-g1", manifest_uri="s3://x/y/manifest.json", ready="True", run_uid="uid-0"
    )
    p = plan(sample_run(), Observed(jobs=[done], adapters={other.name: other}), NOW, CONFIG)
    assert p.phase == "Failed"
    assert "another run" in p.status["stages"][0]["message"]


def test_completed_job_without_pod_falls_back_to_deterministic_manifest() -> None:
    p = plan(sample_run(), Observed(jobs=[job("sft", outcome="Complete")]), NOW, CONFIG)
    assert p.create[0]["spec"]["artifact"]["uri"] == "s3://bucket/runs/r1/g1/sft/manifest.json"


def test_foreign_conditions_are_preserved() -> None:
    run = sample_run()
    run["status"] = {"conditions": [{"type": "GateFailed", "status": "True", "reason": "Regression"}]}
    p = plan(run, Observed(), NOW, CONFIG)
    assert conds(p)["GateFailed"] == ("True", "Regression")


def test_spec_drift_under_a_running_job_is_reported() -> None:
    running = job("sft")
    running = ObservedJob(**{**running.__dict__, "spec_hash": "0" * 16})
    p = plan(sample_run(), Observed(jobs=[running]), NOW, CONFIG)
    assert conds(p)["SpecChangePending"] == ("True", "RunningAttemptKeepsItsSpec")


def test_deleting_run_plans_nothing() -> None:
    run = sample_run()
    run["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    p = plan(run, Observed(), NOW, CONFIG)
    assert p.create == []
    assert p.status == {}


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(10, a, 35) for a in (1, 2, 3)] == [10, 20, 35]


def test_observed_job_reads_termination_message_and_disruptions() -> None:
    result = {"manifestUri": "s3://b/p/manifest.json", "metrics": {"train_loss": 1.5}}
    k8s_job = {
        "metadata": {
            "name": "r1-sft-c1-a1",
            "labels": {"temper.dev/stage": "sft", "temper.dev/attempt": "1", "temper.dev/cycle": "1"},
            "creationTimestamp": "2026-11-26T11:00:00Z",
        },
        "spec": {"suspend": False},
        "status": {
            "conditions": [
                {"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-26T11:05:00Z"}
            ]
        },
    }
    pods = [
        {"status": {"conditions": [{"type": "DisruptionTarget", "status": "True"}]}},
        {
            "status": {
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "state": {"terminated": {"exitCode": 0, "message": json.dumps(result)}},
                    }
                ]
            }
        },
    ]
    seen = ObservedJob.from_k8s(k8s_job, pods)
    assert seen.outcome == "Complete"
    assert seen.attempt == 1
    assert seen.disruptions == 1
    assert seen.result is not None
    assert seen.result.metrics == {"train_loss": 1.5}
    assert seen.finished == datetime(2026, 11, 26, 11, 5, tzinfo=UTC)


def test_pod_annotations_pass_through_and_bad_json_stalls() -> None:
    run = sample_run()
    run["metadata"]["annotations"] = {"temper.dev/pod-annotations": '{"sidecar.istio.io/inject": "false"}'}
    p = plan(run, Observed(), NOW, CONFIG)
    assert p.create[0]["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    run["metadata"]["annotations"] = {"temper.dev/pod-annotations": "not json"}
    p = plan(run, Observed(), NOW, CONFIG)
    assert p.create == []
    assert conds(p)["Stalled"][0] == "True"
    assert "temper.dev/pod-annotations" in next(
        c["message"] for c in p.status["conditions"] if c["type"] == "Stalled"
    )
