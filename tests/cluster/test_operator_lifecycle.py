"""Failure shapes and lifecycle on the hermetic cluster: retries, suspend, delete, preemption."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.test_operator_pipeline import KWOK, Api, pipeline, publish, wait_for
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

ONE_STAGE = [
    {
        "name": "sft",
        "type": "sft",
        "data": {"train": ["tickets"]},
        "resources": {"gpus": 1, **KWOK},
        "retries": {"maxRetries": 2, "backoffSeconds": 0},
    }
]


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


def test_retries_until_max_then_failed_naming_the_stage(
    api: Api, operator: OperatorProcess, s3_bucket: str, s3_secret: str
) -> None:
    api.create_run(
        pipeline(
            "flaky",
            s3_bucket,
            stages=ONE_STAGE,
            pod_annotations={
                "temper.dev/fake-duration": "100ms",
                "temper.dev/fake-exit-code": "1",
                "temper.dev/fake-termination-message": '{"error": "CUDA error: an illegal memory access"}',
            },
        )
    )
    wait_for("run Failed", lambda: api.failed("flaky"), 40, operator)
    failed = api.condition("flaky", "Failed")
    assert failed["reason"] == "StageFailed"
    assert "stage sft" in failed["message"]
    assert "retries exhausted" in failed["message"]
    assert "illegal memory access" in failed["message"]  # the trainer's own words, from the pod
    assert api.condition("flaky", "Stalled")["status"] == "True"
    assert sorted(j.metadata.name for j in api.jobs("flaky")) == [
        "flaky-sft-c1-a1",
        "flaky-sft-c1-a2",
        "flaky-sft-c1-a3",
    ]
    assert api.stage("flaky", "sft")["attempts"] == 3
    reasons = [e.reason for e in api.events("flaky")]
    assert reasons.count("StageRetrying") == 2
    assert "RunFailed" in reasons
    assert operator.metric("temper_stage_retries_total", stage_type="sft") == 2
    assert operator.metric("temper_runs", state="Failed") == 1


def test_non_retryable_exit_code_fails_at_once(
    api: Api, operator: OperatorProcess, s3_bucket: str, s3_secret: str
) -> None:
    api.create_run(
        pipeline(
            "badinput",
            s3_bucket,
            stages=ONE_STAGE,
            pod_annotations={"temper.dev/fake-duration": "100ms", "temper.dev/fake-exit-code": "11"},
        )
    )
    wait_for("run Failed", lambda: api.failed("badinput"), 30, operator)
    assert [j.metadata.name for j in api.jobs("badinput")] == ["badinput-sft-c1-a1"]
    assert "not retryable" in api.condition("badinput", "Failed")["message"]


def test_suspend_then_resume(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    publish(s3_server, s3_bucket, "pause", "sft", tmp_path)
    api.create_run(
        pipeline("pause", s3_bucket, stages=ONE_STAGE, pod_annotations={"temper.dev/fake-duration": "6s"})
    )
    wait_for("pod running", lambda: any(p.status.phase == "Running" for p in api.pods("pause")), 20, operator)
    api.patch_run("pause", {"spec": {"suspend": True}})
    wait_for("Suspended", lambda: api.condition("pause", "Suspended").get("status") == "True", 20, operator)
    wait_for("Job suspended", lambda: all(j.spec.suspend for j in api.jobs("pause")), 10, operator)
    # The Job controller removes the running pod of a suspended Job.
    wait_for(
        "pods gone", lambda: not [p for p in api.pods("pause") if p.metadata.deletion_timestamp is None], 20
    )
    assert api.run("pause")["status"]["phase"] == "Suspended"
    assert api.stage("pause", "sft")["state"] == "Suspended"
    api.patch_run("pause", {"spec": {"suspend": False}})
    wait_for("Job resumed", lambda: not any(j.spec.suspend for j in api.jobs("pause")), 10, operator)
    wait_for("run Succeeded", lambda: api.succeeded("pause"), 30, operator)
    assert [j.metadata.name for j in api.jobs("pause")] == ["pause-sft-c1-a1"]  # resumed, not retried
    reasons = [e.reason for e in api.events("pause")]
    assert "RunSuspended" in reasons
    assert "RunResumed" in reasons


def test_delete_mid_stage_deletes_jobs_and_keeps_adapters(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    publish(s3_server, s3_bucket, "gone", "sft", tmp_path)
    stages = [
        {"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": {"gpus": 1, **KWOK}},
        {
            "name": "align",
            "type": "dpo",
            "from": "sft",
            "data": {"train": ["prefs"]},
            "resources": {"gpus": 1, **KWOK},
            "activeDeadlineSeconds": 600,
        },
    ]
    api.create_run(
        pipeline("gone", s3_bucket, stages=stages, pod_annotations={"temper.dev/fake-duration": "1s"})
    )
    wait_for(
        "align Job",
        lambda: any(j.metadata.name == "gone-align-c1-a1" for j in api.jobs("gone")),
        30,
        operator,
    )
    api.custom.delete_namespaced_custom_object(
        "temper.dev", "v1alpha1", api.ns, "posttrainingruns", "gone", propagation_policy="Foreground"
    )
    wait_for("run gone", lambda: _absent(api, "gone"), 30, operator)
    wait_for("Jobs gone", lambda: not api.jobs("gone"), 30, operator)
    # The catalog outlives the run.
    assert [a["metadata"]["name"] for a in api.adapters()] == ["gone-sft-g1"]
    time.sleep(1.0)
    assert not api.jobs("gone")  # and the operator recreated nothing


def _absent(api: Api, name: str) -> bool:
    try:
        api.run(name)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_preempted_pod_is_not_a_failed_attempt(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    publish(s3_server, s3_bucket, "preempt", "sft", tmp_path)
    api.create_run(
        pipeline("preempt", s3_bucket, stages=ONE_STAGE, pod_annotations={"temper.dev/fake-duration": "3s"})
    )
    pod = wait_for(
        "pod running",
        lambda: next((p for p in api.pods("preempt") if p.status.phase == "Running"), None),
        20,
        operator,
    )
    # What a preemption or node drain does: the pod ends Failed with DisruptionTarget=True.
    api.core.patch_namespaced_pod(
        pod.metadata.name,
        api.ns,
        {
            "metadata": {
                "annotations": {
                    "temper.dev/fake-disruption": "PreemptionByScheduler",
                    "temper.dev/fake-duration": "100ms",
                }
            }
        },
    )
    wait_for("run Succeeded", lambda: api.succeeded("preempt"), 40, operator)
    assert [j.metadata.name for j in api.jobs("preempt")] == ["preempt-sft-c1-a1"]
    assert api.stage("preempt", "sft")["attempts"] == 1
    assert operator.metric("temper_stage_retries_total", stage_type="sft") == 0


def test_multi_node_stage_is_an_indexed_job_with_headless_service(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    publish(s3_server, s3_bucket, "wide", "sft", tmp_path)
    stages = [
        {
            "name": "sft",
            "type": "sft",
            "data": {"train": ["tickets"]},
            "resources": {"gpus": 8, "nodes": 2, **KWOK},
        }
    ]
    api.create_run(
        pipeline("wide", s3_bucket, stages=stages, pod_annotations={"temper.dev/fake-duration": "300ms"})
    )
    wait_for("run Succeeded", lambda: api.succeeded("wide"), 40, operator)
    (job,) = api.jobs("wide")
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 2, 2)
    svc = api.core.read_namespaced_service(job.metadata.name, api.ns)
    assert svc.spec.cluster_ip == "None"
    assert svc.metadata.owner_references[0].name == "wide"
    pods = api.pods("wide")
    assert len({p.spec.node_name for p in pods}) == 2  # 8 GPUs each: one pod per kwok node
    assert {p.spec.subdomain for p in pods} == {job.metadata.name}
    env = {e.name: e.value for e in pods[0].spec.containers[0].env if e.value}
    assert env["MASTER_ADDR"] == f"{job.metadata.name}-0.{job.metadata.name}"
    assert env["WORLD_SIZE"] == "16"  # 2 nodes x 8 GPUs, one process each


# Kueue admission, quota, preemption and suspend run against the real Kueue in
# tests/cluster/test_kueue_quota.py and tests/cluster/test_kueue_preemption.py.
