"""``helm install`` of charts/temper into the hermetic cluster, and its RBAC judged by the real apiserver.

The operator image cannot run here, so this proves the release's objects exist and that the
chart's ServiceAccount is allowed exactly what the operator needs: every permission is checked
with a SubjectAccessReview, in the modes and namespaces where it must and must not hold.
The end-to-end proof (the operator impersonating this ServiceAccount through a full run) builds
on :func:`chart_release`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from temper_dev.cluster import Cluster

from tests.unit.test_chart_helm import CHART, helm_binary, run_helm
from tests.unit.test_chart_render import OPERATOR_NAMESPACED_PERMISSIONS, TENANT_PERMISSIONS

pytestmark = pytest.mark.cluster

# Things the operator never does: if any of these is allowed, the RBAC is too wide.
NEVER_ALLOWED: list[tuple[str, str, str]] = [
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
    ("", "secrets", "create"),
    ("", "secrets", "delete"),
    ("", "pods", "delete"),
    ("", "pods", "create"),
    ("", "pods/exec", "create"),
    ("", "configmaps", "delete"),
    ("", "configmaps", "patch"),
    ("", "pods", "get"),
    ("events.k8s.io", "events", "create"),
    ("temper.dev", "posttrainingruns/status", "update"),
    ("temper.dev", "adapters/status", "get"),
    ("temper.dev", "posttrainingruns", "patch"),
    ("batch", "jobs", "get"),
    ("", "events", "patch"),
    ("batch", "jobs", "update"),
    ("", "services", "delete"),
    ("batch", "cronjobs", "create"),
    ("apps", "deployments", "create"),
    ("temper.dev", "posttrainingruns", "deletecollection"),
    ("temper.dev", "adapters", "delete"),
    ("temper.dev", "adapters", "update"),
    ("rbac.authorization.k8s.io", "roles", "create"),
    ("rbac.authorization.k8s.io", "rolebindings", "create"),
    ("", "serviceaccounts", "impersonate"),
    ("", "serviceaccounts/token", "create"),
]
CLUSTER_SCOPED_NEVER: list[tuple[str, str, str]] = [
    ("", "nodes", "get"),
    ("", "namespaces", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "create"),
    ("", "namespaces", "delete"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "update"),
    ("rbac.authorization.k8s.io", "clusterroles", "create"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "create"),
]


@dataclass(frozen=True)
class Release:
    """A chart installed into the hermetic cluster."""

    name: str
    namespace: str
    kubeconfig: Path
    service_account: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def helm(self, *args: str, values: dict[str, Any] | None = None) -> str:
        base = ["--kubeconfig", str(self.kubeconfig), "--namespace", self.namespace]
        return run_helm(*args, *base, values=values).stdout

    def manifest(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.helm("get", "manifest", self.name)) if d]


@contextlib.contextmanager
def chart_release(
    kubeconfig: Path, namespace: str, values: dict[str, Any] | None = None, name: str | None = None
) -> Iterator[Release]:
    """Installs the chart (CRDs included, without waiting for the operator pod) and uninstalls it after."""
    name = name or f"temper-{uuid.uuid4().hex[:6]}"
    release = Release(name, namespace, kubeconfig, service_account=name)
    release.helm("install", name, str(CHART), "--timeout", "60s", values=values)
    try:
        yield release
    finally:
        release.helm("uninstall", name, "--wait", "--timeout", "60s")


def service_account_kubeconfig(release: Release, api: client.ApiClient, directory: Path) -> Path:
    """A kubeconfig that authenticates *as* the chart's ServiceAccount, with a TokenRequest token.

    Run the operator out of the cluster with it to prove the chart's RBAC is enough.
    """
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    token = client.CoreV1Api(api).create_namespaced_service_account_token(
        release.service_account, release.namespace, request
    )
    admin = yaml.safe_load(release.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    identity = {
        **admin,
        "users": [{"name": release.service_account, "user": {"token": token.status.token}}],
        "contexts": [
            {"name": "chart-sa", "context": {**context["context"], "user": release.service_account}}
        ],
        "current-context": "chart-sa",
    }
    path = directory / f"{release.name}-sa.kubeconfig"
    path.write_text(yaml.safe_dump(identity))
    path.chmod(0o600)
    return path


def assert_service_account_can_work(
    release: Release, api: client.ApiClient, directory: Path, namespace: str
) -> None:
    """Real requests with the ServiceAccount's own token: authentication and RBAC end to end."""
    configuration = client.Configuration()
    kubeconfig = service_account_kubeconfig(release, api, directory)
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    sa_client = client.ApiClient(configuration)
    with sa_client:
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "sa-check"},
            "spec": {
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
                }
            },
        }
        client.BatchV1Api(sa_client).create_namespaced_job(namespace, job, dry_run="All")
        core = client.CoreV1Api(sa_client)
        with pytest.raises(client.ApiException) as missing:
            core.read_namespaced_secret("no-such-secret", namespace)
        assert missing.value.status == 404  # allowed to read one by name...
        with pytest.raises(client.ApiException) as forbidden:
            core.list_namespaced_secret(namespace)
        assert forbidden.value.status == 403  # ...never to list them


