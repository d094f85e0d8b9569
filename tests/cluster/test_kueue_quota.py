"""Runs under the real Kueue: GPU quota, queued status, multi-stage requeue, multi-node admission.

Stage Jobs run as kwok pods on the fake GPU nodes (kwok-gpu-0..3, 8 GPUs each); the quota is
the ClusterQueue's, so Kueue, not the node capacity, decides how many run at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.kueue_helpers import Timeline, record
from tests.cluster.test_operator_pipeline import KWOK, Api, pipeline, publish, wait_for
from tests.fixtures.kueue import Queues, admitted
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

GPU4 = {"gpus": 4, **KWOK}


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


def _one_stage(name: str) -> list[dict[str, object]]:
    return [{"name": name, "type": "sft", "data": {"train": ["tickets"]}, "resources": GPU4}]


def _two_stages() -> list[dict[str, object]]:
    return [
        {"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": GPU4},
        {"name": "align", "type": "dpo", "from": "sft", "data": {"train": ["prefs"]}, "resources": GPU4},
    ]


def test_gpu_quota_admits_two_four_gpu_stages_at_a_time(
    api: Api,
    make_queues: Callable[..., Queues],
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    queues = make_queues({"nvidia.com/gpu": 8})
    runs = ["q1", "q2", "q3", "m4", "m5"]  # m*: two stages, the second queues again
    for run in runs:
        publish(s3_server, s3_bucket, run, "sft", tmp_path)
        if run.startswith("m"):
            publish(s3_server, s3_bucket, run, "align", tmp_path, "dpo")
    timeline = Timeline(api, queues, runs).start()
    try:
        for run in runs:
            stages = _two_stages() if run.startswith("m") else _one_stage("sft")
            api.create_run(
                pipeline(
                    run,
                    s3_bucket,
                    stages=stages,
                    queueName=queues.local_queue,
                    pod_annotations={"temper.dev/fake-duration": "1s"},
                )
            )
        wait_for("all five runs Succeeded", lambda: all(api.succeeded(r) for r in runs), 150, operator)
    finally:
        timeline.stop()
    report = timeline.report()
    record("quota", report, tmp_path)
    assert not timeline.errors, timeline.errors
    assert report["max_admitted"] == 2, report  # 8 GPUs of quota, 4 per stage
    assert report["max_admitted_gpus"] == 8, report
    # Seven stage Jobs, seven workloads, each admitted once.
    assert len(report["admitted_at"]) == 7, report
    # At least three runs had to wait, and each said so, naming Kueue.
    waited = report["waiting_reasons"]
    assert len(waited) >= 3, report
    # (A Job read between a stage's end and the next stage's status write can pair a queued
    # Job with the previous stage's StageRunning; never with a reason that hides Kueue.)
    assert all("QueuedByKueue" in reasons for reasons in waited.values()), report
    assert all(set(reasons) <= {"QueuedByKueue", "StageRunning"} for reasons in waited.values()), report
    assert any("Kueue" in m for msgs in timeline.waiting_messages.values() for m in msgs)
    # Later stages queue again: each align Job was created suspended and admitted on its own.
    for run in ("m4", "m5"):
        stages = [(s["name"], s["state"], s["attempts"]) for s in api.run(run)["status"]["stages"]]
        assert stages == [("sft", "Succeeded", 1), ("align", "Succeeded", 1)]
    align_workloads = [w for w in queues.workloads() if "align" in w["metadata"]["name"]]
    assert len(align_workloads) == 2
    sft_admitted = {
        run: report["admitted_at"][next(w for w in report["admitted_at"] if f"{run}-sft" in w)][1]
        for run in ("m4", "m5")
    }
    for run in ("m4", "m5"):
        align = next(w for w in report["admitted_at"] if f"{run}-align" in w)
        assert report["admitted_at"][align][0] >= sft_admitted[run], report


def test_multi_node_indexed_job_is_admitted_as_one_workload(
    api: Api,
    make_queues: Callable[..., Queues],
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    """Two nodes of 8 GPUs need 16; with 12 of quota Kueue admits none of it, never half."""
    queues = make_queues({"nvidia.com/gpu": 12})
    publish(s3_server, s3_bucket, "wide", "sft", tmp_path)
    stages = [
        {
            "name": "sft",
            "type": "sft",
            "data": {"train": ["tickets"]},
            "resources": {"gpus": 8, "nodes": 2, **KWOK},
        }
    ]
    body = pipeline(
        "wide",
        s3_bucket,
        stages=stages,
        queueName=queues.local_queue,
        pod_annotations={"temper.dev/fake-duration": "1s"},
    )
    api.create_run(body)
    (workload,) = wait_for("one Workload", queues.workloads, 30, operator)
    (podset,) = workload["spec"]["podSets"]
    assert podset["count"] == 2
    wait_for(
        "Kueue says it does not fit",
        lambda: "insufficient" in str(_quota_reserved(queues)).lower() or None,
        30,
        operator,
    )
    assert not admitted(queues.workloads()[0])
    assert not api.pods("wide")  # not one pod of the two started
    wait_for(
        "run says Kueue holds it",
        lambda: api.condition("wide", "Reconciling").get("reason") == "QueuedByKueue",
        20,
        operator,
    )
    # Raise the quota to 16: the whole gang is admitted at once and runs on two nodes.
    queues.custom.patch_cluster_custom_object(
        "kueue.x-k8s.io",
        "v1beta2",
        "clusterqueues",
        queues.cluster_queue,
        {
            "spec": {
                "resourceGroups": [
                    {
                        "coveredResources": ["nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "default-flavor",
                                "resources": [{"name": "nvidia.com/gpu", "nominalQuota": 16}],
                            }
                        ],
                    }
                ]
            }
        },
    )
    wait_for("run Succeeded", lambda: api.succeeded("wide"), 60, operator)
    (workload,) = queues.workloads()
    (assignment,) = workload["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2
    assert assignment["resourceUsage"]["nvidia.com/gpu"] == "16"
    assert len({p.spec.node_name for p in api.pods("wide")}) == 2


def _quota_reserved(queues: Queues) -> dict[str, object]:
    from tests.fixtures.kueue import condition

    items = queues.workloads()
    return condition(items[0], "QuotaReserved") if items else {}
