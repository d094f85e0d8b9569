"""The Adapter catalog's lifecycle: retire, retention (finalizer) and merge, on the one controller path.

:meth:`temper.handlers.runtime.Runtime.reconcile_adapter` calls :func:`reconcile` before
verification, on the storage lane (merge and retention touch S3). Reads come from the caches,
writes go through :class:`temper.kube.Kube`; an Adapter that needs nothing costs no writes.

- ``spec.retention.onRetire: delete`` puts the finalizer ``temper.dev/artifact-retention`` on the
  Adapter; retiring it (or deleting it) removes exactly the manifest's files and the manifest.
- ``spec.merge``: sources are validated (``temper.continual.merge``); the merge Job is rendered
  by the operator's Job builder and publishes to the folder of ``spec.artifact.uri``; the ordinary
  Adapter verification then makes the Adapter Ready. Condition ``Merged`` tells the story. A
  source's event (or the merge Job's) re-queues the merged Adapter (``waiting_merges``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from temper import adapters as adapter_ctl
from temper.api.common import GROUP, VERSION
from temper.api.run import PostTrainingRun
from temper.builders.job import build_job
from temper.continual import lifecycle
from temper.continual.cycle import upsert_condition
from temper.continual.merge import MergeBlocked, merge_contract, plan_merge
from temper.handlers.continual_apply import _now
from temper.kube import ADAPTER_PLURAL, status_changed
from temper.planner import Event
from temper.storage import StorageError

if TYPE_CHECKING:
    from temper.handlers.runtime import Key, Runtime

MERGED = adapter_ctl.MERGED


async def reconcile(rt: Runtime, key: Key, adapter: dict[str, Any]) -> dict[str, Any] | None:
    """Lifecycle steps; the Adapter as it now stands, or None when verification must not follow."""
    meta = adapter.get("metadata") or {}
    namespace, name = key
    try:
        retention_delete = lifecycle.wants_finalizer(adapter)
        retired = lifecycle.lifecycle_of(adapter) == "retired"
    except lifecycle.LifecycleError as exc:
        await rt.kube.emit(adapter, Event("Warning", "InvalidLifecycle", str(exc)))
        return None
    finalizers = list(meta.get("finalizers") or [])
    if meta.get("deletionTimestamp"):
        if lifecycle.RETENTION_FINALIZER in finalizers:
            if lifecycle.should_delete_artifact(adapter, deleting=True):
                await _delete_artifact(rt, adapter)
            remaining = [f for f in finalizers if f != lifecycle.RETENTION_FINALIZER]
            await rt.kube.patch(
                ADAPTER_PLURAL, namespace, name, {"metadata": {"finalizers": remaining or None}}
            )
        return None
    if retention_delete and lifecycle.RETENTION_FINALIZER not in finalizers:
        patch = {"metadata": {"finalizers": [*finalizers, lifecycle.RETENTION_FINALIZER]}}
        adapter = _cached(rt, key, await rt.kube.patch(ADAPTER_PLURAL, namespace, name, patch), adapter)
    if retired:
        if lifecycle.should_delete_artifact(adapter, deleting=False):
            await _delete_artifact(rt, adapter, {"phase": "Retired"})  # the decision and the phase: one write
            return None
        adapter = await _patch_status(rt, adapter, {"phase": "Retired"})
        return None if lifecycle.artifact_deleted(adapter) else adapter
    if not (adapter.get("status") or {}).get("conditions"):
        adapter = await _mark_pending(rt, adapter)
    if unmerged(adapter):
        adapter = await _reconcile_merge(rt, adapter)
    return adapter


def unmerged(adapter: dict[str, Any]) -> bool:
    spec = adapter.get("spec") or {}
    if not spec.get("merge") or spec.get("lifecycle") == "retired":
        return False
    if (adapter.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (adapter.get("status") or {}).get("conditions") or []
    merged = next((c for c in conditions if c.get("type") == MERGED), None)
    return merged is None or merged.get("status") != "True"


def waiting_merges(rt: Runtime, source: Key) -> list[Key]:
    """Unmerged Adapters in ``source``'s namespace that name it: its change may unblock them."""
    out = []
    for (ns, name), adapter in rt.caches.adapters.items():
        if ns != source[0] or not unmerged(adapter):
            continue
        sources = ((adapter.get("spec") or {}).get("merge") or {}).get("sources") or []
        if any(s.get("name") == source[1] for s in sources):
            out.append((ns, name))
    return out


def _cached(
    rt: Runtime, key: Key, written: dict[str, Any] | None, fallback: dict[str, Any]
) -> dict[str, Any]:
    if written is None:
        return fallback
    rt.caches.put_adapter(written)
    return rt.caches.adapters.get(key, fallback)