def _kubeconfig(cluster: Cluster) -> Path:
    return Path(cluster.kubeconfig)


@pytest.fixture
def api(cluster: Cluster) -> Iterator[client.ApiClient]:
    api_client: client.ApiClient = cluster.api_client()
    with api_client:
        yield api_client


@pytest.fixture
def other_namespace(api: client.ApiClient) -> Iterator[str]:
    """A second namespace, for watched/unwatched contrasts."""
    core = client.CoreV1Api(api)
    name = f"temper-other-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def allowed(
    api: client.ApiClient, release: Release, group: str, resource: str, verb: str, namespace: str | None
) -> bool:
    resource, _, subresource = resource.partition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=release.user,
            groups=[
                "system:serviceaccounts",
                f"system:serviceaccounts:{release.namespace}",
                "system:authenticated",
            ],
            resource_attributes=client.V1ResourceAttributes(
                group=group,
                resource=resource,
                subresource=subresource or None,
                verb=verb,
                namespace=namespace,
            ),
        )
    )
    status = client.AuthorizationV1Api(api).create_subject_access_review(review).status
    return bool(status.allowed)


def wait_allowed(
    api: client.ApiClient, release: Release, check: tuple[str, str, str], namespace: str
) -> None:
    # The RBAC authorizer learns of new bindings through an informer: allow it a moment.
    deadline = time.monotonic() + 10
    while not allowed(api, release, *check, namespace):
        assert time.monotonic() < deadline, f"{release.user} never got {check} in {namespace}"
        time.sleep(0.2)


def expect(
    api: client.ApiClient,
    release: Release,
    checks: list[tuple[str, str, str]],
    namespace: str | None,
    *,
    allow: bool,
) -> None:
    wrong = [c for c in checks if allowed(api, release, *c, namespace) != allow]
    where = namespace or "cluster scope"
    assert not wrong, f"{release.user} {'lacks' if allow else 'has'} in {where}: {wrong}"


def operator_permissions() -> list[tuple[str, str, str]]:
    return [(g, r, v) for (g, r), verbs in OPERATOR_NAMESPACED_PERMISSIONS.items() for v in sorted(verbs)]


# What a cluster-wide operator may never do outside the namespaces it serves (kube-system's
# Secrets, aws-auth-style ConfigMaps): the tenant role's grants.
TENANT_ONLY: list[tuple[str, str, str]] = [
    ("", "secrets", "get"),
    ("", "configmaps", "create"),
    ("", "configmaps", "update"),
]
assert {(r, v) for _, r, v in TENANT_ONLY} <= {
    (r, v) for (_, r), vs in TENANT_PERMISSIONS.items() for v in vs
}


