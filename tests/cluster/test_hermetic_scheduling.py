"""The hermetic cluster schedules like a real GPU cluster, so examples need no hermetic-only
tolerations or nodeSelectors: the exec node is the untainted general-purpose pool, the kwok GPU
nodes carry the GPU taint, and ExtendedResourceToleration (as on GKE/AKS) makes pods that
request nvidia.com/gpu tolerate it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client
from temper_dev.cluster import Cluster

pytestmark = pytest.mark.cluster

RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod(name: str, limits: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": "local",
        "command": ["python", "-c", "print('scheduled')"],
        "securityContext": RESTRICTED_CONTAINER,
    }
    if limits:
        container["resources"] = {"limits": limits}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": RESTRICTED_POD,
            "containers": [container],
            **spec,
        },
    }


def _node_of(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node = core.read_namespaced_pod(name, namespace).spec.node_name
        if node:
            return str(node)
        time.sleep(0.1)
    raise AssertionError(f"pod {namespace}/{name} was never scheduled")


def test_plain_cpu_pod_lands_on_the_untainted_exec_node(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, _pod("cpu"))  # no toleration, no nodeSelector
        assert _node_of(core, namespace, "cpu") == "exec-node"
        taints = core.read_node("exec-node").spec.taints or []
        assert not taints, taints
        assert any(t.key == "nvidia.com/gpu" for t in core.read_node("kwok-gpu-0").spec.taints or [])


def test_gpu_pod_gets_the_gpu_toleration_from_admission(cluster: Cluster, namespace: str) -> None:
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        body = _pod("gpu", {"nvidia.com/gpu": "1"}, nodeSelector={"temper.dev/node-pool": "kwok"})
        created = core.create_namespaced_pod(namespace, body)
        keys = {t.key for t in created.spec.tolerations or []}
        assert "nvidia.com/gpu" in keys, created.spec.tolerations
        assert _node_of(core, namespace, "gpu").startswith("kwok-gpu-")
