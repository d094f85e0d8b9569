"""The exec node: a minimal node agent that runs pods bound to Node ``exec-node`` as processes.

It registers the Node (GPU capacity but no GPU taint: it is the cluster's general-purpose pool,
where CPU-only pods land as on a real cluster, and GPU pods may land too),
renews its Lease, watches its pods and runs each container's ``command`` + ``args`` locally in
its own process group. Per pod it keeps a scratch dir ``<state>/pods/<ns>/<name>/<uid>/`` with
``volumes/`` (emptyDir, configMap and secret files; a persistentVolumeClaim maps to its bound
PV's hostPath), ``home/``, ``tmp/``, ``logs/<c>.log`` and
``termination/<c>`` (the container's ``TEMPER_TERMINATION_LOG``).

What it cannot honour it rejects by failing the pod with reason ``UnsupportedPodSpec``: other
volume types (including the projected service-account token: set
``automountServiceAccountToken: false``), container commands taken from the image, sidecars,
lifecycle hooks and resourceFieldRef env. Not enforced locally (documented, not hidden):
securityContext user/group IDs and capabilities (PodSecurity admission still checks the spec),
resource limits, probes (the container counts as ready once started) and images.

Pod DNS: a pod with ``hostname`` + ``subdomain`` (an Indexed Job's pod under its headless
Service) resolves as ``<hostname>.<subdomain>[.<ns>.svc.cluster.local]`` to 127.0.0.1 for every
pod here, as cluster DNS would, through nss_wrapper (``PodDns``; hack/build-tools.sh fetches it).

The pure functions (env resolution, path rewriting, status building, validation) are unit
tested in ``tests/unit/test_execnode_*.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper_dev import oci

NODE_NAME = "exec-node"
GPU_RESOURCE = "nvidia.com/gpu"
EXEC_GPUS = 4
LEASE_SECONDS = 40
DELIVERY_DEADLINE_SECONDS = 300
HEARTBEAT_SECONDS = 10
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
POD_IP = "127.0.0.1"
SUPPORTED_VOLUMES = ("emptyDir", "configMap", "secret", "persistentVolumeClaim")
# Container mode also mounts what only a real filesystem boundary makes meaningful.
CONTAINER_VOLUMES = (*SUPPORTED_VOLUMES, "projected", "hostPath")
RUNTIMES = ("process", "container")
UNSUPPORTED_REASON = "UnsupportedPodSpec"
CONFIG_ERROR_REASON = "CreateContainerConfigError"

log = logging.getLogger("temper_dev.execnode")

Pod = dict[str, Any]


class PodSpecError(ValueError):
    """The pod asks for something this agent cannot honour; the message names the field."""


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_dirs(state_dir: Path | str, namespace: str, name: str) -> list[Path]:
    """Scratch dirs of every incarnation of a pod name, oldest first."""
    base = Path(state_dir) / "pods" / namespace / name
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


# --- pure parts -----------------------------------------------------------------------------


def validate_pod(pod: Pod, runtime: str = "process") -> None:
    """Raise PodSpecError naming the first field the agent cannot honour."""
    spec = pod.get("spec", {})
    supported = CONTAINER_VOLUMES if runtime == "container" else SUPPORTED_VOLUMES
    for index, volume in enumerate(spec.get("volumes") or []):
        kinds = [k for k in volume if k != "name"]
        if not any(k in supported for k in kinds):
            kind = kinds[0] if kinds else "?"
            hint = ""
            if kind == "projected" and "kube-api-access" in volume.get("name", ""):
                hint = " (service-account token; set automountServiceAccountToken: false)"
            raise PodSpecError(
                f"spec.volumes[{index}] ({volume.get('name')}): volume type {kind!r} is not "
                f"supported by the exec node{hint}; supported: {', '.join(supported)}"
            )
    for group in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(group) or []):
            where = f"spec.{group}[{index}] ({container.get('name')})"
            if not container.get("command") and runtime == "process":
                raise PodSpecError(f"{where}.command: required on the exec node (it runs no images)")
            if group == "initContainers" and container.get("restartPolicy") == "Always":
                raise PodSpecError(f"{where}.restartPolicy: sidecar containers are not supported")
            if container.get("lifecycle"):
                raise PodSpecError(f"{where}.lifecycle: hooks are not supported")
            for env_index, env in enumerate(container.get("env") or []):
                source = env.get("valueFrom") or {}
                if "resourceFieldRef" in source:
                    raise PodSpecError(
                        f"{where}.env[{env_index}] ({env.get('name')}): resourceFieldRef is not supported"
                    )
            for mount_index, mount in enumerate(container.get("volumeMounts") or []):
                names = {v.get("name") for v in spec.get("volumes") or []}
                if mount.get("name") not in names:
                    raise PodSpecError(
                        f"{where}.volumeMounts[{mount_index}]: unknown volume {mount.get('name')!r}"
                    )
    if spec.get("ephemeralContainers"):
        raise PodSpecError("spec.ephemeralContainers: not supported")


def _field_ref(pod: Pod, path: str) -> str:
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
        "status.podIP": POD_IP,
        "status.hostIP": POD_IP,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)(?:\['([^']+)'\])?", path)
    if match:
        values: Mapping[str, str] = meta.get(match.group(1)) or {}
        if match.group(2) is not None:
            return str(values.get(match.group(2), ""))
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    raise PodSpecError(f"fieldRef.fieldPath {path!r} is not supported")


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names expand, ``$$`` escapes, unknown stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(replace, text)


Lookup = Callable[[str, str], Mapping[str, str] | None]
"""(kind, name) -> data of that ConfigMap/Secret in the pod's namespace (decoded), or None."""


