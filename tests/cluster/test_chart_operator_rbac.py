"""The real operator, authenticated as the chart's ServiceAccount, completes a full run.

The chart is installed into the hermetic cluster; the operator runs out of the cluster with the
chart's own Deployment environment and a kubeconfig holding a TokenRequest token of the chart's
ServiceAccount. So every API call goes through authentication and RBAC exactly as in the pod
(no impersonation headers, no admin fallback). A SFT -> DPO -> eval run on kwok pods, with the
stage outputs published to the loopback S3 server, must succeed with both Adapters verified, and
nothing anywhere may be forbidden: not in the operator's log, not in its API-error metric and not
in the apiserver's own count of 403 answers. Then the same in single-namespace mode (by upgrade).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.cluster.test_chart_install import (
    Release,
    allowed,
    chart_release,
    kubectl,
    service_account_kubeconfig,
)
from tests.cluster.test_operator_pipeline import GROUP, PLURAL, VERSION, Api, pipeline, publish, wait_for
from tests.fixtures.operator import OperatorProcess
from tests.unit.test_chart_helm import CHART

pytestmark = pytest.mark.cluster

# A denial as the kubernetes client, kopf and the operator log it ("(403)", "Reason: Forbidden",
# "HTTP 403"); bare numbers are not matched, as log timestamps' milliseconds can read 403.
FORBIDDEN = re.compile(
    r"forbidden|unauthorized|\(40[13]\)|(?:http|status|code)[\s:=\"']*40[13]\b", re.IGNORECASE
)
# Environment the chart fills from the pod (fieldRef) or that must differ out of the cluster:
# loopback listeners on free ports, and a fast Lease so the test need not wait 15 s to lead.
LOCAL_ONLY = {"TEMPER_HEALTH_PORT", "TEMPER_METRICS_PORT", "TEMPER_LEASE_DURATION_SECONDS"}
REQUEST_TOTAL = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def chart_operator_env(release: Release, sa_kubeconfig: Path) -> dict[str, str]:
    """The operator container's env exactly as the chart renders it, pointed at the SA kubeconfig."""
    deployment = next(o for o in release.manifest() if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {
        e["name"]: str(e["value"]) for e in container["env"] if "value" in e and e["name"] not in LOCAL_ONLY
    }
    env["TEMPER_LEASE_NAMESPACE"] = release.namespace  # fieldRef metadata.namespace in the pod
    env["KUBECONFIG"] = str(sa_kubeconfig)
    return env


def apiserver_requests(kubeconfig: Path) -> Counter[tuple[str, ...]]:
    """The apiserver's request counter: (code, verb, group, resource, subresource) -> count."""
    out: Counter[tuple[str, ...]] = Counter()
    for line in kubectl(kubeconfig, "get", "--raw", "/metrics").splitlines():
        match = REQUEST_TOTAL.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        key = tuple(labels.get(k, "") for k in ("code", "verb", "group", "resource", "subresource"))
        out[key] += int(float(match["value"]))
    return out


def denied(before: Counter[tuple[str, ...]], after: Counter[tuple[str, ...]]) -> dict[tuple[str, ...], int]:
    return {k: v - before[k] for k, v in after.items() if k[0] in ("401", "403") and v > before[k]}


def quiesce_other_namespaces(api: client.ApiClient, keep: str, timeout: float = 90) -> None:
    """Wait until no other namespace is Terminating, so a cluster-wide operator sees a quiet cluster.

    Earlier tests delete their namespaces in the background; creating anything in a Terminating
    namespace is answered 403, which this test must not mistake for missing RBAC. Adapters and
    runs whose finalizer's operator is gone would hold such a namespace forever: drop them.
    """
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    while True:
        terminating = [
            n.metadata.name
            for n in core.list_namespace().items
            if n.status.phase == "Terminating" and n.metadata.name != keep
        ]
        if not terminating:
            return
        assert time.monotonic() < deadline, f"namespaces stuck Terminating: {terminating}"
        for ns, plural in itertools.product(terminating, ("adapters", PLURAL)):
            for obj in custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]:
                if obj["metadata"].get("finalizers"):
                    name, unblock = obj["metadata"]["name"], {"metadata": {"finalizers": None}}
                    with contextlib.suppress(client.ApiException):  # already gone: fine
                        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, plural, name, unblock)
        time.sleep(0.5)


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Iterator[Api]:
    handle = Api(cluster, namespace)
    with handle.api_client:
        yield handle


