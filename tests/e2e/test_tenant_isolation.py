"""The attack campaign of docs/security.md: one tenant tries to read, overwrite or delete another's
artifacts, reach hosts it may not, or run what the platform forbids, through the real apiserver
(its own ServiceAccount token, holding only the aggregated ``edit`` role), the chart's
ValidatingAdmissionPolicies and the real operator (the chart's Deployment environment, its own
ServiceAccount token, namespaced mode: the recommended install).

Every attack must be refused at admission or end in a condition naming the policy, with nothing
read, written or deleted in the victim's storage (every object and its ETag, before and after),
the victim's run untouched and the operator healthy. Then "Ready stays true": files that vanish
or change under a Ready Adapter turn it Ready=False with ArtifactMissing/ChecksumMismatch.

The operator runs as a process, not from its image: every decision under attack (admission, the
operator's re-check, its S3 calls, its RBAC through its own token) is the same code and the same
identity as in the pod, and the campaign needs no trainer (stages run on kwok), so it costs no
image start; tests/e2e/test_quickstart.py covers the image itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from temper.api.contract import StorageConfig
from temper.storage import Storage
from temper_dev.cluster import Cluster
from temper_dev.s3server import FAKE_CREDENTIALS, S3Server

from tests.cluster.test_chart_install import chart_release, service_account_kubeconfig
from tests.cluster.test_chart_operator_rbac import chart_operator_env
from tests.cluster.test_operator_pipeline import GROUP, KWOK, PLURAL, VERSION, wait_for
from tests.fixtures.cluster import _create_namespace, _delete_namespace
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.e2e

SECRET = "my-s3"
REVERIFY_SECONDS = "2"


@pytest.fixture
def tenants(cluster: Cluster) -> Iterator[tuple[str, str]]:
    names = [_create_namespace(cluster, {"pod-security.kubernetes.io/enforce": "restricted"}) for _ in "ab"]
    try:
        yield names[0], names[1]
    finally:
        for name in names:
            _delete_namespace(cluster, name)


def tenant_client(admin: client.ApiClient, namespace: str) -> client.ApiClient:
    """A client authenticated as ``namespace``'s own ServiceAccount, bound to ``edit`` only."""
    core = client.CoreV1Api(admin)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "team"}})
    client.RbacAuthorizationV1Api(admin).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "team-edit"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "ServiceAccount", "name": "team", "namespace": namespace}],
        },
    )
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    token = core.create_namespaced_service_account_token("team", namespace, request).status.token
    configuration = copy.deepcopy(admin.configuration)
    configuration.cert_file = configuration.key_file = None
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


class Tenant:
    def __init__(self, admin: client.ApiClient, namespace: str, bucket: str) -> None:
        self.ns = namespace
        self.bucket = bucket
        self.api = tenant_client(admin, namespace)
        self.custom = client.CustomObjectsApi(self.api)
        self.prefix = f"s3://{bucket}/{namespace}/"

    def wait_edit(self) -> None:
        """The aggregated edit role learns temper's rules from the controller-manager."""

        def can_create() -> bool:
            review = client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        group=GROUP, resource="adapters", verb="create", namespace=self.ns
                    )
                )
            )
            return bool(
                client.AuthorizationV1Api(self.api).create_self_subject_access_review(review).status.allowed
            )

        wait_for(f"{self.ns}'s edit role to cover temper", can_create, 20)
        secret = {"metadata": {"name": SECRET}, "stringData": FAKE_CREDENTIALS}
        client.CoreV1Api(self.api).create_namespaced_secret(self.ns, secret)

    def create(self, plural: str, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace or self.ns, plural, body
        )
        return out

    def get(self, plural: str, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)
        return out

    def patch(self, plural: str, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name, body)

    def run(self, name: str, **spec: Any) -> dict[str, Any]:
        """A valid one-stage run in this tenant's own prefix, changed by ``spec``."""
        body: dict[str, Any] = {
            "baseModel": {"uri": "builtin://tiny"},
            "storage": {"uri": f"{self.prefix}runs/{name}/", "secretRef": {"name": SECRET}},
            "datasets": [{"name": "tickets", "uri": "builtin://arith?n=16"}],
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "data": {"train": ["tickets"]},
                    "resources": {"gpus": 1, **KWOK},
                }
            ],
        }
        body.update(spec)
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "PostTrainingRun",
            "metadata": {"name": name},
            "spec": body,
        }

    def adapter(self, name: str, uri: str, retention: str = "keep", **artifact: Any) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Adapter",
            # The run label: until hand-registered Adapters read lineage.run as an object (issue 16).
            "metadata": {"name": name, "labels": {"temper.dev/run": name, "temper.dev/stage": "sft"}},
            "spec": {
                "baseModel": {"uri": "builtin://tiny"},
                "method": "lora",
                "artifact": {"uri": uri, "secretRef": {"name": SECRET}, **artifact},
                "retention": {"onRetire": retention},
            },
        }

    def condition(self, name: str, ctype: str, plural: str = "adapters") -> dict[str, Any]:
        conditions = (self.get(plural, name).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == ctype), {})