def resolve_env(container: Mapping[str, Any], pod: Pod, lookup: Lookup) -> dict[str, str]:
    """The container's env as Kubernetes defines it: envFrom first, then env in order."""
    result: dict[str, str] = {}
    for index, source in enumerate(container.get("envFrom") or []):
        prefix = source.get("prefix") or ""
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if ref is None:
                continue
            data = lookup(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"envFrom[{index}].{key}: {kind} {ref['name']!r} not found")
            result.update({prefix + k: v for k, v in data.items()})
    for env in container.get("env") or []:
        name = env["name"]
        if "valueFrom" not in env:
            result[name] = expand_vars(env.get("value") or "", result)
            continue
        source = env["valueFrom"]
        if "fieldRef" in source:
            result[name] = _field_ref(pod, source["fieldRef"]["fieldPath"])
            continue
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            ref = source.get(key)
            if ref is None:
                continue
            data = lookup(kind, ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    break
                what = f"{kind} {ref['name']!r}" if data is None else f"key {ref['key']!r}"
                raise PodSpecError(f"env {name}.valueFrom.{key}: {what} not found")
            result[name] = data[ref["key"]]
            break
        else:
            raise PodSpecError(f"env {name}.valueFrom: unsupported source {sorted(source)}")
    return result


def rewrite_paths(text: str, mounts: Mapping[str, str]) -> str:
    """Replace each mountPath prefix in ``text`` by its local dir (longest mount first).

    A mountPath matches only as a whole path component: ``/data`` rewrites ``/data`` and
    ``/data/x`` and ``--out=/data/x`` but not ``/database``.
    """
    if not mounts:
        return text
    by_path = {m.rstrip("/") or "/": local for m, local in mounts.items()}
    # One pass, longest mount first, so a replacement is never rewritten again.
    alternatives = "|".join(re.escape(m) for m in sorted(by_path, key=len, reverse=True))
    pattern = re.compile(r"(?<![\w.\-/])(" + alternatives + r")(?=/|$|[^\w.\-])")

    def replace(match: re.Match[str]) -> str:
        return by_path[match.group(1)]

    return pattern.sub(replace, text)


def termination_message(written: str, log_text: str, exit_code: int, policy: str | None) -> str:
    """What the kubelet reports as terminated.message (file first, logs as fallback)."""
    message = written[-MAX_TERMINATION_MESSAGE:] if written else ""
    if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
        lines = log_text.splitlines()[-FALLBACK_LOG_LINES:]
        message = "\n".join(lines)[-MAX_TERMINATION_MESSAGE:]
    return message


@dataclass
class ContainerState:
    name: str
    image: str
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    exit_code: int = 0
    started_at: str = ""
    finished_at: str = ""
    restart_count: int = 0
    image_id: str = ""

    def as_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "restartCount": self.restart_count,
            "ready": self.state == "running",
            "started": self.state == "running",
        }
        if self.state == "running":
            status["state"] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            terminated: dict[str, Any] = {
                "exitCode": self.exit_code,
                "reason": self.reason,
                "startedAt": self.started_at or None,
                "finishedAt": self.finished_at,
            }
            if self.message:
                terminated["message"] = self.message
            status["state"] = {"terminated": terminated}
        else:
            waiting: dict[str, Any] = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            status["state"] = {"waiting": waiting}
        return status


def pod_phase(containers: list[ContainerState], restart_policy: str) -> str:
    if any(c.state == "running" for c in containers):
        return "Running"
    if containers and all(c.state == "terminated" for c in containers):
        if all(c.exit_code == 0 for c in containers):
            return "Succeeded"
        return "Failed" if restart_policy == "Never" else "Running"
    return "Pending"


def build_status(
    phase: str,
    containers: list[ContainerState],
    init_containers: list[ContainerState],
    start_time: str,
    *,
    reason: str = "",
    message: str = "",
) -> dict[str, Any]:
    """A kubelet-like pod status (strategic-merge patch body)."""
    now = now_rfc3339()
    ready = phase == "Running" and all(c.state == "running" for c in containers)
    initialized = all(c.state == "terminated" and c.exit_code == 0 for c in init_containers)
    finished_reason = {"Succeeded": "PodCompleted", "Failed": "PodFailed"}.get(phase, "")

    def condition(kind: str, ok: bool, why: str = "") -> dict[str, Any]:
        cond: dict[str, Any] = {
            "type": kind,
            "status": "True" if ok else "False",
            "lastTransitionTime": now,
            "lastProbeTime": None,
        }
        if not ok and why:
            cond["reason"] = why
        return cond

    not_ready_why = finished_reason or "ContainersNotReady"
    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": POD_IP,
        "hostIPs": [{"ip": POD_IP}],
        "podIP": POD_IP,
        "podIPs": [{"ip": POD_IP}],
        "startTime": start_time,
        "conditions": [
            condition("PodReadyToStartContainers", True),
            condition("Initialized", initialized or phase != "Pending", "ContainersNotInitialized"),
            condition("ContainersReady", ready, not_ready_why),
            condition("Ready", ready, not_ready_why),
        ],
        "containerStatuses": [c.as_status() for c in containers],
    }
    if init_containers:
        status["initContainerStatuses"] = [c.as_status() for c in init_containers]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


