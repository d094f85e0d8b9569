"""Container mode of the exec node: each pod container runs as an OCI container (podman + runc).

The pure part turns a pod's container spec into ``podman create`` arguments the way a kubelet
and CRI runtime would: the image's entrypoint unless ``command`` is set, env, ``workingDir``,
``securityContext`` (user and group, runAsNonRoot checked against the image's user,
readOnlyRootFilesystem, dropped/added capabilities, no-new-privileges), volume mounts (host
dirs, tmpfs for Memory emptyDirs with their sizeLimit), memory limits (cgroup v1 memory
controller: enforced), ``hostAliases`` and pod DNS names. All pods share the host network:
their IP is 127.0.0.1, so ``<hostname>.<subdomain>`` names resolve there.

The node's image store (``hack/build-images.sh`` fills it) is its only registry: an image it
lacks is ``ErrImagePull``/``ImagePullBackOff``, as on a cluster that cannot reach the registry.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINATION_PATH = "/dev/termination-log"
LABEL_NODE = "temper.dev/exec-node"
PODMAN_ERROR_CODES = (125, 126, 127)
_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[kmunEe][0-9]*)?$")
_SUFFIX = {
    "": 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


class ContainerConfigError(ValueError):
    """The container cannot be created as asked (kubelet: CreateContainerConfigError)."""


def cache_root() -> Path:
    """hack/build-tools.sh's and setup-host.sh's cache: ``$TEMPER_CACHE``, else ~/.cache/temper.

    The account's home, not ``$HOME``: the hermetic cluster gives its components (the exec node
    among them) a HOME of their own, where the cache is not.
    """
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    return Path(os.environ.get("TEMPER_CACHE") or home / ".cache" / "temper")


def storage_env(cache: Path | None = None) -> dict[str, str]:
    """CONTAINERS_* for the one storage and config that hack/setup-host.sh writes."""
    root = (cache or cache_root()) / "containers"
    return {
        "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
        "CONTAINERS_CONF": str(root / "containers.conf"),
    }


def parse_quantity(value: str | int) -> int:
    """Kubernetes quantity to bytes (``512Mi``, ``1G``, ``1e9``)."""
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ContainerConfigError(f"invalid quantity {text!r}")
    number, suffix = float(match.group(1)), match.group(2) or ""
    if suffix.startswith(("e", "E")) and suffix[1:].isdigit():
        return int(number * 10 ** int(suffix[1:]))
    if suffix not in _SUFFIX:
        raise ContainerConfigError(f"quantity {text!r}: unsupported suffix for bytes")
    return int(number * _SUFFIX[suffix])


@dataclass(frozen=True)
class ImageInfo:
    id: str
    user: str
    entrypoint: list[str]
    cmd: list[str]


def parse_image_inspect(raw: Mapping[str, Any]) -> ImageInfo:
    config = raw.get("Config") or {}
    return ImageInfo(
        id=str(raw.get("Id", "")),
        user=str(config.get("User") or ""),
        entrypoint=list(config.get("Entrypoint") or []),
        cmd=list(config.get("Cmd") or []),
    )


def effective_user(container: Mapping[str, Any], pod_spec: Mapping[str, Any], image: ImageInfo) -> str:
    """``--user`` for podman, after the kubelet's runAsNonRoot check against the image's user."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}

    def pick(key: str) -> Any:
        return sc.get(key) if sc.get(key) is not None else pod_sc.get(key)

    uid, gid, non_root = pick("runAsUser"), pick("runAsGroup"), pick("runAsNonRoot")
    image_uid, _, image_gid = image.user.partition(":")
    if non_root:
        if uid is not None:
            if int(uid) == 0:
                raise ContainerConfigError("container's runAsUser breaks non-root policy")
        elif image_uid in ("", "0", "root"):
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
        elif not image_uid.isdigit():
            raise ContainerConfigError(
                f"container has runAsNonRoot and image has non-numeric user ({image_uid}), "
                "cannot verify user is non-root"
            )
    if uid is None and gid is None:
        return ""
    user = str(uid) if uid is not None else (image_uid or "0")
    group = gid if gid is not None else (image_gid if uid is None else None)
    return f"{user}:{group}" if group not in (None, "") else user


def capability_args(sc: Mapping[str, Any]) -> list[str]:
    caps = sc.get("capabilities") or {}
    args = [
        f"--cap-drop={c if c == 'ALL' else 'CAP_' + c.removeprefix('CAP_')}" for c in caps.get("drop") or []
    ]
    args += [f"--cap-add=CAP_{c.removeprefix('CAP_')}" for c in caps.get("add") or []]
    return args