def publish(storage: Storage, prefix: str, tmp_path: Path, namespace: str | None, tag: str) -> str:
    """What temper's trainer publishes for a run of ``namespace`` (lineage.run), or a hand-made
    artifact (``namespace`` None)."""
    local = tmp_path / tag
    local.mkdir()
    (local / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (local / "adapter_model.safetensors").write_bytes(tag.encode() * 512)
    lineage = {"run": {"namespace": namespace, "name": tag, "uid": "u"}, "stage": "sft"} if namespace else {}
    fields = {
        "baseModel": "builtin://tiny",
        "method": "lora",
        "stageType": "sft",
        "trainerVersion": "fake",
        "lineage": lineage,
    }
    return storage.publish_atomic(local, prefix, 1, fields).manifest_uri


def objects(storage: Storage, bucket: str) -> dict[str, str]:
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents") or []}


def refused(attempt: Callable[[], Any], field: str) -> str:
    """The apiserver refuses ``attempt``; its message names ``field``."""
    with pytest.raises(client.ApiException) as caught:
        attempt()
    assert caught.value.status in (403, 422), caught.value
    body = str(caught.value.body)
    assert field in body, f"{field} not named in: {body}"
    return body


def test_one_tenant_can_never_reach_another(
    cluster: Cluster,
    temper_crds: None,
    namespace: str,
    tenants: tuple[str, str],
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    a_ns, b_ns = tenants
    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )
    bucket = s3_bucket
    values = {
        "replicaCount": 0,  # the out-of-cluster operator below is the replica
        "watchNamespaces": [a_ns, b_ns],
        "storage": {"endpoint": s3_server.endpoint_url},
        "policy": {
            "allowedStorage": [f"s3://{bucket}/{{namespace}}/", f"s3://{bucket}/shared/"],
            "maxGpusPerStage": 8,
        },
        "operator": {"extraEnv": [{"name": "TEMPER_ADAPTER_REVERIFY_SECONDS", "value": REVERIFY_SECONDS}]},
    }
    admin = cluster.api_client()
    kubeconfig = Path(cluster.kubeconfig)
    with admin, chart_release(kubeconfig, namespace, values=values) as release:
        sa_kubeconfig = service_account_kubeconfig(release, admin, tmp_path)
        env = chart_operator_env(release, sa_kubeconfig)
        operator = OperatorProcess(cluster, namespace, "tenancy", tmp_path, env).start()
        try:
            a, b = Tenant(admin, a_ns, bucket), Tenant(admin, b_ns, bucket)
            a.wait_edit()
            b.wait_edit()
            operator.wait_role("leader")
            attacks = campaign(Scene(cluster, operator, a, b, storage, tmp_path))
            assert operator.proc is not None
            assert operator.proc.poll() is None, "the operator died"
            assert operator._get(operator.health_port, "/healthz")[0] == 200
        finally:
            operator.stop()
    print(
        json.dumps({"attacks": attacks, "refused": attacks, "seconds": round(time.monotonic() - started, 1)})
    )


@dataclass
class Scene:
    """The campaign's cast: the victim ``a``, the attacker ``b``, the store and the operator."""

    cluster: Cluster
    operator: OperatorProcess
    a: Tenant
    b: Tenant
    storage: Storage
    tmp_path: Path

    @property
    def bucket(self) -> str:
        return self.a.bucket


VICTIM_ADAPTER = "victim-sft-g1"


def campaign(scene: Scene) -> int:
    """Every attack; the number tried (each one refused, or the test fails)."""
    a, b, storage = scene.a, scene.b, scene.storage
    shared_uri = victim(scene)
    victim_run = a.get(PLURAL, "victim")
    before = objects(storage, scene.bucket)
    victim_keys = {k for k in before if not k.startswith(f"{b.ns}/")}
    attacks = admission_attacks(scene) + apiserver_attacks(scene) + operator_attacks(scene, shared_uri)
    # Nothing of a's was read, written or deleted; a's run untouched; only b's own prefix changed.
    after = objects(storage, scene.bucket)
    assert {k: after.get(k) for k in victim_keys} == {k: before[k] for k in victim_keys}
    assert set(after) - set(before) <= {k for k in after if k.startswith(f"{b.ns}/")}
    assert a.get(PLURAL, "victim")["metadata"]["resourceVersion"] == victim_run["metadata"]["resourceVersion"]
    for name in (VICTIM_ADAPTER, "shared-model"):
        assert a.condition(name, "Ready").get("status") == "True", name
    ready_stays_true(scene)
    return attacks


def victim(scene: Scene) -> str:
    """a's run, whose stage output temper verified, and a's artifact in shared storage (its URI)."""
    a, storage, tmp_path, operator = scene.a, scene.storage, scene.tmp_path, scene.operator
    bucket = scene.bucket
    victim_prefix = f"{a.prefix}runs/victim/g1/sft/"
    publish(storage, victim_prefix, tmp_path, a.ns, "victim")
    a.create(PLURAL, a.run("victim"))
    wait_for(
        "the victim's run",
        lambda: a.condition("victim", "Succeeded", PLURAL).get("status") == "True",
        60,
        operator,
    )
    victim_adapter = "victim-sft-g1"
    wait_for(
        "the victim's Adapter Ready",
        lambda: a.condition(victim_adapter, "Ready").get("status") == "True",
        30,
        operator,
    )
    shared_uri = publish(storage, f"s3://{bucket}/shared/team-a-model/", tmp_path, a.ns, "shared")
    a.create("adapters", a.adapter("shared-model", shared_uri))
    wait_for(
        "the shared Adapter Ready",
        lambda: a.condition("shared-model", "Ready").get("status") == "True",
        30,
        operator,
    )

    return shared_uri


def admission_attacks(scene: Scene) -> int:
    """Refused by the chart's ValidatingAdmissionPolicies, each naming the field; nothing created."""
    a, b, storage, bucket = scene.a, scene.b, scene.storage, scene.bucket
    victim_prefix = f"{a.prefix}runs/victim/g1/sft/"
    api_server = scene.cluster.api_client().configuration.host
    attacks = 0
    victim_manifest = f"{victim_prefix}manifest.json"
    a_data = f"{a.prefix}data/private.jsonl"
    run_attacks: list[tuple[dict[str, Any], str]] = [
        (
            {"storage": {"uri": f"{a.prefix}runs/overwrite/", "secretRef": {"name": SECRET}}},
            "spec.storage.uri",
        ),
        ({"baseModel": {"uri": f"{a.prefix}runs/victim/g1/sft/"}}, "spec.baseModel.uri"),
        ({"datasets": [{"name": "tickets", "uri": a_data}]}, "spec.datasets[name=tickets]"),
        (
            {
                "storage": {
                    "uri": f"{b.prefix}runs/x/../../{a.ns}/runs/victim/",
                    "secretRef": {"name": SECRET},
                }
            },
            "spec.storage.uri",
        ),  # path escape through the key
        ({"storage": {"uri": f"{b.prefix}r/", "endpointUrl": api_server}}, "spec.storage.endpointUrl"),
        (
            {"storage": {"uri": f"{b.prefix}r/", "endpointUrl": f"{storage.config.endpoint_url}/moto-api/"}},
            "spec.storage.endpointUrl",
        ),  # the S3 server's admin API
        (
            {
                "storage": {
                    "uri": f"{b.prefix}r/",
                    "endpointUrl": f"{storage.config.endpoint_url}/{bucket}/{a.ns}/",
                }
            },
            "spec.storage.endpointUrl",
        ),  # another tenant's bucket path as the endpoint
        (
            {"storage": {"uri": f"{b.prefix}r/", "endpointUrl": "http://169.254.169.254/"}},
            "spec.storage.endpointUrl",
        ),
        ({"trainer": {"image": "evil.example/miner:latest"}}, "spec.trainer.image"),
        ({"priorityClassName": "system-node-critical"}, "spec.priorityClassName"),
        ({"trainer": {"env": [{"name": "TEMPER_FAILPOINT", "value": "publish_crash"}]}}, "TEMPER_FAILPOINT"),
        ({"trainer": {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "stolen"}]}}, "AWS_ACCESS_KEY_ID"),
        (
            {
                "stages": [
                    {
                        "name": "sft",
                        "type": "sft",
                        "data": {"train": ["tickets"]},
                        "resources": {"gpus": 8, "nodes": 2, **KWOK},
                    }
                ]
            },
            "spec.stages[name=sft].resources",
        ),
        (
            {
                "stages": [
                    {
                        "name": "sft",
                        "type": "sft",
                        "data": {"train": ["tickets"]},
                        "resources": {"gpus": 1, "affinity": {"nodeAffinity": {}}, **KWOK},
                    }
                ]
            },
            "spec.stages[name=sft].resources.affinity",
        ),
        (
            {
                "continual": {
                    "schedule": "@daily",
                    "replay": {"ratio": 0.2, "buffer": {"uri": f"{a.prefix}replay/"}},
                }
            },
            "spec.continual.replay.buffer.uri",
        ),  # the replay index would be written into tenant a's prefix
        (
            {
                "continual": {
                    "schedule": "@daily",
                    "newData": {"dataset": "tickets", "prefix": f"{a.prefix}data/"},
                }
            },
            "spec.continual.newData.prefix",
        ),
    ]
    for i, (change, field) in enumerate(run_attacks):
        refused(partial(b.create, PLURAL, b.run(f"attack-{i}", **change)), field)
        attacks += 1
    annotated = b.run("annotated")
    annotated["metadata"]["annotations"] = {
        "temper.dev/pod-annotations": json.dumps({"iam.amazonaws.com/role": "admin"})
    }
    refused(lambda: b.create(PLURAL, annotated), "temper.dev/pod-annotations")
    attacks += 1
    adapter_attacks = [
        (b.adapter("read-victim", victim_manifest, "delete"), "spec.artifact.uri"),
        (
            b.adapter("escape", f"{b.prefix}x/../../{a.ns}/runs/victim/g1/sft/manifest.json", "delete"),
            "spec.artifact.uri",
        ),
        (
            b.adapter("ssrf", f"{b.prefix}m/manifest.json", endpointUrl=api_server),
            "spec.artifact.endpointUrl",
        ),
    ]
    for body, field in adapter_attacks:
        refused(partial(b.create, "adapters", body), field)
        attacks += 1

    return attacks