def cluster_wide_permissions() -> list[tuple[str, str, str]]:
    return [p for p in operator_permissions() if p not in TENANT_ONLY]


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    kubectl_bin = helm_binary().parent / "kubectl"
    proc = subprocess.run(
        [str(kubectl_bin), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_passes_restricted_pod_security(api: client.ApiClient, namespace: str, deployment: Any) -> None:
    """The operator's pod is admitted by Pod Security ``restricted``; a weakened copy is not."""
    core = client.CoreV1Api(api)
    template = api.sanitize_for_serialization(deployment.spec.template)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "psa-check"}, "spec": template["spec"]}
    core.create_namespaced_pod(namespace, pod, dry_run="All")
    # Control: proves the namespace really enforces the profile.
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    with pytest.raises(client.ApiException) as rejected:
        core.create_namespaced_pod(namespace, pod, dry_run="All")
    assert rejected.value.status == 403
    assert "violates PodSecurity" in str(rejected.value.body)


def test_install_creates_every_object_and_least_privilege_rbac(
    cluster: Cluster, namespace: str, other_namespace: str, api: client.ApiClient, tmp_path: Path
) -> None:
    kubeconfig = _kubeconfig(cluster)
    core = client.CoreV1Api(api)
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    with chart_release(kubeconfig, namespace, values={"rbac": {"servedNamespaces": [namespace]}}) as release:
        status = json.loads(release.helm("status", release.name, "-o", "json"))
        assert status["info"]["status"] == "deployed"
        assert "cluster-wide" in status["info"]["notes"]
        assert f"Served namespaces (Secrets and alias ConfigMaps): {namespace}." in status["info"]["notes"]

        # Every object of the release exists in the cluster.
        manifest = release.manifest()
        live = json.loads(
            kubectl(kubeconfig, "get", "-f", "-", "-o", "json", stdin=yaml.safe_dump_all(manifest))
        )
        assert sorted((o["kind"], o["metadata"]["name"]) for o in live["items"]) == sorted(
            (o["kind"], o["metadata"]["name"]) for o in manifest
        )
        kinds = {o["kind"] for o in manifest}
        assert {
            "Deployment",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        } <= kinds
        deployment = client.AppsV1Api(api).read_namespaced_deployment(release.name, namespace)
        assert deployment.spec.template.spec.service_account_name == release.service_account
        assert_passes_restricted_pod_security(api, namespace, deployment)

        # The CRDs come from charts/temper/crds and are served.
        extensions = client.ApiextensionsV1Api(api)
        for crd in ("posttrainingruns.temper.dev", "adapters.temper.dev"):
            conditions = {
                c.type: c.status for c in extensions.read_custom_resource_definition(crd).status.conditions
            }
            assert conditions.get("Established") == "True", crd

        # Cluster-wide mode: what the operator needs, in any namespace; Secrets and ConfigMap
        # writes only where it serves; nothing more.
        wait_allowed(api, release, ("batch", "jobs", "create"), other_namespace)
        expect(api, release, operator_permissions(), namespace, allow=True)
        for ns in (other_namespace, "kube-system", "default"):
            expect(api, release, cluster_wide_permissions(), ns, allow=True)
            expect(api, release, TENANT_ONLY, ns, allow=False)
        for ns in (other_namespace, namespace, "kube-system"):
            expect(api, release, NEVER_ALLOWED, ns, allow=False)
        # A namespace labelled temper.dev/served=true is served from the next install or upgrade.
        core.patch_namespace(other_namespace, {"metadata": {"labels": {"temper.dev/served": "true"}}})
        release.helm("upgrade", release.name, str(CHART), values={"rbac": {"servedNamespaces": [namespace]}})
        wait_allowed(api, release, ("", "secrets", "get"), other_namespace)
        expect(api, release, operator_permissions(), other_namespace, allow=True)
        expect(api, release, TENANT_ONLY, "kube-system", allow=False)
        crd_reads = [("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list")]
        expect(api, release, crd_reads, None, allow=True)
        expect(api, release, CLUSTER_SCOPED_NEVER, None, allow=False)
        leases = [("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")]
        expect(api, release, leases, namespace, allow=True)
        expect(api, release, leases, other_namespace, allow=False)

        assert_service_account_can_work(release, api, tmp_path, other_namespace)

        # Namespaced mode, by upgrade: the same rules, only in the watched namespace.
        release.helm("upgrade", release.name, str(CHART), values={"watchNamespaces": [other_namespace]})
        deadline = time.monotonic() + 10
        while allowed(api, release, "batch", "jobs", "create", namespace):
            assert time.monotonic() < deadline, "cluster-wide grant survived the switch to namespaced mode"
            time.sleep(0.2)
        expect(api, release, operator_permissions(), other_namespace, allow=True)
        expect(api, release, NEVER_ALLOWED, other_namespace, allow=False)
        expect(api, release, operator_permissions(), namespace, allow=False)
        expect(api, release, CLUSTER_SCOPED_NEVER, None, allow=False)
        expect(api, release, crd_reads, None, allow=True)
        expect(api, release, leases, namespace, allow=True)
        cluster_objects = [
            (o["kind"], o["metadata"]["name"]) for o in release.manifest() if o["kind"].startswith("Cluster")
        ]

    # Uninstall removes the cluster-scoped RBAC but keeps the CRDs (and so every run and adapter).
    rbac = client.RbacAuthorizationV1Api(api)
    for kind, name in cluster_objects:
        read = rbac.read_cluster_role if kind == "ClusterRole" else rbac.read_cluster_role_binding
        with pytest.raises(client.ApiException) as gone:
            read(name)
        assert gone.value.status == 404, (kind, name)
    extensions.read_custom_resource_definition("posttrainingruns.temper.dev")


