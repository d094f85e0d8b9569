"""The Adapter a published stage output becomes. No owner reference: the catalog outlives the run."""

from __future__ import annotations

from typing import Any

from temper.api.common import API_VERSION
from temper.api.run import PostTrainingRun, Stage
from temper.builders.names import (
    LABEL_CYCLE,
    LABEL_RUN,
    LABEL_RUN_UID,
    LABEL_STAGE,
    adapter_name,
    label_value,
)


def build_adapter(
    run: PostTrainingRun, stage: Stage, *, cycle: int, manifest_uri: str, parent: str | None = None
) -> dict[str, Any]:
    storage = run.spec.storage
    artifact: dict[str, Any] = {
        "uri": manifest_uri,
        "region": storage.region,
        "addressingStyle": storage.addressing_style,
    }
    if storage.secret_ref is not None:
        artifact["secretRef"] = {"name": storage.secret_ref.name}
    if storage.endpoint_url:
        artifact["endpointUrl"] = storage.endpoint_url
    base: dict[str, Any] = {"uri": run.spec.base_model.uri}
    if run.spec.base_model.secret_ref is not None:
        base["secretRef"] = {"name": run.spec.base_model.secret_ref.name}
    labels = {LABEL_RUN: label_value(run.metadata["name"]), LABEL_STAGE: stage.name, LABEL_CYCLE: str(cycle)}
    if run.metadata.get("uid"):
        labels[LABEL_RUN_UID] = run.metadata["uid"]
    tasks = sorted(
        {d.task for d in run.spec.datasets if d.task and stage.data and d.name in stage.data.train}
    )
    spec: dict[str, Any] = {
        "baseModel": base,
        "artifact": artifact,
        "method": stage.peft.method if stage.peft else "lora",
        "lifecycle": "active",
    }
    if len(tasks) == 1:
        spec["task"] = tasks[0]
    annotations = {"temper.dev/parent": parent} if parent else {}
    return {
        "apiVersion": API_VERSION,
        "kind": "Adapter",
        "metadata": {
            "name": adapter_name(run.metadata["name"], stage.name, cycle),
            "namespace": run.metadata.get("namespace"),
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
    }
