"""kopf handlers for the Adapter catalog's lifecycle: retire, retention (finalizer) and merge.

Watch-event handlers only (kopf then writes nothing of its own to the objects): the work is done
when an event shows something to do, and an Adapter that needs nothing costs no writes.

- ``spec.retention.onRetire: delete`` puts the finalizer ``temper.dev/artifact-retention`` on the
  Adapter; retiring it (or deleting it) removes exactly the manifest's files and the manifest.
- ``spec.merge``: sources are validated (``temper.continual.merge``); the merge Job is rendered
  by the operator's Job builder and publishes to the folder of ``spec.artifact.uri``; the ordinary
  Adapter verification then makes the Adapter Ready. Condition ``Merged`` tells the story. The
  continual periodic pass re-checks unmerged Adapters (their sources' readiness is not their event).
"""

from __future__ import annotations

from typing import Any, cast

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from temper import adapters as adapter_ctl
from temper.api.run import PostTrainingRun
from temper.builders.job import build_job
from temper.config import OperatorConfig
from temper.continual import lifecycle
from temper.continual.cycle import upsert_condition
from temper.continual.merge import MergeBlocked, merge_contract, plan_merge
from temper.handlers.continual import (
    ADAPTERS,
    GROUP,
    PERIODIC,
    VERSION,
    _now,
    api_client,
    custom,
    emit,
    get_adapter,
    list_objects,
    log,
    storage_for,
)
from temper.kube import status_changed
from temper.storage import StorageError

MERGED = adapter_ctl.MERGED


def _patch(namespace: str, name: str, body: dict[str, Any]) -> None:
    try:
        custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, ADAPTERS, name, body)
    except ApiException as exc:
        if exc.status != 404:
            raise


def _patch_status(adapter: dict[str, Any], desired: dict[str, Any]) -> None:
    meta = adapter.get("metadata") or {}
    if not status_changed(desired, adapter.get("status")):
        return
    try:
        custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, meta.get("namespace"), ADAPTERS, meta.get("name"), {"status": desired}
        )
    except ApiException as exc:
        if exc.status != 404:
            raise


def _mark_pending(adapter: dict[str, Any]) -> dict[str, Any]:
    """Give a never-verified Adapter its kstatus conditions (Reconciling=True) at once.

    The patch carries the observed resourceVersion, so it can never overwrite a verification
    result written in between (the apiserver answers 409 and the result stands).
    """
    meta = adapter.get("metadata") or {}
    body = {
        "metadata": {"resourceVersion": meta.get("resourceVersion")},
        "status": adapter_ctl.pending_status(adapter, _now()),
    }
    try:
        written: dict[str, Any] = custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, meta.get("namespace"), ADAPTERS, meta.get("name"), body
        )
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise
        return adapter
    return written


def _condition(adapter: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    return upsert_condition((adapter.get("status") or {}).get("conditions") or [], new, _now())


@kopf.on.event(GROUP, VERSION, ADAPTERS)
def adapter_lifecycle(event: kopf.RawEvent, **_: Any) -> None:
    if event.get("type") == "DELETED":
        return
    adapter = cast(dict[str, Any], dict(event["object"]))
    meta = adapter.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "default")), str(meta.get("name"))
    body = cast(kopf.Body, adapter)
    try:
        retention_delete = lifecycle.wants_finalizer(adapter)
        retired = lifecycle.lifecycle_of(adapter) == "retired"
    except lifecycle.LifecycleError as exc:
        emit(body, "Warning", "InvalidLifecycle", str(exc))
        return
    finalizers = list(meta.get("finalizers") or [])
    if meta.get("deletionTimestamp"):
        if lifecycle.RETENTION_FINALIZER in finalizers:
            if lifecycle.should_delete_artifact(adapter, deleting=True):
                _delete_artifact(adapter, namespace)
            remaining = [f for f in finalizers if f != lifecycle.RETENTION_FINALIZER]
            _patch(namespace, name, {"metadata": {"finalizers": remaining or None}})
        return
    if retention_delete and lifecycle.RETENTION_FINALIZER not in finalizers:
        _patch(namespace, name, {"metadata": {"finalizers": [*finalizers, lifecycle.RETENTION_FINALIZER]}})
    if retired:
        desired: dict[str, Any] = {"phase": "Retired"}
        if lifecycle.should_delete_artifact(adapter, deleting=False):
            desired["conditions"] = _delete_artifact(adapter, namespace)
        _patch_status(adapter, desired)
        return
    if not (adapter.get("status") or {}).get("conditions"):
        adapter = _mark_pending(adapter)
    if (adapter.get("spec") or {}).get("merge"):
        _reconcile_merge(adapter, namespace)


