"""Real Kueue in the hermetic cluster: the release's CRDs and webhooks, its manager on loopback.

The manager (``kueue`` from ``hack/build-tools.sh``) runs as a local process against the
hermetic apiserver, with the admin kubeconfig. The hermetic cluster has no kube-proxy and
Endpoints may not hold loopback addresses, so each webhook's ``clientConfig.service`` is
rewritten to a ``url`` on 127.0.0.1. Kueue's own cert management (cert-controller) stays on:
the harness pre-creates its Secret with a CA named ``kueue-ca`` and a serving cert valid for
both ``kueue-webhook-service.kueue-system.svc`` and 127.0.0.1, which cert-controller accepts,
writes to the cert dir and injects as caBundle into the webhooks and CRD conversion webhooks.

Only the batch/job integration is enabled, and its webhooks and the manager only act on
namespaces labelled ``temper.dev/kueue=enabled``, so the rest of the suite's Jobs never pass
through Kueue.

    python -m temper_dev.kueue up     # install into the running cluster and start the manager
    python -m temper_dev.kueue down   # stop the manager
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from temper_dev.cluster import Cluster, ClusterError, free_port, sign_certificate, tail_log

KUEUE_VERSION = "v0.17.0"
NAMESPACE = "kueue-system"
SERVICE = "kueue-webhook-service"
SECRET = "kueue-webhook-server-cert"
CA_NAME = "kueue-ca"  # cert-controller keeps a CA only if it verifies for this name
MANAGED_LABEL = "temper.dev/kueue"
MANAGED_SELECTOR = {"matchLabels": {MANAGED_LABEL: "enabled"}}
# The CRDs Kueue serves conversion webhooks for (config/components/crd/patches).
CONVERTED_CRDS = (
    "localqueues.kueue.x-k8s.io",
    "clusterqueues.kueue.x-k8s.io",
    "workloads.kueue.x-k8s.io",
    "cohorts.kueue.x-k8s.io",
    "multikueueclusters.kueue.x-k8s.io",
)
WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}  # webhooks of the integrations that run here


def default_kueue_dir() -> Path:
    env = os.environ.get("TEMPER_KUEUE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "temper" / f"kueue-{KUEUE_VERSION}"


def webhook_certificates(out: Path) -> dict[str, bytes]:
    """RSA CA (cert-controller parses its key as PKCS#1) and a serving cert for DNS and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca = sign_certificate(
        ca_name,
        ca_name,
        ca_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName(CA_NAME)]), False),
        ],
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dns = f"{SERVICE}.{NAMESPACE}.svc"
    cert = sign_certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]),
        ca_name,
        key.public_key(),
        ca_key,
        [
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "ca.key": ca_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
        "tls.crt": cert.public_bytes(pem),
        "tls.key": key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
        (out / name).chmod(0o600)
    return files


def loopback_webhooks(manifests: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """Kueue's webhook configurations with url clientConfigs on 127.0.0.1, named as its cert
    rotator expects, keeping only the webhooks of integrations that run here."""
    out = []
    for doc in manifests:
        kind = doc["kind"]
        short = "mutating" if kind.startswith("Mutating") else "validating"
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            local = {**hook, "clientConfig": {"url": f"https://127.0.0.1:{port}{path}"}}
            if "batch" in groups:
                local["namespaceSelector"] = MANAGED_SELECTOR
            hooks.append(local)
        out.append(
            {
                "apiVersion": doc["apiVersion"],
                "kind": kind,
                "metadata": {"name": f"kueue-{short}-webhook-configuration"},
                "webhooks": hooks,
            }
        )
    return out


def manager_config(ports: dict[str, int], cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"port": ports["webhook"], "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": SERVICE,
            "webhookSecretName": SECRET,
        },
        "managedJobsNamespaceSelector": MANAGED_SELECTOR,
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility API server binds all interfaces and needs an APIService: not used here.
        "featureGates": {"VisibilityOnDemand": False},
    }


class Kueue:
    """Kueue installed into ``cluster``; ``up()`` installs and starts, ``down()`` stops the manager."""

    def __init__(self, cluster: Cluster, home: Path | None = None) -> None:
        self.cluster = cluster
        self.home = home or default_kueue_dir()
        self.dir = cluster.state_dir / "kueue"
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def binary(self) -> Path:
        return self.home / "bin" / "kueue"

    @property
    def log_file(self) -> Path:
        return self.cluster.log_file("kueue")

    def check(self) -> None:
        if not os.access(self.binary, os.X_OK) or not (self.home / "config" / "done").exists():
            raise ClusterError(
                f"Kueue {KUEUE_VERSION} is not built in {self.home}; run hack/build-tools.sh "
                "(or point TEMPER_KUEUE_DIR at a directory with bin/kueue and config/)"
            )

    def up(self, timeout: float = 240.0) -> Kueue:
        self.check()
        deadline = time.monotonic() + timeout
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in ("webhook", "health", "metrics")}
        certs = webhook_certificates(self.dir / "certs")
        self._install(certs)
        config = self.dir / "config.yaml"
        config.write_text(yaml.safe_dump(manager_config(self.ports, self.dir / "certs")))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP_PROXY", "HTTPS_PROXY"))}
        env["KUBECONFIG"] = self.cluster.kubeconfig
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), f"--config={config}", "--zap-log-level=2"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,
                env=env,
            )
        (self.dir / "pid").write_text(f"{self.proc.pid}\n")
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        pid = self.proc.pid if self.proc is not None else _read_pid(self.dir / "pid")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            if self.proc is not None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(pid, signal.SIGKILL)
                    self.proc.wait(5)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "pid").unlink()

    # internals
    def _install(self, certs: dict[str, bytes]) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        config = self.home / "config"
        crds = [yaml.safe_load(p.read_text()) for p in sorted((config / "crd").glob("*.yaml"))]
        for crd in crds:
            if crd["metadata"]["name"] in CONVERTED_CRDS:
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "clientConfig": {"url": f"https://127.0.0.1:{self.ports['webhook']}/convert"},
                        "conversionReviewVersions": ["v1"],
                    },
                }
        hooks = [
            d
            for d in yaml.safe_load_all((config / "webhook" / "manifests.yaml").read_text())
            if d and d.get("kind", "").endswith("WebhookConfiguration")
        ]
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "type": "Opaque",
            "data": {k: base64.b64encode(v).decode() for k, v in certs.items()},
        }
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        docs = [namespace, secret, *crds, *loopback_webhooks(hooks, self.ports["webhook"])]
        self.cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(_list(docs))
        )
        with self.cluster.api_client() as api:
            ext = client.ApiextensionsV1Api(api)
            deadline = time.monotonic() + 60
            for crd in crds:
                name = crd["metadata"]["name"]
                while True:
                    with contextlib.suppress(ApiException):
                        conds = ext.read_custom_resource_definition(name).status.conditions or []
                        if any(c.type == "Established" and c.status == "True" for c in conds):
                            break
                    if time.monotonic() > deadline:
                        raise ClusterError(f"Kueue CRD {name} never became Established")
                    time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> None:
        """Ready once a ClusterQueue passes its webhooks (dry run): certs injected, server up."""
        probe = {
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": "temper-readiness-probe"},
            "spec": {"namespaceSelector": {}},
        }
        last = ""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise ClusterError(
                    f"Kueue manager exited {code}; see {self.log_file}:\n{tail_log(self.log_file)}"
                )
            result = self.cluster.kubectl(
                "create", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False
            )
            if result.returncode == 0:
                return
            last = result.stderr.strip()
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"Kueue webhooks never answered: {last}; see {self.log_file}:\n{tail_log(self.log_file)}"
                )
            time.sleep(0.3)


def _list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items}


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m temper_dev.kueue", description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cluster = Cluster(state_dir=args.state_dir) if args.state_dir else Cluster()
    kueue = Kueue(cluster)
    try:
        if args.command == "up":
            cluster.up()
            kueue.up()
            # Detach: the manager outlives this command, like the cluster's components.
            kueue.proc = None
            print(f"Kueue {KUEUE_VERSION} ready; log {kueue.log_file}", file=sys.stderr)
        else:
            kueue.down()
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