def container_env(
    base: Mapping[str, str], resolved: Mapping[str, str], scratch: Path, termination_file: Path
) -> dict[str, str]:
    """Process env: a minimal base, the pod's env on top, scratch HOME/TMPDIR, venv on PATH."""
    env = dict(base)
    env["HOME"] = str(scratch / "home")
    env["TMPDIR"] = str(scratch / "tmp")
    env.update(resolved)
    python_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PATH"] = python_dir + os.pathsep + path
    env["TEMPER_TERMINATION_LOG"] = str(termination_file)
    return env


# --- pod DNS: the names cluster DNS gives this node's pods ---------------------------------------
# Every pod here is a local process at 127.0.0.1, so a pod with ``hostname`` + ``subdomain`` (an
# Indexed Job's pods under their headless Service) resolves to loopback, under the short name
# (what resolv.conf's search domains complete) and every longer form. Processes see the names
# through nss_wrapper (Debian's libnss-wrapper): LD_PRELOAD + NSS_WRAPPER_HOSTS, no root needed.

CLUSTER_DOMAIN = "cluster.local"
NSS_WRAPPER_ENV = "TEMPER_NSS_WRAPPER"  # path of libnss_wrapper.so, when not in a default place


def pod_dns_names(pod: Pod) -> list[str]:
    """``<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]`` for a pod with both fields."""
    spec, namespace = pod.get("spec") or {}, (pod.get("metadata") or {}).get("namespace", "default")
    host, sub = spec.get("hostname"), spec.get("subdomain")
    if not host or not sub:
        return []
    base = f"{host}.{sub}"
    return [
        base,
        f"{base}.{namespace}",
        f"{base}.{namespace}.svc",
        f"{base}.{namespace}.svc.{CLUSTER_DOMAIN}",
    ]


def hosts_file_text(names: Mapping[str, list[str]]) -> str:
    """An /etc/hosts-format file mapping every name to IPv4 and IPv6 loopback (c10d asks for both)."""
    lines = []
    for pod_names in names.values():
        if pod_names:
            lines += [f"{POD_IP} {' '.join(pod_names)}", f"::1 {' '.join(pod_names)}"]
    return "\n".join(lines) + "\n"


def nss_wrapper_library() -> Path | None:
    explicit = os.environ.get(NSS_WRAPPER_ENV)
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    roots = [Path("/usr/lib"), oci.cache_root() / "nss-wrapper"]  # where build-tools.sh puts it
    for root in roots:
        found = sorted(root.glob("**/libnss_wrapper.so*")) if root.is_dir() else []
        if found:
            return found[0]
    return None


