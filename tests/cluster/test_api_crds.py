"""The generated CRDs against the real apiserver: examples are created, every invalid manifest of
the shared table is rejected naming the field (and pydantic agrees), immutability holds, and
``kubectl explain`` shows the models' descriptions."""

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
from temper.api import GROUP, VERSION, check_update, parse_manifest

from tests.unit.test_api_cases import (
    BASE_ADAPTER,
    BASE_RUN,
    IMMUTABLE_UPDATES,
    INVALID_CASES,
    VALID_UPDATES,
    pydantic_errors,
)

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
PLURALS = {"PostTrainingRun": "posttrainingruns", "Adapter": "adapters"}
CRD_NAMES = ("posttrainingruns.temper.dev", "adapters.temper.dev")


@pytest.fixture(scope="module")
def api_crds(cluster: Any) -> None:
    """The generated CRDs, installed once per module.

    Server-side apply: idempotent beside other modules' installs, and no size-limited annotation."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in CRD_NAMES))


@pytest.fixture
def objects(cluster: Any, api_crds: None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api_client())


def _create(api: client.CustomObjectsApi, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    # Strict field validation, as kubectl does: unknown fields are errors, not silently pruned.
    result: dict[str, Any] = api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURALS[obj["kind"]], obj, field_validation="Strict"
    )
    return result


def _rejection(api: client.CustomObjectsApi, namespace: str, obj: dict[str, Any]) -> str:
    """The apiserver's error message for creating ``obj``; fails the test if it is accepted."""
    with pytest.raises(ApiException) as raised:
        _create(api, namespace, obj)
    assert raised.value.status in {400, 422}, f"unexpected status {raised.value.status}: {raised.value.body}"
    return str(json.loads(raised.value.body)["message"])


def _examples() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((REPO / "examples").glob("*.yaml"))]


def test_every_example_is_created_and_defaults_agree(
    objects: client.CustomObjectsApi, namespace: str
) -> None:
    examples = _examples()
    assert len(examples) >= 18
    for example in examples:
        stored = _create(objects, namespace, example)
        assert stored["metadata"]["uid"]
        # The stored object (apiserver defaults filled in) means what pydantic makes of the input.
        ours = parse_manifest(example).model_dump(by_alias=True, exclude_none=True)["spec"]
        theirs = parse_manifest(stored).model_dump(by_alias=True, exclude_none=True)["spec"]
        assert theirs == ours, example["metadata"]["name"]


def test_invalid_manifests_are_rejected_naming_the_field(
    objects: client.CustomObjectsApi, namespace: str, subtests: Any
) -> None:
    for case in INVALID_CASES:
        with subtests.test(case=case.id):
            manifest = case.manifest()
            server = _rejection(objects, namespace, manifest)
            ours = "\n".join(pydantic_errors(manifest))
            assert ours, f"pydantic accepted {case.id}; the apiserver said: {server}"
            for mention in case.mentions:
                assert mention in server, f"apiserver message lacks {mention!r}: {server}"
                assert mention in ours, f"pydantic message lacks {mention!r}: {ours}"


def _replace(
    api: client.CustomObjectsApi, namespace: str, kind: str, name: str, spec: dict[str, Any]
) -> None:
    current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
    current["spec"] = spec
    api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name, current)


def test_updates_respect_immutability(
    objects: client.CustomObjectsApi, namespace: str, subtests: Any
) -> None:
    bases = {"PostTrainingRun": BASE_RUN, "Adapter": BASE_ADAPTER}
    stored = {kind: _create(objects, namespace, copy.deepcopy(base)) for kind, base in bases.items()}
    for kind, update_id, mutate, field in IMMUTABLE_UPDATES:
        with subtests.test(update=f"{kind}/{update_id}"):
            spec = copy.deepcopy(stored[kind]["spec"])
            mutate(spec)
            assert any(field in p for p in check_update(kind, stored[kind]["spec"], spec))
            with pytest.raises(ApiException) as raised:
                _replace(objects, namespace, kind, "case", spec)
            message = json.loads(raised.value.body)["message"]
            assert raised.value.status == 422, message
            assert f"{field} is immutable" in message
    for kind, update_id, mutate in VALID_UPDATES:
        with subtests.test(update=f"{kind}/{update_id}"):
            current = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], "case")
            spec = copy.deepcopy(current["spec"])
            mutate(spec)
            assert check_update(kind, current["spec"], spec) == []
            _replace(objects, namespace, kind, "case", spec)
    # The adapter is retired now (a valid update above); it may not come back.
    spec = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "adapters", "case")["spec"]
    assert spec["lifecycle"] == "retired"
    revived = {**spec, "lifecycle": "active"}
    assert check_update("Adapter", spec, revived) == [
        "spec.lifecycle: a retired adapter cannot become active again"
    ]
    with pytest.raises(ApiException) as raised:
        _replace(objects, namespace, "Adapter", "case", revived)
    assert "retired adapter cannot become active" in json.loads(raised.value.body)["message"]