def apiserver_attacks(scene: Scene) -> int:
    """b's edit role reaches nothing of a's, and grants no status writes (no forged verdicts)."""
    a, b, storage, tmp_path = scene.a, scene.b, scene.storage, scene.tmp_path
    victim_adapter = VICTIM_ADAPTER
    attacks = 0
    forbidden = [
        lambda: b.custom.get_namespaced_custom_object(GROUP, VERSION, a.ns, "adapters", victim_adapter),
        lambda: b.custom.delete_namespaced_custom_object(GROUP, VERSION, a.ns, "adapters", victim_adapter),
        lambda: b.custom.patch_namespaced_custom_object(
            GROUP, VERSION, a.ns, "adapters", victim_adapter, {"spec": {"lifecycle": "retired"}}
        ),
        lambda: client.CoreV1Api(b.api).read_namespaced_secret(SECRET, a.ns),
        lambda: b.create("adapters", b.adapter("planted", f"{a.prefix}p/manifest.json"), namespace=a.ns),
    ]
    for attempt in forbidden:
        refused(attempt, "forbidden")
        attacks += 1
    # A forged verdict: edit grants no status writes, so an Adapter cannot claim Ready itself.
    b.create("adapters", b.adapter("own", publish(storage, f"{b.prefix}own/", tmp_path, b.ns, "own")))
    refused(
        lambda: b.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, b.ns, "adapters", "own", {"status": {"phase": "Ready"}}
        ),
        "forbidden",
    )
    attacks += 1

    return attacks


