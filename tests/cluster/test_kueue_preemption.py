"""Kueue preemption and suspend against the real Kueue.

Preemption runs the real trainer on the exec node: a high-priority run (PriorityClass, which
Kueue uses as the workload's priority) takes the ClusterQueue's only CPU from a low-priority
one. Kueue evicts the low run's Job by suspending it, the Job controller deletes its pod, the
trainer checkpoints on SIGTERM, and after readmission the same Job (same attempt) resumes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.kueue_helpers import Timeline, record
from tests.cluster.test_operator_pipeline import KWOK, Api, pipeline, publish, wait_for
from tests.fixtures.kueue import Queues, admitted
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

EXEC = {
    "cpu": "1",
    "nodeSelector": {"kubernetes.io/hostname": "exec-node"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
EVERY = 4  # checkpoint interval, steps


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


@pytest.fixture
def priority_classes(cluster: Cluster, namespace: str) -> Iterator[dict[str, str]]:
    from kubernetes import client

    with cluster.api_client() as api_client:
        sched = client.SchedulingV1Api(api_client)
        names = {"low": f"{namespace}-low", "high": f"{namespace}-high"}
        for level, value in (("low", 100), ("high", 1000)):
            sched.create_priority_class({"metadata": {"name": names[level]}, "value": value})
        yield names
        for name in names.values():
            sched.delete_priority_class(name)


def _trainer_run(
    name: str, bucket: str, s3: S3Server, tiny_model: Path, queue: str, priority: str, steps: int
) -> dict[str, object]:
    stages = [
        {
            "name": "sft",
            "type": "sft",
            "data": {"train": ["tickets"]},
            "hyperparameters": {"maxSteps": steps, "batchSize": 4, "maxLength": 48},
            "resources": EXEC,
            "checkpoint": {"everySteps": EVERY},
        }
    ]
    body = pipeline(name, bucket, stages=stages, queueName=queue, priorityClassName=priority)
    spec = body["spec"]
    assert isinstance(spec, dict)
    spec["storage"]["endpointUrl"] = s3.endpoint_url
    spec["trainer"] = {"env": [{"name": "TEMPER_MODEL_CACHE", "value": str(tiny_model.parent)}]}
    return body


def _reconciling(status: dict[str, object]) -> dict[str, str]:
    conds = status.get("conditions") or []
    assert isinstance(conds, list)
    return next((c for c in conds if c.get("type") == "Reconciling"), {})


def _logs(cluster: Cluster, namespace: str, job: str) -> list[str]:
    """Trainer logs of every pod the Job ever had, oldest first (a suspended Job's pods are
    deleted, but the exec node keeps their directories)."""
    paths = (cluster.state_dir / "pods" / namespace).glob(f"{job}-*/*/logs/trainer.log")
    return [p.read_text(errors="replace") for p in sorted(paths, key=lambda p: p.stat().st_mtime)]


def test_high_priority_run_preempts_low_which_resumes_from_its_checkpoint(
    api: Api,
    cluster: Cluster,
    make_queues: Callable[..., Queues],
    priority_classes: dict[str, str],
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    queues = make_queues({"cpu": 1}, preemption={"withinClusterQueue": "LowerPriority"})
    timeline = Timeline(api, queues, ["low", "high"]).start()
    try:
        api.create_run(
            _trainer_run(
                "low", s3_bucket, s3_server, tiny_model, queues.local_queue, priority_classes["low"], 60
            )
        )
        wait_for(
            "low past its first checkpoint",
            lambda: (api.run("low").get("status", {}).get("progress") or {}).get("step", 0) > EVERY,
            180,
            operator,
        )
        api.create_run(
            _trainer_run(
                "high", s3_bucket, s3_server, tiny_model, queues.local_queue, priority_classes["high"], 2
            )
        )
        seen: list[int] = []

        def evicted() -> bool:
            # The newest step the run reported before Kueue took its CPU back.
            status = api.run("low").get("status") or {}
            if "evicted by Kueue" in _reconciling(status).get("message", ""):
                return True
            seen.append(int((status.get("progress") or {}).get("step", 0)))
            return False

        wait_for("low evicted and requeued", evicted, 60, operator)
        assert api.condition("low", "Reconciling")["reason"] == "QueuedByKueue"
        wait_for("high Succeeded", lambda: api.succeeded("high"), 180, operator)
        wait_for(
            "low Succeeded after readmission",
            lambda: api.succeeded("low") or api.failed("low"),
            300,
            operator,
        )
    finally:
        timeline.stop()
    report = timeline.report()
    logs = _logs(cluster, api.ns, "low-sft-c1-a1")
    record("preemption", {**report, "low_pods": len(logs)}, tmp_path)
    assert api.succeeded("low"), (api.run("low")["status"], logs)
    assert report["max_admitted"] == 1, report
    # Same Job, same attempt: Kueue's preemption is not charged to the run.
    assert [j.metadata.name for j in api.jobs("low")] == ["low-sft-c1-a1"]
    assert api.stage("low", "sft")["attempts"] == 1
    assert operator.metric("temper_stage_retries_total", stage_type="sft") == 0
    (low,) = [w for w in queues.workloads() if "low" in w["metadata"]["name"]]
    assert low["status"]["schedulingStats"]["evictions"] == [
        {"count": 1, "reason": "Preempted", "underlyingCause": ""}
    ], low["status"]
    # The preempted pod checkpointed on SIGTERM; the next one resumed there, losing at most
    # one checkpoint interval.
    assert len(logs) == 2, logs
    saved = [int(s) for s in re.findall(r"checkpoint saved at step (\d+)", logs[0])]
    resumed = re.search(r"resuming from checkpoint step (\d+)", logs[1])
    assert saved, logs
    assert resumed, logs
    assert int(resumed.group(1)) == max(saved)
    reported = max(seen)
    print(f"preemption: last reported step {reported}, checkpoints {saved}, resumed at {resumed.group(1)}")
    assert reported - int(resumed.group(1)) <= EVERY, (reported, saved, resumed.group(1))


def test_suspend_releases_quota_and_unsuspend_requeues(
    api: Api,
    make_queues: Callable[..., Queues],
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    queues = make_queues({"nvidia.com/gpu": 8})
    stages = [
        {"name": "sft", "type": "sft", "data": {"train": ["tickets"]}, "resources": {"gpus": 4, **KWOK}}
    ]
    for run in ("a", "b", "c"):
        publish(s3_server, s3_bucket, run, "sft", tmp_path)
        api.create_run(
            pipeline(
                run,
                s3_bucket,
                stages=stages,
                queueName=queues.local_queue,
                pod_annotations={"temper.dev/fake-duration": "8s" if run != "c" else "1s"},
            )
        )

    def admitted_runs() -> set[str]:
        return {w["metadata"]["name"].split("-")[1] for w in queues.workloads() if admitted(w)}

    wait_for("a and b admitted", lambda: admitted_runs() == {"a", "b"}, 30, operator)
    wait_for(
        "c queued", lambda: api.condition("c", "Reconciling").get("reason") == "QueuedByKueue", 20, operator
    )
    # Suspending the queued run takes it out of the queue: it is never admitted while suspended.
    api.patch_run("c", {"spec": {"suspend": True}})
    wait_for("c Suspended", lambda: api.run("c")["status"].get("phase") == "Suspended", 20, operator)
    # Suspending an admitted run releases its 4 GPUs at once.
    api.patch_run("a", {"spec": {"suspend": True}})
    wait_for("a Suspended", lambda: api.run("a")["status"].get("phase") == "Suspended", 20, operator)
    wait_for("a's quota released", lambda: _used_gpus(queues) == 4, 30, operator)
    assert not admitted_runs() & {"a", "c"}
    wait_for("b Succeeded", lambda: api.succeeded("b"), 60, operator)
    wait_for("quota idle", lambda: _used_gpus(queues) == 0, 30, operator)
    assert admitted_runs() <= {"b"}
    # Unsuspending requeues both; Kueue admits them and they finish, attempts uncharged.
    api.patch_run("a", {"spec": {"suspend": False}})
    api.patch_run("c", {"spec": {"suspend": False}})
    wait_for("a and c Succeeded", lambda: api.succeeded("a") and api.succeeded("c"), 90, operator)
    for run in ("a", "c"):
        assert api.stage(run, "sft")["attempts"] == 1
    assert operator.metric("temper_stage_retries_total", stage_type="sft") == 0


def _used_gpus(queues: Queues) -> int:
    for flavor in queues.cluster_queue_status().get("flavorsReservation") or []:
        for res in flavor.get("resources") or []:
            if res["name"] == "nvidia.com/gpu":
                return int(res.get("total", "0"))
    return 0