@dataclass(frozen=True)
class Mount:
    """A host path bind-mounted (``source``) or a tmpfs (``tmpfs_bytes``; 0: unbounded)."""

    target: str
    source: str = ""
    read_only: bool = False
    tmpfs_bytes: int | None = None

    def args(self) -> list[str]:
        if self.tmpfs_bytes is not None:
            size = f",tmpfs-size={self.tmpfs_bytes}" if self.tmpfs_bytes else ""
            return ["--mount", f"type=tmpfs,destination={self.target},tmpfs-mode=1777{size}"]
        options = "ro" if self.read_only else "rw"
        return ["--mount", f"type=bind,source={self.source},destination={self.target},{options}"]


def host_entries(pod: Mapping[str, Any], peers: Sequence[str]) -> list[str]:
    """``--add-host`` values: spec.hostAliases, then pod DNS names (``<hostname>.<subdomain>``,
    short and fully qualified) of this pod and of ``peers`` (hostnames under the same subdomain)."""
    spec = pod.get("spec") or {}
    out = [
        f"{host}:{alias['ip']}"
        for alias in spec.get("hostAliases") or []
        for host in alias.get("hostnames") or []
    ]
    subdomain = spec.get("subdomain")
    if subdomain:
        namespace = pod["metadata"]["namespace"]
        own = spec.get("hostname") or pod["metadata"]["name"]
        for host in dict.fromkeys([own, *peers]):
            for name in (f"{host}.{subdomain}", f"{host}.{subdomain}.{namespace}.svc.cluster.local"):
                out.append(f"{name}:127.0.0.1")
    return out


def create_argv(
    *,
    name: str,
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    image: ImageInfo,
    env_names: Sequence[str],
    mounts: Sequence[Mount],
    hosts: Sequence[str],
    labels: Mapping[str, str],
) -> list[str]:
    """``podman create`` argv; env values come from podman's own environment (``-e NAME``), so
    Secret values never appear on a command line."""
    spec = pod.get("spec") or {}
    sc = container.get("securityContext") or {}
    argv = ["podman", "create", "--name", name, "--pull=never", "--network=host", "--init=false"]
    argv += [f"--hostname={spec.get('hostname') or pod['metadata']['name']}"]
    argv += [f"--label={k}={v}" for k, v in labels.items()]
    user = effective_user(container, spec, image)
    if user:
        argv.append(f"--user={user}")
    groups = [spec.get("securityContext", {}).get("fsGroup")]
    groups += list((spec.get("securityContext") or {}).get("supplementalGroups") or [])
    argv += [f"--group-add={g}" for g in groups if g is not None]
    if sc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
        argv.append("--read-only-tmpfs=false")
    if sc.get("privileged"):
        raise ContainerConfigError("securityContext.privileged: not supported by the exec node")
    argv += capability_args(sc)
    if sc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if memory is not None:
        argv.append(f"--memory={parse_quantity(memory)}")
    grace = spec.get("terminationGracePeriodSeconds")
    argv.append(f"--stop-timeout={30 if grace is None else int(grace)}")
    for host in hosts:
        argv.append(f"--add-host={host}")
    for mount in mounts:
        argv += mount.args()
    for env_name in env_names:
        argv += ["-e", env_name]
    if container.get("workingDir"):
        argv.append(f"--workdir={container['workingDir']}")
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    if command:
        argv.append("--entrypoint=" + json.dumps(command))
    elif not args:
        args = list(image.cmd)
    elif not image.entrypoint:
        raise ContainerConfigError("args without command, and the image has no entrypoint")
    if not command and not image.entrypoint and not args:
        raise ContainerConfigError("no command specified: the image has neither entrypoint nor cmd")
    argv.append(image.id)
    return argv + args


# --- podman calls -------------------------------------------------------------------------------


class Podman:
    """Thin wrapper: every call gets the project's storage/config env."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = {**os.environ, **storage_env(), **(env or {})}

    def run(
        self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def image(self, ref: str) -> ImageInfo | None:
        proc = self.run("image", "inspect", ref, timeout=60)
        if proc.returncode != 0:
            return None
        return parse_image_inspect(json.loads(proc.stdout)[0])

    def state(self, name: str) -> dict[str, Any]:
        proc = self.run("container", "inspect", name, timeout=60)
        if proc.returncode != 0:
            return {}
        return dict(json.loads(proc.stdout)[0].get("State") or {})

    def remove(self, name: str) -> None:
        self.run("rm", "--force", "--time=0", name, timeout=60)

    def stop(self, name: str, grace: float) -> None:
        self.run("stop", f"--time={max(0, int(grace))}", name, timeout=grace + 60)

    def remove_labelled(self, label: str) -> None:
        proc = self.run("ps", "--all", "--quiet", f"--filter=label={label}", timeout=60)
        ids = proc.stdout.split()
        if ids:
            self.run("rm", "--force", "--time=0", *ids, timeout=120)
