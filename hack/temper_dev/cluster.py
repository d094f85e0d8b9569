"""The hermetic Kubernetes control plane: real upstream binaries on loopback, no containers.

Components (all bound to 127.0.0.1 on free ports, logs in ``<state_dir>/logs``): etcd,
kube-apiserver, kube-controller-manager, kube-scheduler, the kwok controller (fake GPU nodes
``kwok-gpu-0..3``) and the exec node agent (``exec-node``, runs pods as local processes).

    python -m temper_dev.cluster up       # start (or reuse) the cluster, print the kubeconfig path
    python -m temper_dev.cluster status   # show component pids and health
    python -m temper_dev.cluster env      # print 'export KUBECONFIG=...'
    python -m temper_dev.cluster down     # stop everything

The state dir is ``$TEMPER_CLUSTER_DIR`` or ``~/.cache/temper/cluster``; tests use their own,
so several clusters coexist. Binaries come from ``$TEMPER_BIN`` or
``~/.cache/temper/k8s-v1.36.3/bin`` (built by ``hack/build-tools.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

K8S_VERSION = "v1.36.3"
REPO_ROOT = Path(__file__).resolve().parents[2]
KWOK_STAGES = REPO_ROOT / "hack" / "kwok" / "stages.yaml"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
KWOK_NODE_COUNT = 4
KWOK_GPUS_PER_NODE = 8
EXEC_NODE_NAME = "exec-node"
SERVICE_CIDR = "10.96.0.0/16"
# Order matters: started in this order, stopped in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "execnode")


class ClusterError(RuntimeError):
    pass


def default_bin_dir() -> Path:
    env = os.environ.get("TEMPER_BIN")
    return Path(env) if env else Path.home() / ".cache" / "temper" / f"k8s-{K8S_VERSION}" / "bin"


def default_state_dir() -> Path:
    env = os.environ.get("TEMPER_CLUSTER_DIR")
    return Path(env) if env else Path.home() / ".cache" / "temper" / "cluster"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- certificates ---------------------------------------------------------------------------


def _write_pem(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def sign_certificate(
    subject: Any, issuer: Any, public_key: Any, signing_key: Any, extensions: list[tuple[Any, bool]]
) -> Any:
    """An x509 certificate valid from an hour ago for ten years, with ``(extension, critical)``
    pairs, signed SHA-256 (the cluster PKI here, Kueue's webhook certs in kueue.py)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def ensure_certificates(pki: Path) -> None:
    """CA, apiserver serving cert, admin client cert and SA signing key; generated once.

    ECDSA P-256 keys: generation takes milliseconds, and every component accepts them.
    """
    if (pki / "done").exists():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pki.mkdir(parents=True, exist_ok=True)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "temper-hermetic-ca")])
    ca_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca_cert = sign_certificate(
        ca_name,
        ca_name,
        ca_key.public_key(),
        ca_key,
        [(x509.BasicConstraints(ca=True, path_length=None), True), (ca_usage, True)],
    )

    def leaf(
        name: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions: list[tuple[Any, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
        ]
        if sans:
            extensions.append((x509.SubjectAlternativeName(sans), False))
        cert = sign_certificate(name, ca_name, key.public_key(), ca_key, extensions)
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    dns = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
    ]
    serving_cert, serving_key = leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        ExtendedKeyUsageOID.SERVER_AUTH,
        sans,
    )
    admin_cert, admin_key = leaf(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "temper-admin"),
            ]
        ),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        None,
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_pem(pki / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_pem(pki / "ca.key", key_pem(ca_key))
    _write_pem(pki / "apiserver.crt", serving_cert)
    _write_pem(pki / "apiserver.key", serving_key)
    _write_pem(pki / "admin.crt", admin_cert)
    _write_pem(pki / "admin.key", admin_key)
    _write_pem(pki / "sa.key", key_pem(sa_key))
    _write_pem(
        pki / "sa.pub",
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    (pki / "done").write_text("ok\n")


# --- node manifests -------------------------------------------------------------------------


def kwok_node_manifest(index: int) -> dict[str, Any]:
    name = f"kwok-gpu-{index}"
    capacity = {
        "cpu": "96",
        "memory": "1024Gi",
        "ephemeral-storage": "10Ti",  # trainer pods request it (the chart's trainer.resources)
        "pods": "110",
        GPU_RESOURCE: str(KWOK_GPUS_PER_NODE),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(KWOK_GPUS_PER_NODE),
                "temper.dev/node-pool": "kwok",
            },
        },
        "spec": {"taints": [dict(GPU_TAINT)]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """A control plane rooted at ``state_dir``; ``up()`` starts or reuses it."""

    state_dir: Path = field(default_factory=default_state_dir)
    bin_dir: Path = field(default_factory=default_bin_dir)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    # How the exec node runs pods: "process" (host processes, fast) or "container" (podman/runc).
    runtime: str = "process"
    _saved_runtime: str = field(default="", repr=False)
    # Children started by this process, kept so their exit status can be reported.
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.bin_dir = Path(self.bin_dir)

    # paths
    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def kubeconfig(self) -> str:
        return str(self.state_dir / "kubeconfig")

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def log_file(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    # lifecycle
    def up(self, timeout: float = 60.0) -> Cluster:
        self.check_binaries()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (
            self._load_state()
            and self._all_alive()
            and self._readyz()
            and self._saved_runtime == self.runtime
        ):
            return self
        self.down()
        started = time.monotonic()
        deadline = started + timeout
        ensure_certificates(self.pki)
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
        shutil.rmtree(self.state_dir / "pods", ignore_errors=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {
            name: free_port()
            for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        }
        self.pids = {}
        self._write_kubeconfig()
        try:
            self._start("etcd", self._argv("etcd"))
            self._start("kube-apiserver", self._argv("kube-apiserver"))
            self._save_state()
            self._wait(deadline, "kube-apiserver /readyz", self._readyz)
            for name in ("kube-controller-manager", "kube-scheduler", "kwok", "execnode"):
                self._start(name, self._argv(name))
            self._save_state()
            self._create_kwok_nodes()
            self._wait(deadline, "all nodes Ready", self._nodes_ready)
            self._wait(deadline, "kube-scheduler /healthz", lambda: self._healthz("scheduler"))
            # The default ServiceAccount appears once the controller-manager runs its
            # controllers; pods cannot be admitted before that.
            self._wait(deadline, "controller-manager (default ServiceAccount)", self._default_sa)
        except BaseException:
            self.down()
            raise
        (self.state_dir / "start.time").write_text(f"{time.monotonic() - started:.2f}\n")
        return self

    def down(self) -> None:
        """Stop components in reverse start order; the apiserver's shutdown needs etcd."""
        self._load_state()
        for name in reversed(COMPONENTS):
            self._stop(name)
        self.pids = {}
        if self.state_file.exists():
            self.state_file.unlink()

    def restart(self, component: str, timeout: float = 60.0) -> None:
        """Stop ``component`` (SIGTERM, then SIGKILL after 5 s) and start it again with the same
        arguments and ports, then wait until it serves again. For fault injection: the other
        components keep running and see the outage as a real cluster would."""
        if component not in COMPONENTS:
            raise ClusterError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
        self._load_state()
        if not self.ports:
            raise ClusterError(f"cluster in {self.state_dir} is not up")
        self._stop(component)
        self._start(component, self._argv(component))
        self._save_state()
        deadline = time.monotonic() + timeout
        ready: dict[str, Any] = {
            # The apiserver reconnects to a restarted etcd on its own; readyz covers both.
            "etcd": self._readyz,
            "kube-apiserver": self._readyz,
            "kube-controller-manager": lambda: self._healthz("controller-manager"),
            "kube-scheduler": lambda: self._healthz("scheduler"),
            # Both node agents renew leases and statuses; Ready nodes mean they work again.
            "kwok": self._nodes_ready,
            "execnode": self._nodes_ready,
        }
        self._wait(deadline, f"{component} after restart", ready[component])

    def _stop(self, name: str) -> None:
        pid = self.pids.get(name)
        if pid and self._is_ours(name, pid):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while self._is_ours(name, pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._is_ours(name, pid):
                _signal_group(pid, signal.SIGKILL)
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.pids.pop(name, None)

    def status(self) -> dict[str, Any]:
        self._load_state()
        components = {
            name: {
                "pid": self.pids.get(name),
                "alive": bool(self.pids.get(name)) and self._is_ours(name, self.pids[name]),
                "log": str(self.log_file(name)),
            }
            for name in COMPONENTS
        }
        ready = bool(self.ports) and self._readyz()
        return {
            "state_dir": str(self.state_dir),
            "kubeconfig": self.kubeconfig,
            "ready": ready,
            "components": components,
        }

    # helpers for tests and tools
    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        result = subprocess.run(
            [self.bin("kubectl"), *args],
            env=env,
            input=input,
            check=False,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def api_client(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration)
        return client.ApiClient(configuration)

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """Log of a pod run by the exec node (newest incarnation of that pod name)."""
        from temper_dev.execnode import pod_dirs

        dirs = pod_dirs(self.state_dir, namespace, name)
        if not dirs:
            raise ClusterError(f"no exec-node pod {namespace}/{name} under {self.state_dir}")
        logs = sorted((dirs[-1] / "logs").glob("*.log"))
        if container is not None:
            path = dirs[-1] / "logs" / f"{container}.log"
            return path.read_text(errors="replace") if path.exists() else ""
        if len(logs) > 1:
            names = [p.stem for p in logs]
            raise ClusterError(f"pod {namespace}/{name} has several containers {names}; name one")
        return logs[0].read_text(errors="replace") if logs else ""

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}

    # internals
    def check_binaries(self) -> None:
        missing = [b for b in BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ClusterError(
                f"missing Kubernetes binaries in {self.bin_dir}: {', '.join(missing)}; "
                "run hack/build-tools.sh (or point TEMPER_BIN at a directory holding them)"
            )

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_file(name), "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state_dir,
                start_new_session=True,
                env=self._component_env(),
            )
        finally:
            log.close()
        self.pids[name] = proc.pid
        self._procs[name] = proc

    def _argv(self, name: str) -> list[str]:
        if name == "execnode":
            return [
                sys.executable,
                "-m",
                "temper_dev.execnode",
                "--kubeconfig",
                self.kubeconfig,
                "--state-dir",
                str(self.state_dir),
                "--runtime",
                self.runtime,
            ]
        builders = {
            "etcd": self._etcd_args,
            "kube-apiserver": self._apiserver_args,
            "kube-controller-manager": self._controller_manager_args,
            "kube-scheduler": self._scheduler_args,
            "kwok": self._kwok_args,
        }
        return builders[name]()

    def _component_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy"))
        }
        env["NO_PROXY"] = "127.0.0.1,localhost"
        env["HOME"] = str(self.state_dir)  # keeps kwok/kubectl caches out of the user's home
        return env

    def _etcd_args(self) -> list[str]:
        client_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            self.bin("etcd"),
            "--name=hermetic",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=hermetic={peer_url}",
            "--unsafe-no-fsync",  # throwaway test data; fsync dominates latency on shared disks
            "--log-level=warn",
            "--quota-backend-bytes=2147483648",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        return [
            self.bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC",
            # As on GKE/AKS GPU pools: pods requesting nvidia.com/gpu tolerate the GPU taint.
            "--enable-admission-plugins=ExtendedResourceToleration",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cert-dir={self.state_dir / 'apiserver-certs'}",
            "--profiling=false",
            "--v=1",
        ]

    def _delegated(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_args(self) -> list[str]:
        pki = self.pki
        return [
            self.bin("kube-controller-manager"),
            *self._delegated(),
            f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            self.bin("kube-scheduler"),
            *self._delegated(),
            f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.state_dir / 'scheduler-certs'}",
        ]

    def _kwok_args(self) -> list[str]:
        return [
            self.bin("kwok"),
            f"--kubeconfig={self.kubeconfig}",
            f"--config={KWOK_STAGES}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.244.255.1",
        ]

    def _write_kubeconfig(self) -> None:
        pki = self.pki
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "hermetic",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(pki / "admin.crt"),
                        "client-key": str(pki / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "hermetic", "context": {"cluster": "hermetic", "user": "admin"}}],
            "current-context": "hermetic",
        }
        # JSON is valid YAML; every kubeconfig reader accepts it.
        path = Path(self.kubeconfig)
        path.write_text(json.dumps(kubeconfig, indent=2) + "\n")
        path.chmod(0o600)

    def _save_state(self) -> None:
        self.state_file.write_text(
            json.dumps(
                {
                    "ports": self.ports,
                    "pids": self.pids,
                    "bin_dir": str(self.bin_dir),
                    "runtime": self.runtime,
                }
            )
        )

    def _load_state(self) -> bool:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        self.ports = {k: int(v) for k, v in data.get("ports", {}).items()}
        self.pids = {k: int(v) for k, v in data.get("pids", {}).items()}
        self._saved_runtime = str(data.get("runtime", "process"))
        return True

    def _is_ours(self, name: str, pid: int) -> bool:
        """True if ``pid`` is alive and still runs this component (pids get reused)."""
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            # Our own child: waitpid is authoritative. /proc/<pid>/cmdline is not, right
            # after exec it can still be empty (the parent wakes before the new argv is set).
            return proc.poll() is None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        marker = "temper_dev.execnode" if name == "execnode" else str(self.bin_dir / name)
        return marker in cmdline and str(self.state_dir) in cmdline

    def _all_alive(self) -> bool:
        return all(self.pids.get(n) and self._is_ours(n, self.pids[n]) for n in COMPONENTS)

    def _check_alive(self) -> None:
        for name, pid in self.pids.items():
            if not self._is_ours(name, pid):
                proc = self._procs.get(name)
                code = proc.poll() if proc is not None else None
                how = f" with status {code}" if code is not None else ""
                tail = tail_log(self.log_file(name), 20)
                raise ClusterError(
                    f"{name} (pid {pid}) exited during startup{how}; see {self.log_file(name)}:\n{tail}"
                )

    def _wait(self, deadline: float, what: str, ready: Any) -> None:
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                logs = ", ".join(str(self.log_file(n)) for n in self.pids)
                raise ClusterError(f"timed out waiting for {what}; logs: {logs}")
            time.sleep(0.05)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl_context(), timeout=2) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), b""
        except (OSError, ValueError):
            return 0, b""

    def _readyz(self) -> bool:
        if "apiserver" not in self.ports or not (self.pki / "ca.crt").exists():
            return False
        return self._get("/readyz")[0] == 200

    def _healthz(self, component: str) -> bool:
        ctx = ssl.create_default_context()
        # The component's self-signed serving cert is generated at start; only liveness matters.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{self.ports[component]}/healthz"
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                return int(resp.status) == 200
        except (OSError, ValueError):
            return False

    def _nodes_ready(self) -> bool:
        code, body = self._get("/api/v1/nodes")
        if code != 200:
            return False
        items = json.loads(body).get("items", [])
        expected = {f"kwok-gpu-{i}" for i in range(KWOK_NODE_COUNT)} | {EXEC_NODE_NAME}
        ready = {
            n["metadata"]["name"]
            for n in items
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
        }
        return expected <= ready

    def _default_sa(self) -> bool:
        return self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

    def _create_kwok_nodes(self) -> None:
        for index in range(KWOK_NODE_COUNT):
            body = json.dumps(kwok_node_manifest(index)).encode()
            request = urllib.request.Request(
                self.server + "/api/v1/nodes",
                data=body,
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, context=self._ssl_context(), timeout=10):
                    pass
            except urllib.error.HTTPError as err:
                if err.code != 409:
                    raise ClusterError(
                        f"creating node kwok-gpu-{index} failed: {err.code} {err.read()!r}"
                    ) from err


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def tail_log(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a component's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temper_dev.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    cluster = Cluster(state_dir=args.state_dir) if args.state_dir else Cluster()
    try:
        if args.command == "up":
            started = time.monotonic()
            cluster.up(timeout=args.timeout)
            print(cluster.kubeconfig)
            print(f"ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        elif args.command == "down":
            cluster.down()
        elif args.command == "status":
            info = cluster.status()
            print(json.dumps(info, indent=2))
            return 0 if info["ready"] else 1
        else:
            print(f"export KUBECONFIG={cluster.kubeconfig}")
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