def test_status_subresource_and_printer_columns(
    cluster: Any, objects: client.CustomObjectsApi, namespace: str
) -> None:
    run = _create(objects, namespace, {**copy.deepcopy(BASE_RUN), "metadata": {"name": "with-status"}})
    status = {
        "observedGeneration": 1,
        "phase": "Running",
        "conditions": [
            {
                "type": "Succeeded",
                "status": "Unknown",
                "reason": "StageRunning",
                "message": "stage dpo 42%",
                "observedGeneration": 1,
                "lastTransitionTime": "2026-11-26T19:00:00Z",
            },
            {"type": "Reconciling", "status": "True", "reason": "StageRunning", "observedGeneration": 1},
        ],
        "stages": [
            {
                "name": "sft",
                "state": "Succeeded",
                "job": "with-status-sft-1",
                "attempts": 1,
                "metrics": {"train_loss": 0.9},
            },
            {"name": "dpo", "state": "Running", "attempts": 1},
        ],
        "progress": {
            "stage": "dpo",
            "percent": 42.0,
            "step": 42,
            "totalSteps": 100,
            "loss": 0.61,
            "etaSeconds": 90,
        },
        "cycles": [{"cycle": 1, "state": "Running", "dataVersions": ["s3://temper/data/2026-11.jsonl@abc"]}],
        "aliases": [{"name": "stable", "adapter": "with-status-g1", "cycle": 1}],
    }
    run["status"] = status
    updated = objects.replace_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "posttrainingruns", "with-status", run
    )
    assert updated["status"]["progress"]["percent"] == 42.0
    assert parse_manifest(updated).status is not None
    lines = cluster.kubectl("get", "ptr", "with-status", "-n", namespace).stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "STAGE", "PROGRESS", "SUCCEEDED", "AGE"]
    assert lines[1].split()[:5] == ["with-status", "Running", "dpo", "42", "Unknown"]


def test_kubectl_explain_shows_model_descriptions(cluster: Any, api_crds: None) -> None:
    deadline = time.monotonic() + 30
    while True:  # the CRD's OpenAPI is published asynchronously after Established
        result = cluster.kubectl("explain", "posttrainingrun.spec.stages", check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "The pipeline, run in order." in text
    assert "An earlier stage whose adapter this stage starts from" in text
    assert "Quantization" not in text  # nested fields are explained one level at a time
    peft = " ".join(cluster.kubectl("explain", "ptr.spec.stages.peft.bits").stdout.split())
    assert "Required for qlora" in peft
    adapters = " ".join(cluster.kubectl("explain", "adapter.spec.lifecycle").stdout.split())
    assert "may not become active again" in adapters


def test_category_and_short_names(cluster: Any, objects: client.CustomObjectsApi, namespace: str) -> None:
    _create(objects, namespace, {**copy.deepcopy(BASE_ADAPTER), "metadata": {"name": "listed"}})
    _create(objects, namespace, {**copy.deepcopy(BASE_RUN), "metadata": {"name": "listed"}})
    listed = cluster.kubectl("get", "temper", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(listed) == ["adapter.temper.dev/listed", "posttrainingrun.temper.dev/listed"]
    header = cluster.kubectl("get", "adp", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "METHOD", "TASK", "LIFECYCLE", "ALIASES", "READY", "AGE"]
    # status.aliases (mirrored by the operator from the runs' aliases) is listed per Adapter.
    objects.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "adapters", "listed", {"status": {"aliases": ["canary", "production"]}}
    )
    row = cluster.kubectl("get", "adp", "listed", "-n", namespace).stdout.splitlines()[1]
    assert '["canary","production"]' in row, row
