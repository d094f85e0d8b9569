"""Adapter lifecycle against the real operator: verification gates Ready, retire with retention
delete removes exactly the manifest's objects (finalizer), a merge with mismatched bases is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temper.api.contract import StorageConfig
from temper.storage import Storage
from temper_dev.cluster import Cluster
from temper_dev.s3server import S3Server

from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "temper.dev", "v1alpha1", "adapters"
FIELDS = {"baseModel": "builtin://tiny", "method": "lora", "stageType": "sft", "trainerVersion": "test"}


def _publish(storage: Storage, tmp_path: Path, prefix: str) -> str:
    folder = tmp_path / prefix.strip("/").replace("/", "_")
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\3" * 4096)
    return storage.publish_atomic(folder, prefix, 1, FIELDS).manifest_uri


def _adapter(name: str, uri: str, secret: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Adapter",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": spec.pop("base", "builtin://tiny")},
            "artifact": {"uri": uri, "secretRef": {"name": secret}},
            "method": "lora",
            **spec,
        },
    }


def _wait(what: str, probe: Callable[[], Any], on_fail: Callable[[], str], timeout: float = 60) -> Any:
    return wait_until(what, probe, on_fail, timeout, every=0.2)


def _condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def test_adapter_lifecycle(
    cluster: Cluster,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    operator: Any,
    tmp_path: Path,
) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )
    good = _publish(storage, tmp_path, f"s3://{s3_bucket}/cat/good/")
    bad = _publish(storage, tmp_path, f"s3://{s3_bucket}/cat/bad/")
    storage.put_bytes(
        f"s3://{s3_bucket}/cat/bad/attempts/1/adapter_model.safetensors", b"\4" * 4096
    )  # corrupted
    neighbours = [
        f"s3://{s3_bucket}/cat/good/checkpoints/step-1/x.pt",
        f"s3://{s3_bucket}/cat/good-2/manifest.json",
    ]
    for uri in neighbours:
        storage.put_bytes(uri, b"keep")

    with cluster.api_client() as api:
        crd = client.CustomObjectsApi(api)

        def get(name: str) -> dict[str, Any] | None:
            try:
                obj: dict[str, Any] = crd.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name
                )
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return obj

        def log() -> str:
            return str(operator.log()[-4000:])

        crd.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            _adapter("good", good, s3_secret, retention={"onRetire": "delete"}),
        )
        crd.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _adapter("bad", bad, s3_secret)
        )

        # Verification: the corrupted object keeps "bad" from Ready, and the condition names the file.
        ready_bad = _wait("bad verified", lambda: _condition(get("bad"), "Ready"), log)
        assert ready_bad["status"] == "False"
        assert "attempts/1/adapter_model.safetensors" in ready_bad["message"]
        ready_good = _wait(
            "good Ready", lambda: (_condition(get("good"), "Ready") or {}).get("status") == "True", log
        )
        assert ready_good
        good_obj = get("good")
        assert good_obj is not None
        assert "temper.dev/artifact-retention" in good_obj["metadata"]["finalizers"]

        # A merge of adapters on different base models is refused with a clear condition.
        other = _publish(storage, tmp_path, f"s3://{s3_bucket}/cat/other/")
        crd.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            _adapter("other", other, s3_secret, base=f"s3://{s3_bucket}/models/x/"),
        )
        _wait("other Ready", lambda: (_condition(get("other"), "Ready") or {}).get("status") == "True", log)
        merge = {"sources": [{"name": "good"}, {"name": "other"}], "method": "linear"}
        crd.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            _adapter("mix", f"s3://{s3_bucket}/cat/mix/manifest.json", s3_secret, merge=merge),
        )
        merged = _wait("mix refused", lambda: _condition(get("mix"), "Merged"), log)
        assert merged["status"] == "False"
        assert merged["reason"] == "BaseModelMismatch"
        assert "good=builtin://tiny" in merged["message"]
        assert f"other=s3://{s3_bucket}/models/x/" in merged["message"]

        # Retire with retention delete: exactly the manifest's objects go, the neighbours stay.
        before = set(storage.list_keys(f"s3://{s3_bucket}/"))
        crd.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "good", {"spec": {"lifecycle": "retired"}}
        )
        deleted = _wait("artifact deleted", lambda: _condition(get("good"), "ArtifactDeleted"), log)
        assert deleted["status"] == "True"
        assert get("good")["status"]["phase"] == "Retired"  # the decision and the phase: one write
        gone = {f"s3://{s3_bucket}/{k}" for k in before - set(storage.list_keys(f"s3://{s3_bucket}/"))}
        assert gone == {
            f"s3://{s3_bucket}/cat/good/attempts/1/adapter_config.json",
            f"s3://{s3_bucket}/cat/good/attempts/1/adapter_model.safetensors",
            good,
        }
        for uri in neighbours:
            assert storage.exists(uri), uri
        # Deleting the Adapter then releases the finalizer.
        crd.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "good")
        _wait("good gone", lambda: get("good") is None, log)


def test_hand_registered_adapter_from_a_trainer_manifest_becomes_ready(
    cluster: Cluster,
    namespace: str,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    operator: Any,
    tmp_path: Path,
) -> None:
    """The catalog's "add": an artifact uri and no run behind it. The trainer's manifest names the run
    that wrote it elsewhere as an object; the Adapter's lineage gets its name (the apiserver refused
    the object with 422 before, forever)."""
    from kubernetes import client

    storage = Storage(
        StorageConfig.model_validate({"endpointUrl": s3_server.endpoint_url}), s3_server.client()
    )
    folder = tmp_path / "imported"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\5" * 4096)
    dataset = {"name": "arith", "uri": "builtin://arith?n=8", "version": "temper-trainer 0.1", "sha256": "ab"}
    lineage = {
        "run": {"namespace": "elsewhere", "name": "trained-there", "uid": "u-1"},
        "cycle": 1,
        "stage": "sft",
        "parent": None,
        "datasets": [dataset],
        "contractHash": "c" * 64,
    }
    uri = storage.publish_atomic(
        folder, f"s3://{s3_bucket}/imported/", 1, {**FIELDS, "lineage": lineage}
    ).manifest_uri
    with cluster.api_client() as api:
        crd = client.CustomObjectsApi(api)
        crd.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _adapter("imported", uri, s3_secret)
        )

        def ready() -> dict[str, Any] | None:
            obj = crd.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "imported")
            return obj if (_condition(obj, "Ready") or {}).get("status") == "True" else None

        obj = _wait("imported Ready", ready, lambda: str(operator.log()[-4000:]))
    status = obj["status"]
    assert status["phase"] == "Ready"
    assert status["lineage"]["run"] == "trained-there"
    assert status["lineage"]["datasets"] == [dataset]
    assert status["lineage"]["contractHash"] == "c" * 64
    log = operator.log()  # the apiserver's refusal, not any "422" (a timestamp's milliseconds)
    assert "HTTP 422" not in log, log[-3000:]
    assert "Unprocessable" not in log, log[-3000:]