def operator_attacks(scene: Scene, shared_uri: str) -> int:
    """Admitted, then refused by the operator with a condition naming why; nothing of a's touched."""
    a, b, storage, operator = scene.a, scene.b, scene.storage, scene.operator
    victim_prefix = f"{a.prefix}runs/victim/g1/sft/"
    victim_adapter = VICTIM_ADAPTER
    attacks = 0
    # The "stolen" Adapter of issue 17, on storage both namespaces may use: it verifies (reading
    # shared storage is allowed), but retiring it with onRetire: delete deletes nothing of a's.
    b.create("adapters", b.adapter("stolen", shared_uri, "delete"))
    wait_for("stolen verified", lambda: b.condition("stolen", "Ready").get("status") == "True", 30, operator)
    b.patch("adapters", "stolen", {"spec": {"lifecycle": "retired"}})
    deleted = wait_for(
        "the retention refusal", lambda: b.condition("stolen", "ArtifactDeleted") or None, 30, operator
    )
    assert (deleted["status"], deleted["reason"]) == ("False", "RetentionRefused"), deleted
    assert f"published for namespace {a.ns!r}" in deleted["message"]
    b.custom.delete_namespaced_custom_object(GROUP, VERSION, b.ns, "adapters", "stolen")
    wait_for("stolen gone", lambda: not _exists(b, "stolen"), 30, operator)
    attacks += 2  # retire, then delete
    # A manifest in b's own prefix that lists a's file by "..": never a valid manifest.
    escape_uri = f"{b.prefix}escape/manifest.json"
    size = storage.head(f"{victim_prefix}attempts/1/adapter_model.safetensors")
    assert size is not None
    evil = {
        "schemaVersion": 1,
        "files": [
            {
                "path": f"../../{a.ns}/runs/victim/g1/sft/attempts/1/adapter_model.safetensors",
                "sha256": "0" * 64,
                "size": 1,
            }
        ],
        "baseModel": "builtin://tiny",
        "method": "lora",
        "stageType": "sft",
        "trainerVersion": "x",
        "createdAt": "2026-01-01T00:00:00Z",
    }
    storage.put_bytes(escape_uri, json.dumps(evil).encode())
    b.create("adapters", b.adapter("escape-manifest", escape_uri, "delete"))
    wait_for(
        "the escape refused",
        lambda: b.condition("escape-manifest", "Ready").get("status") == "False",
        30,
        operator,
    )
    assert "not a valid manifest" in b.condition("escape-manifest", "Ready")["message"]
    b.patch("adapters", "escape-manifest", {"spec": {"lifecycle": "retired"}})
    deleted = wait_for(
        "escape retention refused",
        lambda: b.condition("escape-manifest", "ArtifactDeleted") or None,
        30,
        operator,
    )
    assert deleted["reason"] == "RetentionRefused", deleted
    attacks += 2  # verify (a HEAD of a's file), retire with delete
    # A merge naming a's Adapter: sources are looked up in b's namespace only.
    merge = b.adapter("merge-victim", f"{b.prefix}merged/manifest.json")
    merge["spec"]["merge"] = {"method": "linear", "sources": [{"name": victim_adapter}, {"name": "own"}]}
    b.create("adapters", merge)
    blocked = wait_for("merge blocked", lambda: b.condition("merge-victim", "Merged") or None, 30, operator)
    assert blocked["status"] == "False", blocked
    assert victim_adapter in blocked["message"], blocked
    attacks += 1

    return attacks