async def _patch_status(rt: Runtime, adapter: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    meta = adapter.get("metadata") or {}
    key = (str(meta.get("namespace", "")), str(meta.get("name")))
    return await rt.write_status(ADAPTER_PLURAL, key, desired) or adapter


async def _mark_pending(rt: Runtime, adapter: dict[str, Any]) -> dict[str, Any]:
    """Give a never-verified Adapter its kstatus conditions (Reconciling=True) at once.

    The patch carries the observed resourceVersion, so it can never overwrite a verification
    result written in between (the apiserver answers 409 and the result stands).
    """
    meta = adapter.get("metadata") or {}
    key = (str(meta.get("namespace", "")), str(meta.get("name")))
    desired = adapter_ctl.pending_status(adapter, _now())
    written = await rt.write_status(
        ADAPTER_PLURAL, key, desired, resource_version=meta.get("resourceVersion")
    )
    return written or adapter


def _condition(adapter: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    return upsert_condition((adapter.get("status") or {}).get("conditions") or [], new, _now())


async def _delete_artifact(rt: Runtime, adapter: dict[str, Any], also: dict[str, Any] | None = None) -> None:
    """Delete the manifest's objects, then patch the condition recording it (and ``also``'s fields)."""
    namespace = str((adapter.get("metadata") or {}).get("namespace", ""))
    artifact = dict((adapter.get("spec") or {}).get("artifact") or {})
    uri = str(artifact.get("uri", ""))
    verified = ((adapter.get("status") or {}).get("artifact") or {}).get("sha256")
    refusal = rt.adapter_policy(adapter)
    sharers = lifecycle.artifact_sharers(adapter, rt.caches.adapters.values())
    try:
        if refusal:
            raise lifecycle.RetentionRefused("; ".join(refusal))
        if sharers:
            raise lifecycle.RetentionRefused(
                f"spec.artifact.uri: still catalogued by Adapter {', '.join(sharers)}; the files are kept"
            )
        storage = await rt.storage.get(namespace, artifact)
        result = await rt.storage.run(lambda: lifecycle.delete_artifact(storage, uri, namespace, verified))
    except lifecycle.RetentionRefused as exc:
        return await _record_deletion(rt, adapter, "False", lifecycle.RETENTION_REFUSED, str(exc), also=also)
    except (StorageError, lifecycle.LifecycleError) as exc:
        await rt.kube.emit(adapter, Event("Warning", "RetentionFailed", str(exc)))
        raise
    rt.recheck_touching(result.deleted)
    message = (
        "manifest already gone" if result.already_gone else f"deleted {len(result.deleted)} objects of {uri}"
    )
    return await _record_deletion(rt, adapter, "True", "RetentionDelete", message, also=also)


async def _record_deletion(
    rt: Runtime,
    adapter: dict[str, Any],
    status: str,
    reason: str,
    message: str,
    *,
    also: dict[str, Any] | None,
) -> None:
    condition = {"type": lifecycle.ARTIFACT_DELETED, "status": status, "reason": reason, "message": message}
    await _patch_status(rt, adapter, {**(also or {}), "conditions": _condition(adapter, condition)})
    event = (
        Event("Normal", "ArtifactDeleted", message) if status == "True" else Event("Warning", reason, message)
    )
    await rt.kube.emit(adapter, event)


async def _reconcile_merge(rt: Runtime, adapter: dict[str, Any]) -> dict[str, Any]:
    meta = adapter.get("metadata") or {}
    namespace, name, uid = str(meta.get("namespace", "")), str(meta.get("name")), str(meta.get("uid", ""))
    spec = adapter.get("spec") or {}
    artifact = dict(spec.get("artifact") or {})
    storage = await rt.storage.get(namespace, artifact)
    if await rt.storage.run(lambda: storage.exists(str(artifact.get("uri")))):
        merged = {
            "type": MERGED,
            "status": "True",
            "reason": "Published",
            "message": "merged adapter published",
        }
        return await _patch_status(rt, adapter, {"conditions": _condition(adapter, merged)})
    names = [str(s.get("name")) for s in (spec.get("merge") or {}).get("sources") or []]
    plan = plan_merge(adapter, {n: rt.caches.adapters.get((namespace, n)) for n in names})
    if isinstance(plan, MergeBlocked):
        blocked = {"type": MERGED, "status": "False", "reason": plan.reason, "message": plan.message}
        desired = {"conditions": _condition(adapter, blocked)}
        if status_changed(desired, adapter.get("status")):
            await rt.kube.emit(adapter, Event("Warning", plan.reason, plan.message))
        return await _patch_status(rt, adapter, desired)
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
    job = build_job(run, run.spec.stages[0], contract, cycle=1, attempt=1, suspend=False, config=rt.config)
    job["metadata"]["ownerReferences"] = [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Adapter", "name": name, "uid": uid, "controller": True}
    ]
    job_name = job["metadata"]["name"]
    if await rt.kube.create(job):
        await rt.kube.emit(adapter, Event("Normal", "MergeStarted", f"merge Job {job_name}"))
    merging = {"type": MERGED, "status": "False", "reason": "Merging", "message": f"merge Job {job_name}"}
    return await _patch_status(rt, adapter, {"conditions": _condition(adapter, merging)})
