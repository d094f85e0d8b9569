"""Real Prometheus for the hermetic cluster, configured from the chart's monitoring objects.

``scrape_configs`` are generated from the rendered ServiceMonitor and PodMonitor the way
prometheus-operator generates them (job names, the selector/port ``keep`` relabelings, the
namespace/pod/container/service/job/endpoint target labels, the Failed/Succeeded pod drop, then
the monitor's own relabelings). The rendered PrometheusRule's ``spec.groups`` are the rule file.

Service discovery:
- PodMonitor: Prometheus' own ``kubernetes_sd_configs`` (role ``pod``) against the hermetic
  apiserver; exec-node pods report podIP 127.0.0.1, so their container ports are scrapeable.
- ServiceMonitor: the operator runs as a local process, and Endpoints may not hold loopback
  addresses, so the ``endpoints`` role cannot find it. The harness writes the target group the
  ``endpoints`` role would produce for the chart's Service (its ``__meta_kubernetes_*`` labels)
  to a ``file_sd_configs`` file; the generated relabelings are then applied by Prometheus as-is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from temper_dev.cluster import Cluster, ClusterError, free_port

PROMETHEUS_VERSION = "v0.316.0"


def default_prometheus_bin() -> Path:
    env = os.environ.get("TEMPER_PROMETHEUS_BIN")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "temper" / f"prometheus-{PROMETHEUS_VERSION}" / "bin"


def binary(name: str) -> Path:
    path = default_prometheus_bin() / name
    if not os.access(path, os.X_OK):
        raise ClusterError(
            f"{name} {PROMETHEUS_VERSION} is not built in {path.parent}; run hack/build-tools.sh "
            "(or point TEMPER_PROMETHEUS_BIN at a directory holding prometheus and promtool)"
        )
    return path


def sanitize(name: str) -> str:
    """Label name as Kubernetes SD spells it: ``temper.dev/run`` -> ``temper_dev_run``."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _selector_relabelings(selector: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """``keep`` rules for a LabelSelector, as prometheus-operator writes them."""
    meta = f"__meta_kubernetes_{kind}_label"
    present = f"__meta_kubernetes_{kind}_labelpresent"
    rules: list[dict[str, Any]] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        rules.append(
            {
                "action": "keep",
                "source_labels": [f"{meta}_{sanitize(key)}", f"{present}_{sanitize(key)}"],
                "regex": f"({value});true",
            }
        )
    for expr in selector.get("matchExpressions") or []:
        key, op, values = sanitize(expr["key"]), expr["operator"], expr.get("values") or []
        if op == "In":
            rules.append(
                {
                    "action": "keep",
                    "source_labels": [f"{meta}_{key}", f"{present}_{key}"],
                    "regex": f"({'|'.join(values)});true",
                }
            )
        elif op == "NotIn":
            rules.append(
                {
                    "action": "drop",
                    "source_labels": [f"{meta}_{key}", f"{present}_{key}"],
                    "regex": f"({'|'.join(values)});true",
                }
            )
        elif op == "Exists":
            rules.append({"action": "keep", "source_labels": [f"{present}_{key}"], "regex": "true"})
        elif op == "DoesNotExist":
            rules.append({"action": "drop", "source_labels": [f"{present}_{key}"], "regex": "true"})
    return rules


def _user_relabelings(relabelings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitor's camelCase RelabelConfigs in Prometheus' snake_case."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k.lower()): v for k, v in r.items()} for r in relabelings]


def _namespaces(selector: dict[str, Any], own: str) -> dict[str, Any] | None:
    if selector.get("any"):
        return None
    return {"names": list(selector.get("matchNames") or [own])}


def _endpoint_settings(ep: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "metrics_path": ep.get("path", "/metrics"),
        "honor_labels": bool(ep.get("honorLabels")),
    }
    if ep.get("interval"):
        out["scrape_interval"] = ep["interval"]
    if ep.get("scrapeTimeout"):
        out["scrape_timeout"] = ep["scrapeTimeout"]
    if ep.get("scheme"):
        out["scheme"] = ep["scheme"]
    return out


def _shard() -> list[dict[str, Any]]:
    return [
        {"source_labels": ["__address__"], "target_label": "__tmp_hash", "modulus": 1, "action": "hashmod"},
        {"source_labels": ["__tmp_hash"], "regex": "0", "action": "keep"},
    ]


def pod_monitor_jobs(monitor: dict[str, Any], sd: dict[str, Any]) -> list[dict[str, Any]]:
    meta, spec = monitor["metadata"], monitor["spec"]
    jobs = []
    for i, ep in enumerate(spec.get("podMetricsEndpoints") or []):
        relabel: list[dict[str, Any]] = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
            *_selector_relabelings(spec.get("selector") or {}, "pod"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": ep["port"],
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
            {"target_label": "endpoint", "replacement": ep["port"]},
            *_user_relabelings(ep.get("relabelings") or []),
            *_shard(),
        ]
        kube_sd = {"role": "pod", **sd}
        namespaces = _namespaces(spec.get("namespaceSelector") or {}, meta["namespace"])
        if namespaces:
            kube_sd["namespaces"] = namespaces
        jobs.append(
            {
                "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/{i}",
                "kubernetes_sd_configs": [kube_sd],
                **_endpoint_settings(ep),
                "relabel_configs": relabel,
            }
        )
    return jobs


def service_monitor_jobs(monitor: dict[str, Any], sd_file: Path) -> list[dict[str, Any]]:
    meta, spec = monitor["metadata"], monitor["spec"]
    jobs = []
    for i, ep in enumerate(spec.get("endpoints") or []):
        relabel: list[dict[str, Any]] = [
            {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
            *_selector_relabelings(spec.get("selector") or {}, "service"),
            {
                "action": "keep",
                "source_labels": ["__meta_kubernetes_endpoint_port_name"],
                "regex": ep["port"],
            },
            {
                "source_labels": [
                    "__meta_kubernetes_endpoint_address_target_kind",
                    "__meta_kubernetes_endpoint_address_target_name",
                ],
                "separator": ";",
                "regex": "Node;(.*)",
                "replacement": "${1}",
                "target_label": "node",
            },
            {
                "source_labels": [
                    "__meta_kubernetes_endpoint_address_target_kind",
                    "__meta_kubernetes_endpoint_address_target_name",
                ],
                "separator": ";",
                "regex": "Pod;(.*)",
                "replacement": "${1}",
                "target_label": "pod",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
            {
                "action": "drop",
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            },
            {
                "source_labels": ["__meta_kubernetes_service_name"],
                "target_label": "job",
                "replacement": "${1}",
            },
            {"target_label": "endpoint", "replacement": ep["port"]},
            *_user_relabelings(ep.get("relabelings") or []),
            *_shard(),
        ]
        jobs.append(
            {
                "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{i}",
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
                **_endpoint_settings(ep),
                "relabel_configs": relabel,
            }
        )
    return jobs


def endpoints_target_group(service: dict[str, Any], address: str, pod: str) -> dict[str, Any]:
    """What the ``endpoints`` role yields for one ready address of ``service`` (named ports only)."""
    meta = service["metadata"]
    labels: dict[str, str] = {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_service_name": meta["name"],
        "__meta_kubernetes_endpoints_name": meta["name"],
        "__meta_kubernetes_endpoint_ready": "true",
        "__meta_kubernetes_endpoint_address_target_kind": "Pod",
        "__meta_kubernetes_endpoint_address_target_name": pod,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_name": "operator",
    }
    for key, value in (meta.get("labels") or {}).items():
        labels[f"__meta_kubernetes_service_label_{sanitize(key)}"] = value
        labels[f"__meta_kubernetes_service_labelpresent_{sanitize(key)}"] = "true"
    groups = []
    for port in service["spec"]["ports"]:
        groups.append(
            {
                "targets": [address],
                "labels": {
                    **labels,
                    "__meta_kubernetes_endpoint_port_name": port.get("name", ""),
                    "__meta_kubernetes_endpoint_port_protocol": port.get("protocol", "TCP"),
                },
            }
        )
    return {"groups": groups}


def rule_file(prometheus_rule: dict[str, Any]) -> dict[str, Any]:
    return {"groups": prometheus_rule["spec"]["groups"]}


class Prometheus:
    """One Prometheus server on 127.0.0.1 with its own TSDB under ``state_dir``."""

    def __init__(self, cluster: Cluster, state_dir: Path, *, evaluation_interval: str = "1s") -> None:
        self.cluster = cluster
        self.dir = state_dir
        self.port = free_port()
        self.evaluation_interval = evaluation_interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.sd_file = state_dir / "operator-endpoints.json"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubernetes_sd(self) -> dict[str, Any]:
        pki = self.cluster.pki
        return {
            "api_server": self.cluster.server,
            "tls_config": {
                "ca_file": str(pki / "ca.crt"),
                "cert_file": str(pki / "admin.crt"),
                "key_file": str(pki / "admin.key"),
            },
        }

    def configure(
        self,
        *,
        service_monitors: list[dict[str, Any]],
        pod_monitors: list[dict[str, Any]],
        rules: list[dict[str, Any]],
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        rule_files = []
        for i, rule in enumerate(rules):
            path = self.dir / f"rules-{i}.yaml"
            path.write_text(yaml.safe_dump(rule_file(rule)))
            rule_files.append(str(path))
        if not self.sd_file.exists():
            self.sd_file.write_text("[]\n")
        jobs = [j for m in service_monitors for j in service_monitor_jobs(m, self.sd_file)]
        jobs += [j for m in pod_monitors for j in pod_monitor_jobs(m, self.kubernetes_sd())]
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": rule_files,
            "scrape_configs": jobs,
        }
        (self.dir / "prometheus.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def set_operator_targets(self, service: dict[str, Any], address: str, pod: str) -> None:
        """Point the ServiceMonitor's file SD at the operator process (atomic, as file SD wants)."""
        groups = endpoints_target_group(service, address, pod)["groups"]
        tmp = self.sd_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.sd_file)

    def start(self, timeout: float = 60) -> Prometheus:
        tool = binary("promtool")
        check = subprocess.run(
            [str(tool), "check", "config", str(self.dir / "prometheus.yaml")],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise ClusterError(f"promtool check config failed:\n{check.stdout}\n{check.stderr}")
        log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [
                    str(binary("prometheus")),
                    f"--config.file={self.dir / 'prometheus.yaml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.dir / "prometheus.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"Prometheus did not become ready:\n{tail}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                return int(resp.status) == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise ClusterError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=str(start), end=str(end), step=step)
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def label_values(self, label: str, match: str) -> list[str]:
        return list(self.api(f"label/{label}/values", **{"match[]": match}))