def _unmerged(adapter: dict[str, Any]) -> bool:
    spec = adapter.get("spec") or {}
    if not spec.get("merge") or spec.get("lifecycle") == "retired":
        return False
    if (adapter.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (adapter.get("status") or {}).get("conditions") or []
    merged = next((c for c in conditions if c.get("type") == MERGED), None)
    return merged is None or merged.get("status") != "True"


def reconcile_merges() -> None:
    """Periodic: sources becoming Ready (or the Job publishing) are not the merged Adapter's events."""
    for adapter in list_objects(ADAPTERS):
        if _unmerged(adapter):
            try:
                _reconcile_merge(adapter, str(adapter["metadata"].get("namespace", "default")))
            except Exception:
                log.exception("merge %s", adapter["metadata"].get("name"))


PERIODIC.append(reconcile_merges)


def _delete_artifact(adapter: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """Delete the manifest's objects; returns the conditions recording it (also patched)."""
    artifact = dict((adapter.get("spec") or {}).get("artifact") or {})
    uri = str(artifact.get("uri", ""))
    body = cast(kopf.Body, adapter)
    try:
        result = lifecycle.delete_artifact(storage_for(artifact, namespace), uri)
    except (StorageError, lifecycle.LifecycleError) as exc:
        emit(body, "Warning", "RetentionFailed", str(exc))
        raise
    message = (
        "manifest already gone" if result.already_gone else f"deleted {len(result.deleted)} objects of {uri}"
    )
    conditions = _condition(
        adapter,
        {
            "type": lifecycle.ARTIFACT_DELETED,
            "status": "True",
            "reason": "RetentionDelete",
            "message": message,
        },
    )
    _patch_status(adapter, {"conditions": conditions})
    emit(body, "Normal", "ArtifactDeleted", message)
    return conditions


def _reconcile_merge(adapter: dict[str, Any], namespace: str) -> None:
    spec = adapter.get("spec") or {}
    artifact = dict(spec.get("artifact") or {})
    body = cast(kopf.Body, adapter)
    storage = storage_for(artifact, namespace)
    if storage.exists(str(artifact.get("uri"))):
        merged = {
            "type": MERGED,
            "status": "True",
            "reason": "Published",
            "message": "merged adapter published",
        }
        _patch_status(adapter, {"conditions": _condition(adapter, merged)})
        return
    names = [str(s.get("name")) for s in (spec.get("merge") or {}).get("sources") or []]
    plan = plan_merge(adapter, {n: get_adapter(namespace, n) for n in names})
    if isinstance(plan, MergeBlocked):
        blocked = {"type": MERGED, "status": "False", "reason": plan.reason, "message": plan.message}
        desired = {"conditions": _condition(adapter, blocked)}
        if status_changed(desired, adapter.get("status")):
            emit(body, "Warning", plan.reason, plan.message)
        _patch_status(adapter, desired)
        return
    meta = adapter.get("metadata") or {}
    name, uid = str(meta.get("name")), str(meta.get("uid", ""))
    storage_opts = {k: v for k, v in artifact.items() if k != "uri"}
    merge_stage = {
        "name": "merge",
        "type": "merge",
        "merge": {
            "method": plan.method,
            **({"density": plan.density} if plan.density is not None else {}),
            "sources": [{"adapter": s.name, "weight": s.weight} for s in plan.sources],
        },
    }
    # A one-stage run shaped like the merge, so the operator's own Job builder renders the Job.
    run = PostTrainingRun.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {
                "baseModel": {"uri": plan.base_model},
                "storage": {**storage_opts, "uri": plan.output_prefix},
                "datasets": [],
                "stages": [merge_stage],
            },
        }
    )
    contract = merge_contract(plan, namespace=namespace, name=name, uid=uid, storage=storage.config)
    job = build_job(
        run, run.spec.stages[0], contract, cycle=1, attempt=1, suspend=False, config=OperatorConfig.from_env()
    )
    job["metadata"]["ownerReferences"] = [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Adapter", "name": name, "uid": uid, "controller": True}
    ]
    job_name = job["metadata"]["name"]
    try:
        k8s.BatchV1Api(api_client()).create_namespaced_job(namespace, job)
        emit(body, "Normal", "MergeStarted", f"merge Job {job_name}")
    except ApiException as exc:
        if exc.status != 409:
            raise
    merging = {"type": MERGED, "status": "False", "reason": "Merging", "message": f"merge Job {job_name}"}
    _patch_status(adapter, {"conditions": _condition(adapter, merging)})
