"""Crash safety and leadership: SIGKILL between API calls, and two operators racing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.test_operator_pipeline import Api, pipeline, publish, wait_for
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


def _job_names(api: Api, run: str) -> list[str]:
    return sorted(j.metadata.name for j in api.jobs(run))


def test_sigkill_mid_run_loses_nothing_and_duplicates_nothing(
    api: Api, operator: OperatorProcess, s3_server: S3Server, s3_bucket: str, s3_secret: str, tmp_path: Path
) -> None:
    for stage, kind in (("sft", "sft"), ("align", "dpo")):
        publish(s3_server, s3_bucket, "crashy", stage, tmp_path, kind)
    api.create_run(pipeline("crashy", s3_bucket, pod_annotations={"temper.dev/fake-duration": "300ms"}))
    # Kill the operator at staggered moments while the run advances: each restart lands
    # somewhere else between "Job created", "status written", "Adapter created", "event sent".
    kills = 0
    for delay in (0.15, 0.6, 0.35, 0.9, 0.5, 0.25):
        time.sleep(delay)
        if api.succeeded("crashy"):
            break
        operator.kill9()
        kills += 1
        operator.start()
        operator.wait_role("leader", timeout=30)
    wait_for("run Succeeded", lambda: api.succeeded("crashy"), 60, operator)
    assert kills >= 3
    assert _job_names(api, "crashy") == ["crashy-align-c1-a1", "crashy-regress-c1-a1", "crashy-sft-c1-a1"]
    assert sorted(a["metadata"]["name"] for a in api.adapters()) == ["crashy-align-g1", "crashy-sft-g1"]
    stages = api.run("crashy")["status"]["stages"]
    assert [(s["state"], s["attempts"]) for s in stages] == [("Succeeded", 1)] * 3


def test_two_operators_never_duplicate_jobs(
    api: Api,
    operator_factory: Callable[..., OperatorProcess],
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    first, second = operator_factory("op-a"), operator_factory("op-b")
    roles = sorted([first.wait_role("leader", "standby"), second.wait_role("leader", "standby")])
    time.sleep(0.5)
    roles = sorted([first.role(), second.role()])
    assert roles == ["leader", "standby"]
    for stage, kind in (("sft", "sft"), ("align", "dpo")):
        publish(s3_server, s3_bucket, "twins", stage, tmp_path, kind)
    api.create_run(pipeline("twins", s3_bucket, pod_annotations={"temper.dev/fake-duration": "300ms"}))
    wait_for("sft Job", lambda: api.jobs("twins"), 20, first)
    leader, standby = (first, second) if first.role() == "leader" else (second, first)
    leader.kill9()  # the standby takes over once the Lease expires
    standby.wait_role("leader", timeout=30)
    wait_for("run Succeeded", lambda: api.succeeded("twins"), 60, standby)
    assert _job_names(api, "twins") == ["twins-align-c1-a1", "twins-regress-c1-a1", "twins-sft-c1-a1"]
    reasons = [e.reason for e in api.events("twins")]
    assert reasons.count("StageStarted") >= 3


def test_two_operators_without_leader_election_still_create_each_job_once(
    api: Api,
    operator_factory: Callable[..., OperatorProcess],
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    # The worst case the Lease exists to prevent: two active reconcilers. Deterministic names
    # and create-is-idempotent keep even that from duplicating a Job.
    ops = [operator_factory(f"split-{i}", TEMPER_LEADER_ELECTION="false") for i in range(2)]
    for op in ops:
        op.wait_role("leader")
    for stage, kind in (("sft", "sft"), ("align", "dpo")):
        publish(s3_server, s3_bucket, "split", stage, tmp_path, kind)
    api.create_run(pipeline("split", s3_bucket, pod_annotations={"temper.dev/fake-duration": "300ms"}))
    wait_for("run Succeeded", lambda: api.succeeded("split"), 60, ops[0])
    assert _job_names(api, "split") == ["split-align-c1-a1", "split-regress-c1-a1", "split-sft-c1-a1"]
    assert sorted(a["metadata"]["name"] for a in api.adapters()) == ["split-align-g1", "split-sft-g1"]