def _stand_in_crd(kind: str, plural: str) -> dict[str, Any]:
    # Just enough of the Prometheus Operator's CRDs for discovery to serve the API, so helm's
    # .Capabilities come from a real cluster rather than --api-versions.
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


@pytest.fixture
def monitoring_api(api: client.ApiClient) -> Iterator[None]:
    extensions = client.ApiextensionsV1Api(api)
    crds = [
        _stand_in_crd("ServiceMonitor", "servicemonitors"),
        _stand_in_crd("PodMonitor", "podmonitors"),
        _stand_in_crd("PrometheusRule", "prometheusrules"),
    ]
    for crd in crds:
        extensions.create_custom_resource_definition(crd)
    try:
        for crd in crds:
            deadline = time.monotonic() + 20
            while True:
                status = extensions.read_custom_resource_definition(crd["metadata"]["name"]).status
                if any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
                    break
                assert time.monotonic() < deadline, f"{crd['metadata']['name']} never became Established"
                time.sleep(0.2)
        yield
    finally:
        for crd in crds:
            extensions.delete_custom_resource_definition(crd["metadata"]["name"])


MONITORING_VALUES = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    }
}
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_monitoring_objects_follow_the_cluster_apis(
    cluster: Cluster, namespace: str, api: client.ApiClient, request: pytest.FixtureRequest
) -> None:
    kubeconfig = _kubeconfig(cluster)
    with chart_release(kubeconfig, namespace, values=MONITORING_VALUES) as release:
        # No Prometheus Operator: nothing rendered, and the release notes say why.
        assert not MONITORING_KINDS & {o["kind"] for o in release.manifest()}
        assert (
            "were NOT created"
            in json.loads(release.helm("status", release.name, "-o", "json"))["info"]["notes"]
        )

        request.getfixturevalue("monitoring_api")
        release.helm("upgrade", release.name, str(CHART), values=MONITORING_VALUES)
        rendered = {o["kind"]: o for o in release.manifest() if o["kind"] in MONITORING_KINDS}
        assert set(rendered) == MONITORING_KINDS
        custom = client.CustomObjectsApi(api)
        for kind, obj in rendered.items():
            live = custom.get_namespaced_custom_object(
                "monitoring.coreos.com", "v1", namespace, f"{kind.lower()}s", obj["metadata"]["name"]
            )
            assert live["spec"] == obj["spec"], kind
        service_monitor = rendered["ServiceMonitor"]
        assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
