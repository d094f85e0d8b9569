"""The operator as users run it: ``helm install charts/temper`` with the locally built images.

The chart's Deployment lands on the exec node (container mode), which runs it from the
operator image with its ServiceAccount token, the chart's RBAC and securityContext, and
``KUBERNETES_SERVICE_HOST/PORT`` pointing at the loopback apiserver. Pods share the host
network, so the health and metrics ports are picked free per install and bound to 127.0.0.1.

:class:`HelmOperator` is shared by ``make demo``, the e2e tests and ``bench/chaos.py``: install,
wait until ready, read /metrics and the pod's log, kill its process (the exec node restarts the
container) or its pod (the Deployment replaces it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "temper"
OPERATOR_IMAGE = "localhost/temper-operator"
TRAINER_IMAGE = "localhost/temper-trainer"
IMAGE_TAG = os.environ.get("TEMPER_IMAGE_TAG", "dev")
POD_LABEL = "app.kubernetes.io/name=temper"


class InClusterError(RuntimeError):
    """The chart did not install or its pod did not become ready; the message says why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_images(log_path: Path | None = None) -> None:
    """``hack/build-images.sh`` (a no-op when the tree is unchanged)."""
    out = log_path.open("ab") if log_path else None
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "hack" / "build-images.sh")], cwd=REPO, stdout=out, stderr=out, check=False
        )
    finally:
        if out:
            out.close()
    if proc.returncode != 0:
        raise InClusterError(f"hack/build-images.sh failed (rc={proc.returncode}); log {log_path}")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` key by key (mappings recursively; anything else replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class HelmOperator:
    """One release of charts/temper watching ``namespace``, installed into ``release_namespace``
    (default: the same namespace)."""

    kubeconfig: Path
    namespace: str
    state_dir: Path  # the exec node's state dir: pod logs live under it
    helm: str = "helm"
    release: str = "temper"
    release_namespace: str = ""
    storage_endpoint: str = ""
    extra_env: Mapping[str, str] = field(default_factory=dict)
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    trainer_metrics_port: int = field(default_factory=free_port)
    lease_seconds: int = 5
    extra_values: Mapping[str, Any] = field(default_factory=dict)  # deep-merged over values()

    @property
    def home(self) -> str:
        return self.release_namespace or self.namespace

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def healthz_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}/healthz"

    def values(self) -> dict[str, Any]:
        env = {"TEMPER_BIND_ADDRESS": "127.0.0.1", **self.extra_env}  # host network: loopback only
        return deep_merge(
            {
                "image": {"repository": OPERATOR_IMAGE, "tag": IMAGE_TAG, "pullPolicy": "IfNotPresent"},
                "trainer": {
                    "image": {"repository": TRAINER_IMAGE, "tag": IMAGE_TAG, "pullPolicy": "IfNotPresent"},
                    "metricsPort": self.trainer_metrics_port,
                },
                "watchNamespaces": [self.namespace],
                "operator": {
                    "healthPort": self.health_port,
                    "metricsPort": self.metrics_port,
                    "leaderElection": {"leaseDurationSeconds": self.lease_seconds},
                    "extraEnv": [{"name": k, "value": v} for k, v in env.items()],
                },
                "storage": {"endpoint": self.storage_endpoint},
                "nodeSelector": {"temper.dev/node-pool": "exec"},
                "terminationGracePeriodSeconds": 10,
            },
            self.extra_values,
        )

    def install(self, timeout: float = 120.0) -> HelmOperator:
        values = self.state_dir / f"values-{self.home}.json"
        values.parent.mkdir(parents=True, exist_ok=True)
        values.write_text(json.dumps(self.values(), indent=2))
        proc = subprocess.run(
            [
                self.helm,
                "upgrade",
                "--install",
                self.release,
                str(CHART),
                "--kubeconfig",
                str(self.kubeconfig),
                "--namespace",
                self.home,
                "--create-namespace",
                "--values",
                str(values),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise InClusterError(f"helm install failed: {proc.stderr.strip() or proc.stdout.strip()}")
        self.wait_ready(timeout)
        return self

    def uninstall(self) -> None:
        subprocess.run(
            [
                self.helm,
                "uninstall",
                self.release,
                "--kubeconfig",
                str(self.kubeconfig),
                "--namespace",
                self.home,
                "--wait",
                "--timeout",
                "60s",
            ],
            capture_output=True,
            timeout=90,
            check=False,
        )

    # the pod
    def _core(self) -> Any:
        from kubernetes import client, config

        return client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig)))

    def pods(self) -> list[Any]:
        items = self._core().list_namespaced_pod(self.home, label_selector=POD_LABEL).items
        return [p for p in items if not p.metadata.deletion_timestamp]

    def pod(self) -> Any | None:
        running = [p for p in self.pods() if p.status.phase == "Running"]
        return running[0] if running else None

    def restarts(self) -> int:
        return sum(cs.restart_count for p in self.pods() for cs in p.status.container_statuses or [])

    def _get(self, url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return int(resp.status), resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def healthy(self) -> bool:
        return self._get(self.healthz_url)[0] == 200

    def alive(self) -> bool:
        """Running or about to be again: a Deployment's operator is never gone for good."""
        return bool(self.pods())

    def role(self) -> str:
        status, body = self._get(f"http://127.0.0.1:{self.health_port}/readyz")
        return body if status in (200, 503) else ""

    def wait_ready(self, timeout: float = 120.0, role: str = "leader") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pod() is not None and self.role() == role:
                return
            time.sleep(0.25)
        raise InClusterError(
            f"the operator pod in {self.home} is not {role} after {timeout:.0f}s: "
            f"{self.describe()}\n{self.log()[-3000:]}"
        )

    def describe(self) -> str:
        parts = []
        for pod in self.pods():
            for cs in pod.status.container_statuses or []:
                state = cs.state.waiting or cs.state.terminated or cs.state.running
                parts.append(f"{pod.metadata.name} {pod.status.phase} {state}")
        return "; ".join(parts) or "no pod"

    def metrics(self) -> str:
        status, body = self._get(self.metrics_url)
        if status != 200:
            raise InClusterError(f"{self.metrics_url} answered {status}")
        return body

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def log(self) -> str:
        """Every operator container's log of this release, oldest pod first."""
        base = self.state_dir / "pods" / self.home
        dirs = sorted(
            (d for d in base.glob(f"{self.release}-*/*") if (d / "logs").is_dir()),
            key=lambda d: d.stat().st_mtime,
        )
        return "".join(
            p.read_text(errors="replace") for d in dirs for p in sorted((d / "logs").glob("*.log"))
        )

    # faults
    def kill_process(self) -> None:
        """SIGKILL the operator's process; the exec node restarts the container (restartPolicy Always)."""
        from temper_dev.oci import LABEL_NODE, Podman

        pod = self.pod()
        if pod is None:
            return
        podman = Podman()
        listing = podman.run(
            "ps", "--quiet", f"--filter=label={LABEL_NODE}", "--filter", f"name={pod.metadata.uid[:13]}"
        )
        for cid in listing.stdout.split():
            podman.run("kill", "--signal=KILL", cid)

    def kill_pod(self) -> str:
        """Delete the pod with no grace; the Deployment's ReplicaSet creates a new one."""
        pod = self.pod()
        if pod is None:
            return ""
        self._core().delete_namespaced_pod(pod.metadata.name, self.home, grace_period_seconds=0)
        return str(pod.metadata.name)
