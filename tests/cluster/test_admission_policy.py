"""The chart's ValidatingAdmissionPolicies on the real apiserver give the same answers as the
operator's own check (operator/temper/policy.py) for every case of the shared table."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from temper.api import GROUP, VERSION

from tests.unit.test_chart_helm import render
from tests.unit.test_policy import CASES, STRICT_VALUES

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
CRD_NAMES = ("posttrainingruns.temper.dev", "adapters.temper.dev")


def _in_namespace(obj: Any, namespace: str) -> Any:
    # The shared table is written for namespace team-a; the test's namespace is random.
    return json.loads(json.dumps(obj).replace("team-a", namespace))


@pytest.fixture(scope="module")
def admission_policy(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in CRD_NAMES))
    docs = [d for d in render(STRICT_VALUES) if d["kind"] in POLICY_KINDS]
    assert len(docs) == 4, [d["metadata"]["name"] for d in docs]
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    yield
    cluster.kubectl("delete", "--ignore-not-found", "-f", str(path))
    _wait_lifted(client.CustomObjectsApi(cluster.api_client()))


def _run(namespace: str, spec: dict[str, Any], notes: dict[str, str] | None, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if notes:
        meta["annotations"] = notes
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PostTrainingRun", "metadata": meta, "spec": spec}


def _create(api: client.CustomObjectsApi, namespace: str, plural: str, obj: dict[str, Any]) -> str | None:
    """None when created, else the apiserver's refusal."""
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj, dry_run="All")
    except ApiException as err:
        return str(json.loads(err.body).get("message", err.body))
    return None


def _wait_enforced(api: client.CustomObjectsApi, namespace: str) -> None:
    # A new policy takes effect once the apiserver's informers and type checker have it.
    bad = _run(namespace, _in_namespace(CASES[0][0], namespace), None, "probe")
    deadline = time.monotonic() + 30
    while _create(api, namespace, "posttrainingruns", bad) is None:
        assert time.monotonic() < deadline, "the ValidatingAdmissionPolicy never took effect"
        time.sleep(0.5)


def _wait_lifted(api: client.CustomObjectsApi) -> None:
    # Deleting a policy takes effect asynchronously too: later modules must not meet it.
    probe = _run("default", _in_namespace(CASES[0][0], "default"), None, "probe")
    deadline = time.monotonic() + 30
    while (
        refusal := _create(api, "default", "posttrainingruns", probe)
    ) and "ValidatingAdmissionPolicy" in refusal:
        assert time.monotonic() < deadline, "the deleted ValidatingAdmissionPolicy is still enforced"
        time.sleep(0.5)


@pytest.mark.usefixtures("admission_policy")
def test_policy_matches_the_operator_check(cluster: Any, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api_client())
    _wait_enforced(api, namespace)
    mismatches = []
    for i, (raw, notes, expected) in enumerate(CASES):
        obj = _run(namespace, _in_namespace(copy.deepcopy(raw), namespace), notes, f"case-{i}")
        refusal = _create(api, namespace, "posttrainingruns", obj)
        if not expected and refusal is not None:
            mismatches.append(f"case {i}: refused, expected allowed: {refusal}")
        elif expected and (refusal is None or "ValidatingAdmissionPolicy" not in refusal):
            mismatches.append(f"case {i}: expected a policy refusal naming {expected}, got {refusal}")
        elif expected and not any(f"{field}:" in refusal for field in expected):
            mismatches.append(f"case {i}: refusal names none of {expected}: {refusal}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.usefixtures("admission_policy")
def test_adapter_outside_the_namespace_storage_is_refused(cluster: Any, namespace: str) -> None:
    api = client.CustomObjectsApi(cluster.api_client())
    _wait_enforced(api, namespace)

    def adapter(uri: str) -> dict[str, Any]:
        spec = {"baseModel": {"uri": "builtin://tiny"}, "artifact": {"uri": uri}, "method": "lora"}
        meta = {"name": "stolen", "namespace": namespace}
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Adapter", "metadata": meta, "spec": spec}

    other = adapter("s3://temper/temper-demo/runs/quickstart/g1/sft/manifest.json")
    # The Adapter policy is a second ValidatingAdmissionPolicy: the apiserver may enforce it a
    # moment after the run policy that _wait_enforced probed.
    deadline = time.monotonic() + 30
    while (refusal := _create(api, namespace, "adapters", other)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert refusal is not None, "the Adapter policy never refused another namespace's artifact"
    assert "spec.artifact.uri:" in refusal
    assert _create(api, namespace, "adapters", adapter(f"s3://temper/{namespace}/a/manifest.json")) is None
