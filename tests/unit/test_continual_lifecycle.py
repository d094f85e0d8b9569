"""Adapter lifecycle (active -> retired), retention decisions and the exact deletion list."""

from __future__ import annotations

from typing import Any

import pytest
from temper.api.contract import Manifest
from temper.continual.lifecycle import (
    LifecycleError,
    artifact_sharers,
    check_transition,
    lifecycle_of,
    objects_to_delete,
    should_delete_artifact,
    wants_finalizer,
)

pytestmark = pytest.mark.unit


def adapter(lifecycle: str = "active", on_retire: str = "keep", deleted: bool = False) -> dict[str, Any]:
    return {
        "spec": {"lifecycle": lifecycle, "retention": {"onRetire": on_retire}},
        "status": {"conditions": [{"type": "ArtifactDeleted", "status": "True"}]} if deleted else {},
    }


def manifest(paths: list[str]) -> Manifest:
    return Manifest.model_validate(
        {
            "files": [{"path": p, "sha256": "0" * 64, "size": 1} for p in paths],
            "baseModel": "builtin://tiny",
            "method": "lora",
            "stageType": "sft",
            "trainerVersion": "t",
            "createdAt": "2026-01-01T00:00:00Z",
        }
    )


def test_retire_is_one_way() -> None:
    check_transition(adapter("active"), adapter("retired"))
    check_transition(None, adapter("retired"))
    with pytest.raises(LifecycleError, match=r"spec\.lifecycle: a retired adapter cannot become active"):
        check_transition(adapter("retired"), adapter("active"))
    with pytest.raises(LifecycleError, match=r"spec\.lifecycle: 'archived'"):
        lifecycle_of({"spec": {"lifecycle": "archived"}})


def test_retention_decisions() -> None:
    assert not wants_finalizer(adapter(on_retire="keep"))
    assert wants_finalizer(adapter(on_retire="delete"))
    assert not should_delete_artifact(adapter("active", "delete"), deleting=False)
    assert should_delete_artifact(adapter("retired", "delete"), deleting=False)
    assert should_delete_artifact(adapter("active", "delete"), deleting=True)
    assert not should_delete_artifact(adapter("retired", "keep"), deleting=True)
    assert not should_delete_artifact(adapter("retired", "delete", deleted=True), deleting=True)
    with pytest.raises(LifecycleError, match=r"spec\.retention\.onRetire"):
        wants_finalizer({"spec": {"retention": {"onRetire": "archive"}}})


def test_objects_to_delete_lists_exactly_the_manifest_and_its_files() -> None:
    uri = "s3://ad/run/sft/manifest.json"
    keys = objects_to_delete(
        uri, manifest(["attempts/1/adapter_config.json", "attempts/1/adapter_model.safetensors"])
    )
    assert keys == [
        "s3://ad/run/sft/attempts/1/adapter_config.json",
        "s3://ad/run/sft/attempts/1/adapter_model.safetensors",
        "s3://ad/run/sft/manifest.json",  # last, so an interrupted delete can resume
    ]


@pytest.mark.parametrize("bad", ["../other/manifest.json", "/etc/passwd", "attempts//x", "attempts/./x"])
def test_objects_to_delete_refuses_paths_outside_the_folder(bad: str) -> None:
    from pydantic import ValidationError
    from temper.api.contract import ManifestFile

    with pytest.raises(ValidationError, match="not a path inside the manifest's folder"):
        manifest([bad])  # a manifest that names one is not a manifest at all
    # Defence in depth: the deletion refuses it even in a manifest built without validation.
    built = manifest([]).model_copy(
        update={"files": [ManifestFile.model_construct(path=bad, sha256="0" * 64, size=1)]}
    )
    with pytest.raises(LifecycleError, match="outside the manifest's folder"):
        objects_to_delete("s3://ad/run/sft/manifest.json", built)


def test_objects_to_delete_needs_a_manifest_uri() -> None:
    with pytest.raises(LifecycleError, match=r"spec\.artifact\.uri"):
        objects_to_delete("s3://ad/run/sft/", manifest([]))


def test_retention_keeps_files_another_live_adapter_catalogues() -> None:
    uri = "s3://b/runs/r/cycles/1/g1/sft/manifest.json"

    def cat(name: str, lifecycle: str = "active", uri: str = uri, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"namespace": "ns", "name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
        return {"metadata": meta, "spec": {"artifact": {"uri": uri}, "lifecycle": lifecycle}}

    me = cat("hand-registered", "retired")
    others = [
        me,
        cat("r-sft-g1"),  # the operator's own Adapter of that stage: live, same manifest
        cat("old", "retired"),
        cat("going", deleting=True),
        cat("elsewhere", uri="s3://b/other/manifest.json"),
        # another tenant naming the same objects cannot hold them (it has no authority over them)
        {"metadata": {"namespace": "ns2", "name": "r-sft-g1"}, "spec": {"artifact": {"uri": uri}}},
    ]
    assert artifact_sharers(me, others) == ["ns/r-sft-g1"]
    assert artifact_sharers(me, [me, cat("old", "retired")]) == []