def ready_stays_true(scene: Scene) -> None:
    """Files that vanish or change under Ready Adapters: Ready=False, Stalled with the reason, an event."""
    a, storage, bucket, operator, cluster = (
        scene.a,
        scene.storage,
        scene.bucket,
        scene.operator,
        scene.cluster,
    )
    victim_adapter = VICTIM_ADAPTER
    core = client.CoreV1Api(cluster.api_client())
    storage.client.delete_object(
        Bucket=bucket, Key=f"{a.ns}/runs/victim/g1/sft/attempts/1/adapter_config.json"
    )
    storage.put_bytes(f"s3://{bucket}/shared/team-a-model/attempts/1/adapter_model.safetensors", b"x" * 8)
    for name, reason in ((victim_adapter, "ArtifactMissing"), ("shared-model", "ChecksumMismatch")):
        lost = wait_for(
            f"{name} no longer Ready",
            partial(stalled, a, name),
            20,
            operator,
        )
        assert lost
        ready = a.condition(name, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", reason), ready
        # the event follows the status write: give it the time the condition got
        wait_for(f"a {reason} event for {name}", partial(_has_event, core, a.ns, name, reason), 20, operator)


def _has_event(core: client.CoreV1Api, namespace: str, name: str, reason: str) -> bool:
    items = core.list_namespaced_event(namespace).items
    return any(e.reason == reason and e.involved_object.name == name for e in items)


def stalled(tenant: Tenant, name: str) -> bool:
    return tenant.condition(name, "Stalled").get("status") == "True"


def _exists(tenant: Tenant, name: str) -> bool:
    with contextlib.suppress(client.ApiException):
        tenant.get("adapters", name)
        return True
    return False