def run_pipeline_as_service_account(
    api: Api, operator: OperatorProcess, s3_server: S3Server, bucket: str, run: str, tmp_path: Path
) -> None:
    for stage, kind in (("sft", "sft"), ("align", "dpo")):
        publish(s3_server, bucket, run, stage, tmp_path, kind)
    api.create_run(pipeline(run, bucket, pod_annotations={"temper.dev/fake-duration": "300ms"}))
    wait_for(f"run {run} finished", lambda: api.succeeded(run) or api.failed(run), 90, operator)
    status = api.run(run)["status"]
    assert api.succeeded(run), status
    assert [(s["name"], s["state"]) for s in status["stages"]] == [
        ("sft", "Succeeded"),
        ("align", "Succeeded"),
        ("regress", "Succeeded"),
    ]

    def adapters_ready() -> dict[str, dict[str, Any]] | None:
        mine = {a["metadata"]["name"]: a for a in api.adapters() if a["metadata"]["name"].startswith(run)}
        ready = all(a.get("status", {}).get("phase") == "Ready" for a in mine.values())
        return mine if len(mine) == 2 and ready else None

    adapters = wait_for(f"{run}'s Adapters Ready", adapters_ready, 30, operator)
    for name, adapter in adapters.items():
        conditions = {c["type"]: c for c in adapter["status"]["conditions"]}
        assert conditions["Ready"]["reason"] == "ArtifactVerified", name
        assert conditions["Reconciling"]["status"] == "False", name
        assert conditions["Stalled"]["status"] == "False", name
        assert adapter["status"]["artifact"]["files"] == 2, name
    # Events were recorded under the ServiceAccount too (kopf's and the operator's own).
    assert "RunSucceeded" in [e.reason for e in api.events(run)]


def assert_nothing_forbidden(
    operator: OperatorProcess, kubeconfig: Path, before: Counter[tuple[str, ...]]
) -> None:
    hits = [line for line in operator.log().splitlines() if FORBIDDEN.search(line)]
    assert not hits, "\n".join(hits[:20])
    assert operator.metric("temper_api_errors_total", code="403") == 0
    assert operator.metric("temper_api_errors_total", code="401") == 0
    assert operator.metric("temper_api_requests_total") > 0  # the metric is live, so 0 errors means something
    assert not denied(before, apiserver_requests(kubeconfig)), denied(before, apiserver_requests(kubeconfig))


def test_operator_as_chart_service_account_runs_pipeline_without_forbidden(
    cluster: Cluster,
    temper_crds: None,
    namespace: str,
    api: Api,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tmp_path: Path,
) -> None:
    kubeconfig = Path(cluster.kubeconfig)

    def jobs_allowed(release: Release, where: str) -> bool:
        return allowed(api.api_client, release, "batch", "jobs", "create", where)

    # No in-cluster replica (its image cannot run here): the out-of-cluster operator is the replica.
    # kwok's fake pod durations travel as pod annotations, which the platform must allow.
    values = {
        "replicaCount": 0,
        "storage": {"endpoint": s3_server.endpoint_url, "credentialsSecret": s3_secret},
        "policy": {"allowPodAnnotations": True},
        "rbac": {"servedNamespaces": [namespace]},  # cluster-wide: Secrets only where temper serves
    }
    with chart_release(kubeconfig, namespace, values=values) as release:
        sa_kubeconfig = service_account_kubeconfig(release, api.api_client, tmp_path)
        env = chart_operator_env(release, sa_kubeconfig)
        assert env["TEMPER_NAMESPACES"] == ""  # the chart's default: cluster-wide
        # The denial list: no Secret read, no ConfigMap write in kube-system or an unserved namespace.
        for where in ("kube-system", "default"):
            for resource, verb in (("secrets", "get"), ("configmaps", "create"), ("configmaps", "update")):
                assert not allowed(api.api_client, release, "", resource, verb, where), (
                    where,
                    resource,
                    verb,
                )
        assert env["TEMPER_DEFAULT_STORAGE_ENDPOINT"] == s3_server.endpoint_url
        # The RBAC authorizer learns of new bindings through an informer: wait until they hold.
        wait_for("the chart's bindings to take effect", lambda: jobs_allowed(release, namespace), 10)
        quiesce_other_namespaces(api.api_client, namespace)
        before = apiserver_requests(kubeconfig)
        operator = OperatorProcess(cluster, namespace, "chart-sa", tmp_path, env).start()
        try:
            operator.wait_role("leader")
            run_pipeline_as_service_account(api, operator, s3_server, s3_bucket, "sa-wide", tmp_path)
            assert_nothing_forbidden(operator, kubeconfig, before)
        finally:
            operator.stop()

        # Single-namespace mode: Role/RoleBinding in the watched namespace only.
        release.helm("upgrade", release.name, str(CHART), values={**values, "watchNamespaces": [namespace]})
        wait_for("the cluster-wide grant to go", lambda: not jobs_allowed(release, "default"), 10)
        wait_for("the namespaced grant", lambda: jobs_allowed(release, namespace), 10)
        env = chart_operator_env(release, sa_kubeconfig)
        assert env["TEMPER_NAMESPACES"] == namespace
        before = apiserver_requests(kubeconfig)
        operator = OperatorProcess(cluster, namespace, "chart-sa-ns", tmp_path, env).start()
        try:
            operator.wait_role("leader")
            run_pipeline_as_service_account(api, operator, s3_server, s3_bucket, "sa-ns", tmp_path)
            assert_nothing_forbidden(operator, kubeconfig, before)
        finally:
            operator.stop()