class PodDns:
    """The node's hosts file for pod DNS names, rewritten atomically as pods come and go."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "dns" / "hosts"
        self.library = nss_wrapper_library()
        self.names: dict[str, list[str]] = {}
        self.lock = threading.Lock()

    def add(self, pod: Pod) -> None:
        names = pod_dns_names(pod)
        if not names:
            return
        if self.library is None:
            raise PodSpecError(
                "spec.subdomain: pod DNS names on the exec node need libnss-wrapper (hack/build-tools.sh "
                f"installs it; or set {NSS_WRAPPER_ENV})"
            )
        with self.lock:
            self.names[pod["metadata"]["uid"]] = names
            self._write()

    def remove(self, uid: str) -> None:
        with self.lock:
            if self.names.pop(uid, None) is not None:
                self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(hosts_file_text(self.names))
        tmp.replace(self.path)

    def env(self) -> dict[str, str]:
        if self.library is None or not self.path.exists():
            return {}
        return {"LD_PRELOAD": str(self.library), "NSS_WRAPPER_HOSTS": str(self.path)}


# --- the agent ------------------------------------------------------------------------------


@dataclass
class PodRunner:
    """Runs one pod in a thread; ``stop(grace)`` handles deletion."""

    agent: ExecNodeAgent
    pod: Pod
    thread: threading.Thread | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = 30.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Container mode: podman container names by container, Memory emptyDirs (volume -> bytes,
    # 0 unbounded) and read-only volumes; ``report`` patches the pod's current status.
    containers: dict[str, str] = field(default_factory=dict)
    tmpfs: dict[str, int] = field(default_factory=dict)
    read_only: set[str] = field(default_factory=set)
    report: Callable[[], None] = lambda: None

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def scratch(self) -> Path:
        return self.agent.state_dir / "pods" / self.namespace / self.name / self.uid

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self.thread.start()

    def stop(self, grace: float) -> None:
        with self.lock:
            if self.stopping.is_set():
                return
            self.grace_seconds = grace
            self.stopping.set()
            targets = list(self.processes.values())
            names = list(self.containers.values())
        for proc in targets:
            _kill_group(proc, signal.SIGTERM)
        for name in names:  # SIGTERM, SIGKILL after the grace period, like a CRI runtime
            threading.Thread(target=self.agent.podman.stop, args=(name, grace), daemon=True).start()

    def _run(self) -> None:
        try:
            self._run_pod()
        except Exception as err:  # a bug here must surface on the pod, not vanish
            log.exception("pod %s/%s crashed the runner", self.namespace, self.name)
            self.agent.patch_status(
                self.pod,
                build_status("Failed", [], [], now_rfc3339(), reason="ExecNodeError", message=str(err)),
            )
        finally:
            if self.stopping.is_set():
                self.agent.finalize_deletion(self.pod)
            self.agent.forget(self.uid)

    def _fail(self, reason: str, message: str, start_time: str) -> None:
        spec = self.pod["spec"]
        containers = [
            ContainerState(c["name"], c.get("image", ""), reason=reason, message=message)
            for c in spec.get("containers", [])
        ]
        self.agent.patch_status(
            self.pod, build_status("Failed", containers, [], start_time, reason=reason, message=message)
        )

    def _run_pod(self) -> None:
        spec = self.pod["spec"]
        start_time = now_rfc3339()
        try:
            validate_pod(self.pod, self.agent.runtime)
            self.agent.dns.add(self.pod)
        except PodSpecError as err:
            self._fail(UNSUPPORTED_REASON, str(err), start_time)
            return
        try:
            mounts_by_volume = self._prepare_volumes()
        except PodSpecError as err:
            self._fail(CONFIG_ERROR_REASON, str(err), start_time)
            return
        init_states = [
            ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []
        ]
        states = [ContainerState(c["name"], c.get("image", "")) for c in spec.get("containers") or []]
        restart_policy = spec.get("restartPolicy", "Always")
        self.report = lambda: self.agent.patch_status(
            self.pod, build_status(pod_phase(states, restart_policy), states, init_states, start_time)
        )
        self.agent.patch_status(self.pod, build_status("Pending", states, init_states, start_time))
        try:
            envs = {
                c["name"]: self._resolve_env_with_retry(c)
                for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
            }
        except PodSpecError as err:
            self._fail(CONFIG_ERROR_REASON, str(err), start_time)
            return

        for container, state in zip(spec.get("initContainers") or [], init_states, strict=True):
            while not self.stopping.is_set():
                self._run_container(container, state, envs[container["name"]], mounts_by_volume)
                self.agent.patch_status(self.pod, build_status("Pending", states, init_states, start_time))
                if state.exit_code == 0 or restart_policy == "Never":
                    break
                state.restart_count += 1
                time.sleep(min(10.0, 2.0**state.restart_count / 2))
            if state.exit_code != 0 or self.stopping.is_set():
                for other in states:
                    other.reason = "PodInitializing"
                self.agent.patch_status(self.pod, build_status("Failed", states, init_states, start_time))
                return

        threads = [
            threading.Thread(
                target=self._container_loop,
                args=(
                    container,
                    state,
                    envs[container["name"]],
                    mounts_by_volume,
                    restart_policy,
                    states,
                    init_states,
                    start_time,
                ),
                daemon=True,
            )
            for container, state in zip(spec.get("containers") or [], states, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        phase = pod_phase(states, restart_policy)
        if phase == "Running":  # stopped while a container waited to restart
            phase = "Failed"
        self.agent.patch_status(self.pod, build_status(phase, states, init_states, start_time))

    def _container_loop(
        self,
        container: Mapping[str, Any],
        state: ContainerState,
        env: Mapping[str, str],
        mounts_by_volume: Mapping[str, Path],
        restart_policy: str,
        states: list[ContainerState],
        init_states: list[ContainerState],
        start_time: str,
    ) -> None:
        while True:
            self._run_container(
                container,
                state,
                env,
                mounts_by_volume,
                on_start=lambda: self.agent.patch_status(
                    self.pod, build_status(pod_phase(states, restart_policy), states, init_states, start_time)
                ),
            )
            restart = restart_policy == "Always" or (restart_policy == "OnFailure" and state.exit_code != 0)
            if not restart or self.stopping.is_set():
                return
            self.agent.patch_status(
                self.pod, build_status(pod_phase(states, restart_policy), states, init_states, start_time)
            )
            state.restart_count += 1
            self.stopping.wait(min(10.0, 2.0**state.restart_count / 2))
            if self.stopping.is_set():
                return

    def _resolve_env_with_retry(self, container: Mapping[str, Any]) -> dict[str, str]:
        # A kubelet retries missing ConfigMaps/Secrets; bounded here so tests fail, not hang.
        deadline = time.monotonic() + 20
        while True:
            try:
                return resolve_env(container, self.pod, self.agent.lookup_for(self.namespace))
            except PodSpecError:
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise
                time.sleep(1)

    def _prepare_volumes(self) -> dict[str, Path]:
        base = self.scratch
        for sub in ("home", "tmp", "logs", "termination", "volumes"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        dirs: dict[str, Path] = {}
        lookup = self.agent.lookup_for(self.namespace)
        for volume in self.pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"].get("claimName", "")
                dirs[volume["name"]] = self.agent.claim_host_path(self.namespace, claim)
                continue
            path = base / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if self.agent.runtime == "container":
                dirs[volume["name"]] = self._container_volume(volume, path, lookup)
                continue
            for kind, key, ref_key in (
                ("ConfigMap", "configMap", "name"),
                ("Secret", "secret", "secretName"),
            ):
                if key not in volume:
                    continue
                source = volume[key]
                data = lookup(kind, source.get(ref_key, ""))
                if data is None:
                    if source.get("optional"):
                        continue
                    raise PodSpecError(f"volume {volume['name']}: {kind} {source.get(ref_key)!r} not found")
                items = source.get("items")
                pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
                for data_key, rel in pairs:
                    target = path / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data.get(data_key, ""))
            dirs[volume["name"]] = path
        return dirs

    def _run_container(
        self,
        container: Mapping[str, Any],
        state: ContainerState,
        env: Mapping[str, str],
        mounts_by_volume: Mapping[str, Path],
        on_start: Callable[[], None] | None = None,
    ) -> None:
        if self.agent.runtime == "container":
            self._run_oci(container, state, env, mounts_by_volume, on_start)
            return
        name = container["name"]
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            local = mounts_by_volume[mount["name"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = str(local)
        termination_file = self.scratch / "termination" / name
        termination_file.write_text("")
        resolved = {k: rewrite_paths(v, mounts) for k, v in env.items()}
        full_env = container_env(self.agent.base_env, resolved, self.scratch, termination_file)
        full_env.update(self.agent.dns.env())
        argv = [
            rewrite_paths(expand_vars(arg, resolved), mounts)
            for arg in list(container.get("command") or []) + list(container.get("args") or [])
        ]
        workdir = rewrite_paths(container.get("workingDir") or "", mounts) or str(self.scratch / "home")
        log_path = self.scratch / "logs" / f"{name}.log"
        with self.lock:
            if self.stopping.is_set():
                state.state, state.reason, state.exit_code = "terminated", "Error", 137
                state.finished_at = now_rfc3339()
                return
            with open(log_path, "ab") as log_file:
                try:
                    proc = subprocess.Popen(
                        argv,
                        env=full_env,
                        cwd=workdir,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                except OSError as err:
                    state.state, state.reason, state.exit_code = "terminated", "StartError", 128
                    state.message = f"{argv[0]}: {err}"
                    state.started_at = state.finished_at = now_rfc3339()
                    return
            self.processes[name] = proc
        state.state, state.reason, state.message = "running", "", ""
        state.started_at = now_rfc3339()
        if on_start is not None:
            on_start()
        exit_code = self._wait(proc)
        with self.lock:
            self.processes.pop(name, None)
        state.state = "terminated"
        state.exit_code = exit_code
        state.finished_at = now_rfc3339()
        state.reason = "Completed" if exit_code == 0 else "Error"
        written = termination_file.read_text(errors="replace") if termination_file.exists() else ""
        log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
        state.message = termination_message(
            written, log_text, exit_code, container.get("terminationMessagePolicy")
        )

    # --- container mode ---------------------------------------------------------------------

    def _container_volume(self, volume: Mapping[str, Any], path: Path, lookup: Lookup) -> Path:
        """Host dir (or tmpfs marker) for one volume, readable by whatever UID the pod runs as."""
        name = volume["name"]
        if "emptyDir" in volume:
            source = volume["emptyDir"] or {}
            if source.get("medium") == "Memory":
                limit = source.get("sizeLimit")
                self.tmpfs[name] = oci.parse_quantity(limit) if limit else 0
            path.chmod(0o777)  # the kubelet's emptyDir mode: any UID may write
            return path
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                host.mkdir(parents=True, exist_ok=True)
            return host
        self.read_only.add(name)  # configMap, secret and projected volumes are read-only
        files: dict[str, str] = {}
        if "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                files.update(self._projected_source(source, lookup))
        else:
            kind, key, ref_key = (
                ("ConfigMap", "configMap", "name")
                if "configMap" in volume
                else ("Secret", "secret", "secretName")
            )
            source = volume[key]
            data = lookup(kind, source.get(ref_key, ""))
            if data is None and not source.get("optional"):
                raise PodSpecError(f"volume {name}: {kind} {source.get(ref_key)!r} not found")
            items = source.get("items")
            data = data or {}
            files = {i["path"]: data.get(i["key"], "") for i in items} if items else dict(data)
        for rel, text in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            target.chmod(0o644)
        return path

    def _projected_source(self, source: Mapping[str, Any], lookup: Lookup) -> dict[str, str]:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            return {token["path"]: self.agent.token_for(self.pod, token)}
        if "downwardAPI" in source:
            return {
                i["path"]: _field_ref(self.pod, i["fieldRef"]["fieldPath"])
                for i in source["downwardAPI"].get("items") or []
            }
        for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
            if key in source:
                ref = source[key]
                data = lookup(kind, ref["name"])
                if data is None:
                    if ref.get("optional"):
                        return {}
                    raise PodSpecError(f"projected {kind} {ref['name']!r} not found")
                items = ref.get("items")
                return {i["path"]: data.get(i["key"], "") for i in items} if items else dict(data)
        raise PodSpecError(f"projected volume source {sorted(source)} is not supported")

    def _await_image(self, container: Mapping[str, Any], state: ContainerState) -> oci.ImageInfo | None:
        """The image from the node's store; waits in ErrImagePull/ImagePullBackOff while absent."""
        ref = container.get("image", "")
        while not self.stopping.is_set():
            image = self.agent.podman.image(ref)
            if image is not None:
                return image
            never = container.get("imagePullPolicy") == "Never"
            reason = (
                "ErrImageNeverPull"
                if never
                else ("ErrImagePull" if state.reason != "ErrImagePull" else "ImagePullBackOff")
            )
            if (state.state, state.reason) != ("waiting", reason):
                state.state, state.reason = "waiting", reason
                state.message = (
                    f'Container image "{ref}" is not present with pull policy of Never'
                    if never
                    else f'Failed to pull image "{ref}": not in the exec node\'s image store and no '
                    "registry is reachable (make images builds temper's images)"
                )
                self.report()
            self.stopping.wait(5.0)
        return None

    def _oci_mounts(
        self, container: Mapping[str, Any], mounts_by_volume: Mapping[str, Path], term: Path
    ) -> list[oci.Mount]:
        mounts = [oci.Mount(container.get("terminationMessagePath") or oci.TERMINATION_PATH, str(term))]
        for index, mount in enumerate(container.get("volumeMounts") or []):
            volume = mount["name"]
            if volume in self.tmpfs:
                if mount.get("subPath"):
                    raise PodSpecError(f"volumeMounts[{index}].subPath: not supported on a Memory emptyDir")
                mounts.append(oci.Mount(mount["mountPath"], tmpfs_bytes=self.tmpfs[volume]))
                continue
            source = mounts_by_volume[volume]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            read_only = bool(mount.get("readOnly")) or volume in self.read_only
            mounts.append(oci.Mount(mount["mountPath"], str(source), read_only))
        return mounts

    def _run_oci(
        self,
        container: Mapping[str, Any],
        state: ContainerState,
        env: Mapping[str, str],
        mounts_by_volume: Mapping[str, Path],
        on_start: Callable[[], None] | None,
    ) -> None:
        name = container["name"]
        podman = self.agent.podman
        image = self._await_image(container, state)
        if image is None:  # deleted while waiting for its image
            state.state, state.reason, state.exit_code = "terminated", "Error", 137
            state.finished_at = now_rfc3339()
            return
        state.image_id = image.id if image.id.startswith("sha256:") else f"sha256:{image.id}"
        term = self.scratch / "termination" / name
        term.write_text("")
        term.chmod(0o666)  # the container's UID writes it, whatever that is
        full_env = {**self.agent.service_env, **env}
        spec = dict(container)
        for key in ("command", "args"):
            spec[key] = [expand_vars(a, full_env) for a in container.get(key) or []]
        cname = f"temper-{self.uid[:13]}-{name}-{state.restart_count}"
        try:
            argv = oci.create_argv(
                name=cname,
                pod=self.pod,
                container=spec,
                image=image,
                env_names=list(full_env),
                mounts=self._oci_mounts(container, mounts_by_volume, term),
                hosts=oci.host_entries(self.pod, self.agent.peers(self.pod)),
                labels={oci.LABEL_NODE: self.agent.label},
            )
        except (oci.ContainerConfigError, PodSpecError) as err:
            # As a kubelet: the pod stays Pending and the reason says why (runAsNonRoot, ...).
            state.state, state.reason, state.message = "waiting", CONFIG_ERROR_REASON, str(err)
            self.report()
            self.stopping.wait()
            state.state, state.reason, state.exit_code = "terminated", "Error", 137
            state.finished_at = now_rfc3339()
            return
        podman.remove(cname)
        created = podman.run(*argv[1:], env=full_env)
        if created.returncode != 0:
            state.state, state.reason, state.exit_code = "terminated", "StartError", 128
            state.message = created.stderr.strip()[-MAX_TERMINATION_MESSAGE:]
            state.started_at = state.finished_at = now_rfc3339()
            return
        log_path = self.scratch / "logs" / f"{name}.log"
        with self.lock:
            if self.stopping.is_set():
                podman.remove(cname)
                state.state, state.reason, state.exit_code = "terminated", "Error", 137
                state.finished_at = now_rfc3339()
                return
            self.containers[name] = cname
            with open(log_path, "ab") as log_file:
                proc = subprocess.Popen(
                    ["podman", "start", "--attach", cname],
                    env=podman.env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        state.state, state.reason, state.message = "running", "", ""
        state.started_at = now_rfc3339()
        if on_start is not None:
            on_start()
        code = proc.wait()
        result = podman.state(cname)
        with self.lock:
            self.containers.pop(name, None)
        podman.remove(cname)
        state.state, state.finished_at = "terminated", now_rfc3339()
        state.exit_code = int(result.get("ExitCode", code))
        state.reason = "Completed" if state.exit_code == 0 else "Error"
        if result.get("OOMKilled"):
            state.reason = "OOMKilled"
        if result.get("Error") and state.exit_code in (*oci.PODMAN_ERROR_CODES, 128):
            state.reason, state.exit_code, state.message = "StartError", 128, str(result["Error"])
            return
        log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
        state.message = termination_message(
            term.read_text(errors="replace"),
            log_text,
            state.exit_code,
            container.get("terminationMessagePolicy"),
        )

    def _wait(self, proc: subprocess.Popen[bytes]) -> int:
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.stopping.is_set():
                try:
                    code = proc.wait(timeout=self.grace_seconds)
                except subprocess.TimeoutExpired:
                    _kill_group(proc, signal.SIGKILL)
                    code = proc.wait()
                break
        # Like a runtime: a process killed by signal N exits with 128 + N.
        return 128 - code if code < 0 else code


def _kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # An unreaped child keeps its pid, so after this check the group id cannot be recycled.
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


class ExecNodeAgent:
    def __init__(self, kubeconfig: str, state_dir: Path, runtime: str = "process") -> None:
        import hashlib
        import urllib.parse

        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        self.runtime = runtime
        self.podman = oci.Podman()
        # Containers of this agent carry its label, so a restart or `cluster down` finds them.
        self.label = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
        server = urllib.parse.urlsplit(configuration.host)
        # What a kubelet injects for the `kubernetes` Service; here the loopback apiserver itself.
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": server.hostname or POD_IP,
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(server.port or 443),
        }
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.state_dir = state_dir
        self.runners: dict[str, PodRunner] = {}
        # Pods this agent ran to the end: late watch events about them (our own earlier
        # status patches) must neither restart them nor mark them lost.
        self.finished: set[str] = set()
        self.lock = threading.Lock()
        self.base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "USER")}
        self.dns = PodDns(state_dir)

    # API helpers
    def lookup_for(self, namespace: str) -> Lookup:
        import base64

        from kubernetes.client.exceptions import ApiException

        def lookup(kind: str, name: str) -> Mapping[str, str] | None:
            try:
                if kind == "ConfigMap":
                    cm = self.core.read_namespaced_config_map(name, namespace)
                    return dict(cm.data or {})
                secret = self.core.read_namespaced_secret(name, namespace)
                decoded = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
                decoded.update(secret.string_data or {})
                return decoded
            except ApiException as err:
                if err.status == 404:
                    return None
                raise

        return lookup

    def claim_host_path(self, namespace: str, claim: str) -> Path:
        """The local folder behind a PVC: its bound PV's hostPath (or local) path, as a node
        would mount it, for both runtimes. Read-only mounts are not enforced here."""
        from kubernetes.client.exceptions import ApiException

        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
            if pvc.status is None or pvc.status.phase != "Bound" or not pvc.spec.volume_name:
                raise PodSpecError(f"persistentVolumeClaim {claim!r}: not bound")
            pv = self.core.read_persistent_volume(pvc.spec.volume_name)
        except ApiException as err:
            raise PodSpecError(f"persistentVolumeClaim {claim!r}: {err.reason}") from None
        source = pv.spec.host_path or pv.spec.local
        if source is None or not source.path:
            raise PodSpecError(f"persistentVolumeClaim {claim!r}: its PV has no hostPath or local path")
        return Path(source.path)

    def token_for(self, pod: Pod, source: Mapping[str, Any]) -> str:
        """A bound ServiceAccount token for the pod (TokenRequest), as the kubelet projects it."""
        from kubernetes import client

        meta = pod["metadata"]
        spec = client.V1TokenRequestSpec(
            audiences=[source["audience"]] if source.get("audience") else [],
            expiration_seconds=int(source.get("expirationSeconds") or 3607),
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=meta["name"], uid=meta["uid"]
            ),
        )
        account = pod["spec"].get("serviceAccountName") or "default"
        answer = self.core.create_namespaced_service_account_token(
            account, meta["namespace"], client.AuthenticationV1TokenRequest(spec=spec)
        )
        return str(answer.status.token)

    def peers(self, pod: Pod) -> list[str]:
        """Hostnames of the pods under this pod's subdomain (for their DNS names)."""
        subdomain = pod["spec"].get("subdomain")
        if not subdomain:
            return []
        listing = self.core.list_namespaced_pod(pod["metadata"]["namespace"])
        return [p.spec.hostname or p.metadata.name for p in listing.items if p.spec.subdomain == subdomain]

    def patch_status(self, pod: Pod, status: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self._until_delivered(
            f"status of {meta['namespace']}/{meta['name']}",
            lambda: self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}
            ),
            done_codes=(404,),
        )

    def finalize_deletion(self, pod: Pod) -> None:
        """Remove the pod object for good, as a kubelet does once its containers are gone."""
        from kubernetes import client

        meta = pod["metadata"]
        self._until_delivered(
            f"delete {meta['namespace']}/{meta['name']}",
            lambda: self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            ),
            done_codes=(404, 409),
        )

    def _until_delivered(self, what: str, call: Callable[[], Any], done_codes: tuple[int, ...]) -> None:
        """Retry through apiserver outages, as a kubelet keeps syncing: a pod's final status that
        is dropped while the apiserver restarts would leave it Running forever."""
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + DELIVERY_DEADLINE_SECONDS
        delay = 0.2
        while True:
            try:
                call()
                return
            except ApiException as err:
                if err.status in done_codes:
                    return
                if err.status is not None and err.status < 500 and err.status != 429:
                    log.warning("%s: %s", what, err.reason)
                    return
                problem = f"{err.status} {err.reason}"
            except Exception as err:  # connection refused/reset while the apiserver is down
                problem = type(err).__name__
            if time.monotonic() > deadline:
                log.error("%s: giving up after %ss (%s)", what, DELIVERY_DEADLINE_SECONDS, problem)
                return
            log.warning("%s: %s; retrying in %.1fs", what, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.runners.pop(uid, None)
            self.finished.add(uid)
        self.dns.remove(uid)

    # node
    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        cpu = str(os.cpu_count() or 1)
        memory = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki"
        disk = f"{shutil.disk_usage(self.state_dir).free // 1024}Ki"  # as a kubelet reports its disk
        capacity = {
            "cpu": cpu,
            "memory": memory,
            "ephemeral-storage": disk,
            "pods": "110",
            GPU_RESOURCE: str(EXEC_GPUS),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": NODE_NAME,
                "labels": {
                    "kubernetes.io/hostname": NODE_NAME,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "temper.dev/node-pool": "exec",
                    "nvidia.com/gpu.product": "exec-node-cpu",
                },
            },
            # Untainted, like a real cluster's CPU pool: a CPU-only stage (gpus: 0) needs no
            # toleration or nodeSelector; the kwok GPU nodes keep the taint.
            "spec": {},
        }
        try:
            self.core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        self.node_status = {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": NODE_NAME},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "temper-execnode",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "oci://runc"
                if self.runtime == "container"
                else "local-process://1",
                "osImage": "local",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
        self.heartbeat()

    def heartbeat(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        now = now_rfc3339()
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHas{'No' if kind != 'PIDPressure' else 'Sufficient'}{kind}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "temper exec node agent is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        )
        self.core.patch_node_status(NODE_NAME, {"status": {**self.node_status, "conditions": conditions}})
        renew = datetime.datetime.now(datetime.UTC)
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=NODE_NAME, namespace="kube-node-lease"),
            spec=client.V1LeaseSpec(
                holder_identity=NODE_NAME, lease_duration_seconds=LEASE_SECONDS, renew_time=renew
            ),
        )
        try:
            self.coordination.patch_namespaced_lease(NODE_NAME, "kube-node-lease", lease)
        except ApiException as err:
            if err.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", lease)

    def heartbeat_loop(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            try:
                self.heartbeat()
            except Exception:  # keep beating through transient API errors
                log.exception("heartbeat failed")

    # pods
    def handle(self, pod: Pod) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        phase = (pod.get("status") or {}).get("phase")
        with self.lock:
            runner = self.runners.get(uid)
            if meta.get("deletionTimestamp"):
                if runner is not None:
                    runner.stop(float(meta.get("deletionGracePeriodSeconds") or 0))
                else:
                    threading.Thread(target=self.finalize_deletion, args=(pod,), daemon=True).start()
                return
            if runner is not None or uid in self.finished or phase in ("Succeeded", "Failed"):
                return
            if phase == "Running":
                # Running but unknown: a previous agent died with it; its processes are gone.
                self.patch_status(
                    pod,
                    build_status(
                        "Failed",
                        [],
                        [],
                        now_rfc3339(),
                        reason="NodeAgentRestarted",
                        message="the exec node agent restarted; the pod's processes are lost",
                    ),
                )
                return
            runner = PodRunner(self, pod)
            self.runners[uid] = runner
        runner.start()

    def watch_pods(self) -> None:
        from kubernetes import watch

        selector = f"spec.nodeName={NODE_NAME}"
        while True:
            try:
                listing = self.core.list_pod_for_all_namespaces(field_selector=selector)
                for item in listing.items:
                    self.handle(self.api_client.sanitize_for_serialization(item))
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=120,
                )
                for event in stream:
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(self.api_client.sanitize_for_serialization(event["object"]))
            except Exception:  # relist after any watch failure, like an informer
                log.exception("pod watch failed; relisting")
                time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temper_dev.execnode")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--runtime", choices=RUNTIMES, default="process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent = ExecNodeAgent(args.kubeconfig, args.state_dir, args.runtime)
    if agent.runtime == "container":
        agent.podman.remove_labelled(f"{oci.LABEL_NODE}={agent.label}")  # a dead agent's leftovers
    agent.register()
    threading.Thread(target=agent.heartbeat_loop, name="heartbeat", daemon=True).start()

    def on_term(_signum: int, _frame: Any) -> None:
        # Stop our pods' process groups with the agent, so nothing outlives `cluster down`.
        with agent.lock:
            runners = list(agent.runners.values())
        for runner in runners:
            for proc in list(runner.processes.values()):
                _kill_group(proc, signal.SIGKILL)
        if agent.runtime == "container":
            agent.podman.remove_labelled(f"{oci.LABEL_NODE}={agent.label}")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    log.info("exec node %s registered; watching pods", NODE_NAME)
    agent.watch_pods()
    return 0


if __name__ == "__main__":
    sys.exit(main())
