"""Retire with retention delete removes exactly the manifest's objects, against a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest
from temper.api.contract import StorageConfig
from temper.continual.lifecycle import RetentionRefused, delete_artifact
from temper.storage import Storage
from temper_dev.s3server import S3Server

pytestmark = pytest.mark.cluster

MANIFEST_FIELDS = {
    "baseModel": "builtin://tiny",
    "method": "lora",
    "stageType": "sft",
    "trainerVersion": "test",
}


def _storage(server: S3Server) -> Storage:
    return Storage(StorageConfig.model_validate({"endpointUrl": server.endpoint_url}), server.client())


def test_retire_delete_removes_the_listed_objects_and_only_those(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    storage = _storage(s3_server)
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    prefix = f"s3://{s3_bucket}/runs/bot/g1/sft/"
    published = storage.publish_atomic(tmp_path, prefix, 1, MANIFEST_FIELDS)
    # Neighbours that share folders or prefixes with the adapter and must survive.
    survivors = [
        f"{prefix}attempts/2/adapter_model.safetensors",  # a losing attempt, not in the manifest
        f"{prefix}checkpoints/step-10/state.pt",
        f"{prefix}attempts/1/progress.json.bak",
        f"s3://{s3_bucket}/runs/bot/g1/sft-other/manifest.json",
        f"s3://{s3_bucket}/runs/bot/g1/sft/../x",  # a literal key that looks like a traversal
    ]
    for uri in survivors:
        storage.put_bytes(uri, b"keep me")
    before = set(storage.list_keys(f"s3://{s3_bucket}/"))

    result = delete_artifact(storage, published.manifest_uri, "bot", published.sha256)

    after = set(storage.list_keys(f"s3://{s3_bucket}/"))
    removed = {f"s3://{s3_bucket}/{k}" for k in before - after}
    assert removed == {
        f"{prefix}attempts/1/adapter_config.json",
        f"{prefix}attempts/1/adapter_model.safetensors",
        published.manifest_uri,
    }
    assert set(result.deleted) == removed
    assert result.deleted[-1] == published.manifest_uri  # the manifest goes last
    for uri in survivors:
        assert storage.exists(uri), uri
    # Idempotent: a second pass (a retried finalizer) finds nothing left and deletes nothing.
    again = delete_artifact(storage, published.manifest_uri, "bot", published.sha256)
    assert again.already_gone
    assert again.deleted == []
    assert set(storage.list_keys(f"s3://{s3_bucket}/")) == after


def test_corrupted_object_fails_verification_naming_the_file(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """The verification the Adapter controller relies on before Ready (and before promotion)."""
    storage = _storage(s3_server)
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\1" * 2048)
    published = storage.publish_atomic(tmp_path, f"s3://{s3_bucket}/a/", 1, MANIFEST_FIELDS)
    assert storage.verify_manifest(published.manifest_uri).ok
    # Same size, different bytes: only the sha256 can tell.
    storage.put_bytes(f"s3://{s3_bucket}/a/attempts/1/adapter_model.safetensors", b"\2" * 2048)
    result = storage.verify_manifest(published.manifest_uri)
    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith("attempts/1/adapter_model.safetensors: sha256 mismatch")


def _objects(storage: Storage, bucket: str) -> dict[str, str]:
    listing = storage.client.list_objects_v2(Bucket=bucket).get("Contents") or []
    return {o["Key"]: o["ETag"] for o in listing}


def test_stolen_adapter_cannot_delete_another_namespaces_artifact(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Issue 17's reproduction: tenant-b's Adapter ``stolen`` names temper-demo's quickstart
    manifest with onRetire: delete; retiring it must delete nothing."""
    storage = _storage(s3_server)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\3" * 512)
    lineage = {"run": {"namespace": "temper-demo", "name": "quickstart", "uid": "u1"}, "stage": "sft"}
    fields = {**MANIFEST_FIELDS, "lineage": lineage}
    published = storage.publish_atomic(tmp_path, f"s3://{s3_bucket}/runs/quickstart/g1/sft/", 1, fields)
    before = _objects(storage, s3_bucket)
    # Even with the victim's exact manifest digest (it verified in tenant-b with a shared key).
    with pytest.raises(RetentionRefused, match="published for namespace 'temper-demo', not 'tenant-b'"):
        delete_artifact(storage, published.manifest_uri, "tenant-b", published.sha256)
    assert _objects(storage, s3_bucket) == before
    # A hand-made manifest (no temper lineage) this Adapter never verified: refused too.
    hand = storage.publish_atomic(tmp_path, f"s3://{s3_bucket}/hand/", 1, MANIFEST_FIELDS)
    before = _objects(storage, s3_bucket)
    with pytest.raises(RetentionRefused, match="never verified these bytes"):
        delete_artifact(storage, hand.manifest_uri, "tenant-b", None)
    assert _objects(storage, s3_bucket) == before
    # The owner's own retention still works.
    assert delete_artifact(storage, published.manifest_uri, "temper-demo", None).deleted
