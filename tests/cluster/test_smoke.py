"""Smoke tests of the hermetic cluster: real scheduler, kwok GPU nodes, exec node, GC, and the
fault hooks the chaos campaign uses (component restarts, S3 outages)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from temper_dev.cluster import Cluster, ClusterError
from temper_dev.execnode import pod_dirs
from temper_dev.s3server import S3Server

from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

T = TypeVar("T")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def job_condition(batch: client.BatchV1Api, namespace: str, name: str) -> Any:
    job = batch.read_namespaced_job(name, namespace)
    for condition in job.status.conditions or []:
        if condition.type in ("Complete", "Failed") and condition.status == "True":
            return condition
    return None


def gpu_job(name: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"temper.dev/node-pool": "kwok"},
                    "tolerations": [GPU_TOLERATION],
                    "securityContext": RESTRICTED_POD,
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "example.invalid/trainer:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            "securityContext": RESTRICTED_CONTAINER,
                        }
                    ],
                },
            },
        },
    }


def exec_pod(name: str, script: str, **extra: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "local",
        "command": ["python", "-c", script],
        "securityContext": RESTRICTED_CONTAINER,
        **extra.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "nodeSelector": {"temper.dev/node-pool": "exec"},
            "tolerations": [GPU_TOLERATION],
            "securityContext": RESTRICTED_POD,
            "containers": [container],
            **extra,
        },
    }


def test_gpu_job_completes_on_kwok_node(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        batch.create_namespaced_job(namespace, gpu_job("gpu", {"temper.dev/fake-duration": "1s"}))
        condition = wait_for("job gpu to finish", lambda: job_condition(batch, namespace, "gpu"))
        assert condition.type == "Complete"
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=gpu").items
        assert len(pods) == 1
        assert pods[0].spec.node_name.startswith("kwok-gpu-")
        assert pods[0].status.phase == "Succeeded"


def test_marked_pod_fails_job_through_pod_failure_policy(cluster: Cluster, namespace: str) -> None:
    annotations = {
        "temper.dev/fake-exit-code": "42",
        "temper.dev/fake-termination-message": '{"error": "diverged"}',
    }
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    with cluster.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        job = gpu_job("doomed", annotations, backoffLimit=3, podFailurePolicy=policy)
        batch.create_namespaced_job(namespace, job)
        condition = wait_for("job doomed to finish", lambda: job_condition(batch, namespace, "doomed"))
        assert (condition.type, condition.reason) == ("Failed", "PodFailurePolicy")
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=doomed").items
        assert len(pods) == 1  # FailJob stops retries despite backoffLimit=3
        terminated = pods[0].status.container_statuses[0].state.terminated
        assert terminated.exit_code == 42
        assert terminated.message == '{"error": "diverged"}'


def test_fake_disruption_and_duration_annotations(cluster: Cluster, namespace: str) -> None:
    annotations = {
        "temper.dev/fake-disruption": "PreemptionByScheduler",
        "temper.dev/fake-duration": "2s",
    }
    with cluster.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        batch.create_namespaced_job(namespace, gpu_job("evicted", annotations))
        wait_for("job evicted to finish", lambda: job_condition(batch, namespace, "evicted"))
        (pod,) = core.list_namespaced_pod(namespace, label_selector="job-name=evicted").items
    assert pod.status.phase == "Failed"
    conditions = {c.type: c for c in pod.status.conditions}
    disruption = conditions["DisruptionTarget"]
    assert (disruption.status, disruption.reason) == ("True", "PreemptionByScheduler")
    terminated = pod.status.container_statuses[0].state.terminated
    ran_for = terminated.finished_at - terminated.started_at
    assert ran_for.total_seconds() >= 2


def test_exec_node_runs_real_process(cluster: Cluster, namespace: str) -> None:
    script = (
        "import os, sys\n"
        "print('pod', os.environ['POD_NAME'], 'token', os.environ['TOKEN'], 'mode', os.environ['MODE'])\n"
        "open(os.path.join(os.environ['OUT'], 'result.txt'), 'w').write('ok')\n"
        "print('scratch', os.path.exists('/scratch/result.txt'))\n"
        "print('config file', open('/etc/temper/mode').read())\n"
        "open(os.environ['TEMPER_TERMINATION_LOG'], 'w').write('loss=0.5')\n"
        "sys.exit(3)\n"
    )
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "OUT", "value": "/scratch"},
    ]
    pod = exec_pod(
        "runner",
        script,
        volumes=[
            {"name": "scratch", "emptyDir": {}},
            {"name": "config", "configMap": {"name": "settings"}},
        ],
        container={
            "env": env,
            "volumeMounts": [
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "config", "mountPath": "/etc/temper"},
            ],
        },
    )
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}}
        )
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "settings"}, "data": {"mode": "fast"}}
        )
        core.create_namespaced_pod(namespace, pod)

        def finished() -> Any:
            current = core.read_namespaced_pod("runner", namespace)
            return current if current.status.phase in ("Succeeded", "Failed") else None

        done = wait_for("exec pod to finish", finished)
    assert done.spec.node_name == "exec-node"
    assert done.status.phase == "Failed"
    terminated = done.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert terminated.message == "loss=0.5"
    log = cluster.pod_log(namespace, "runner")
    assert "pod runner token s3cr3t mode fast" in log
    # The emptyDir mountPath is rewritten in env and args alike, to the same scratch dir.
    assert "scratch True" in log
    assert "config file fast" in log


def test_exec_node_rejects_unsupported_volumes(cluster: Cluster, privileged_namespace: str) -> None:
    ns = privileged_namespace
    host_path = exec_pod(
        "hostpath",
        "print('must not run')",
        volumes=[{"name": "host", "hostPath": {"path": "/etc"}}],
        container={"volumeMounts": [{"name": "host", "mountPath": "/host"}]},
    )
    token = exec_pod("token", "print('must not run')")
    del token["spec"]["automountServiceAccountToken"]
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(ns, host_path)
        core.create_namespaced_pod(ns, token)

        def failed(name: str) -> Any:
            current = core.read_namespaced_pod(name, ns)
            return current if current.status.phase == "Failed" else None

        rejected = wait_for("hostPath pod to be rejected", lambda: failed("hostpath"))
        token_rejected = wait_for("token pod to be rejected", lambda: failed("token"))
    assert rejected.status.reason == "UnsupportedPodSpec"
    assert "spec.volumes[0] (host)" in rejected.status.message
    assert "'hostPath'" in rejected.status.message
    assert token_rejected.status.reason == "UnsupportedPodSpec"
    assert "automountServiceAccountToken: false" in token_rejected.status.message
    assert pod_dirs(cluster.state_dir, ns, "hostpath") == []  # nothing was started


def test_garbage_collector_deletes_children(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}}
        )
        core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

        def child_gone() -> bool:
            try:
                core.read_namespaced_config_map("child", namespace)
            except ApiException as err:
                return err.status == 404
            return False

        assert wait_for("the garbage collector to delete the child", child_gone)


def test_kubectl_reports_pinned_server_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"


def test_deleting_exec_pod_sends_sigterm(cluster: Cluster, namespace: str) -> None:
    script = (
        "import signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    print('got SIGTERM', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    name = f"sleeper-{uuid.uuid4().hex[:6]}"
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, exec_pod(name, script))
        wait_for("the process to start", lambda: "started" in _log(cluster, namespace, name))
        running = core.read_namespaced_pod(name, namespace)
        assert running.status.phase == "Running"
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=20)

        def gone() -> bool:
            try:
                core.read_namespaced_pod(name, namespace)
            except ApiException as err:
                return err.status == 404
            return False

        started = time.monotonic()
        wait_for("the pod object to be removed", gone)
    assert time.monotonic() - started < 15  # removed once the process exited, not after grace
    assert "got SIGTERM" in cluster.pod_log(namespace, name)


def test_exec_pod_ignoring_sigterm_is_killed_after_grace(cluster: Cluster, namespace: str) -> None:
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('ignoring SIGTERM', flush=True))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    name = f"stubborn-{uuid.uuid4().hex[:6]}"
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, exec_pod(name, script))
        wait_for("the process to start", lambda: "started" in _log(cluster, namespace, name))
        started = time.monotonic()
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=1)

        def gone() -> bool:
            try:
                core.read_namespaced_pod(name, namespace)
            except ApiException as err:
                return err.status == 404
            return False

        wait_for("the pod object to be removed", gone)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.0  # the grace period was honoured before SIGKILL
    assert "ignoring SIGTERM" in cluster.pod_log(namespace, name)


def _log(cluster: Cluster, namespace: str, name: str) -> str:
    try:
        return cluster.pod_log(namespace, name)
    except Exception:
        return ""


def test_cluster_keeps_working_across_apiserver_restart(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "before"}, "data": {"k": "v"}})
    old_pid = cluster.status()["components"]["kube-apiserver"]["pid"]

    cluster.restart("kube-apiserver")

    status = cluster.status()
    assert status["ready"]
    assert status["components"]["kube-apiserver"]["alive"]
    assert status["components"]["kube-apiserver"]["pid"] != old_pid
    with cluster.api_client() as api:  # fresh connections: the old ones died with the server
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        assert core.read_namespaced_config_map("before", namespace).data == {"k": "v"}
        # New work needs every other component reconnected: controller-manager (Job -> Pod),
        # scheduler (binding), kwok (fake GPU node) and the exec node (real process).
        batch.create_namespaced_job(namespace, gpu_job("after", {"temper.dev/fake-duration": "300ms"}))
        core.create_namespaced_pod(namespace, exec_pod("after-exec", "print('alive')"))
        condition = wait_for("job after to finish", lambda: job_condition(batch, namespace, "after"), 60)
        assert condition.type == "Complete"
        phase = wait_for(
            "exec pod to finish",
            lambda: _terminal_phase(core.read_namespaced_pod("after-exec", namespace)),
            60,
        )
        assert phase == "Succeeded"
        assert "alive" in _log(cluster, namespace, "after-exec")


def _terminal_phase(pod: Any) -> str | None:
    phase: str = pod.status.phase
    return phase if phase in ("Succeeded", "Failed") else None


def test_restart_rejects_unknown_component(cluster: Cluster) -> None:
    with pytest.raises(ClusterError, match="unknown component 'kubelet'"):
        cluster.restart("kubelet")


def test_s3_outage_keeps_objects(s3_outage_server: S3Server) -> None:
    from botocore.config import Config
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    bucket = s3_outage_server.create_bucket()
    s3_outage_server.client().put_object(Bucket=bucket, Key="kept", Body=b"payload")
    import boto3

    impatient = boto3.client(
        "s3",
        endpoint_url=s3_outage_server.endpoint_url,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
        aws_access_key_id=s3_outage_server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_outage_server.env["AWS_SECRET_ACCESS_KEY"],
    )

    s3_outage_server.outage("blackhole")  # a partition: requests hang until the client gives up
    with pytest.raises((ReadTimeoutError, ConnectTimeoutError)):
        impatient.get_object(Bucket=bucket, Key="kept")
    s3_outage_server.outage("refuse")  # connections closed at once, no answer
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        impatient.get_object(Bucket=bucket, Key="kept")
    s3_outage_server.restore()

    body = s3_outage_server.client().get_object(Bucket=bucket, Key="kept")["Body"].read()
    assert body == b"payload"


def test_operator_exits_promptly_on_sigterm_while_s3_is_blackholed(
    cluster: Cluster,
    namespace: str,
    s3_outage_server: S3Server,
    s3_secret: str,
    operator_factory: Callable[..., OperatorProcess],
) -> None:
    from tests.cluster.test_operator_pipeline import Api, pipeline

    bucket = s3_outage_server.create_bucket()
    operator = operator_factory(TEMPER_DEFAULT_STORAGE_ENDPOINT=s3_outage_server.endpoint_url)
    operator.wait_role("leader", timeout=60)
    api = Api(cluster, namespace)
    body = pipeline("hung", bucket, pod_annotations={"temper.dev/fake-duration": "120s"})
    body["spec"]["storage"]["endpointUrl"] = s3_outage_server.endpoint_url
    api.create_run(body)
    # While a stage runs, the operator reads its progress from S3 every 0.5 s.
    wait_for("the sft pod to run", lambda: any(p.status.phase == "Running" for p in api.pods("hung")), 60)
    s3_outage_server.outage("blackhole")
    time.sleep(2)  # several progress reads are now stuck waiting for an answer

    assert operator.proc is not None
    operator.proc.terminate()
    try:
        code = operator.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"operator still running 10 s after SIGTERM:\n{operator.log()[-3000:]}"
        ) from None
    assert code == 0, operator.log()[-3000:]
    assert "shutting down" in operator.log()
