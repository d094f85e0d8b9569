"""The continual apply layer: cache reads and S3 I/O around the pure continual planners.

``temper.continual.cycle`` plans a pass and ``temper.continual.actions`` turns the plan into
concrete writes. This module runs on the controller's one path (``temper.handlers.runtime``):
it reads the informer caches (runs, their cycles' children, Adapters, alias ConfigMaps), does
S3 work in the storage pool with cached clients, and writes through :class:`temper.kube.Kube`
(metered, fenced by leader election, status only when it differs). A pass is triggered by watch
events (the run, a child, an alias edit) and by a timer at the next schedule time: no LISTs.

``TEMPER_CONTINUAL_OWNS_PHASE`` (default true): whether continual runs' phase/currentCycle are
written here (only once the one-shot reconciler skips them).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from temper.continual import actions
from temper.continual import cycle as cyc
from temper.continual.data_selection import Selection, StorageLister, select_new_objects
from temper.continual.metrics import continual_metrics, record
from temper.continual.promotion import (
    AdapterTarget,
    AliasState,
    PromotionError,
    adapter_folder,
    alias_configmap_name,
)
from temper.continual.replay import ReplayBuffer, ReplayError, count_jsonl_examples
from temper.continual.schedule import Clock, SystemClock
from temper.continual.spec import ContinualSpec, ContinualSpecError, parse_continual
from temper.kube import ADAPTER_PLURAL, RUN_PLURAL, status_changed
from temper.planner import Event
from temper.planner.plan import policy_refusal
from temper.storage import Storage, StorageError

if TYPE_CHECKING:
    from temper.handlers.runtime import Key, Runtime

log = logging.getLogger("temper.continual")
# phase/currentCycle of continual runs: ours only once the one-shot reconciler skips them.
OWN_SUMMARY = os.environ.get("TEMPER_CONTINUAL_OWNS_PHASE", "true") == "true"
CLOCK: Clock = SystemClock()  # tests may swap in a FakeClock when running handlers in-process
# A continual run with no schedule due still gets a pass this often (from the caches: no API call).
RESYNC_SECONDS = float(os.environ.get("TEMPER_CONTINUAL_INTERVAL_SECONDS", "300") or 300)
WAIT_SECONDS = 5.0  # e.g. the adapter to promote is not verified yet


class Retry(Exception):
    """Not yet: try this key again after ``delay`` seconds (not counted as a failure)."""

    def __init__(self, message: str, delay: float = WAIT_SECONDS) -> None:
        super().__init__(message)
        self.delay = delay


class Refused(Exception):
    """Nothing to retry until the object changes (its next watch event brings it back)."""


def is_continual(spec: Mapping[str, Any], **_: Any) -> bool:
    return bool(spec.get("continual"))


def _now() -> datetime:
    return CLOCK.now().astimezone(UTC)


def _event(type_: str, reason: str, message: str) -> Event:
    return Event("Warning" if type_ == "Warning" else "Normal", reason, message)


# -- the continual pass ----------------------------------------------------------------------------
async def reconcile_continual(rt: Runtime, key: Key) -> None:
    """One pass of the planner for one continual run, and the I/O it asks for."""
    run = rt.caches.runs.get(key)
    spec = (run or {}).get("spec") or {}
    if run is None or not is_continual(spec) or (run.get("metadata") or {}).get("deletionTimestamp"):
        return
    namespace, name = key
    status = run.get("status") or {}
    try:
        cspec = parse_continual(spec)
    except ContinualSpecError as exc:
        desired = actions.invalid_spec_status(status, str(exc), _now())
        if status_changed(desired, dict(status)):
            await rt.kube.emit(run, Event("Warning", "InvalidSpec", str(exc)))
        await rt.write_status(RUN_PLURAL, key, desired)
        return
    assert cspec is not None
    refusal = policy_refusal(run, rt.config)
    if refusal:  # no S3 call (selection, replay index) for a location the namespace may not use
        desired = actions.invalid_spec_status(status, refusal, _now(), reason="PolicyViolation")
        if status_changed(desired, dict(status)):
            await rt.kube.emit(run, Event("Warning", "PolicyViolation", refusal))
        await rt.write_status(RUN_PLURAL, key, desired)
        return
    now = _now()
    children = [
        rt.caches.runs[(namespace, child)]
        for child in sorted(rt.caches.children.get(key, ()))
        if (namespace, child) in rt.caches.runs
    ]
    plan = cyc.plan(run, cspec, children, now)
    storage_opts = dict(spec.get("storage") or {})
    for action in actions.finish_actions(plan, cspec):
        if isinstance(action, actions.Promotion):
            await promote(rt, namespace, name, action.alias, action.adapter, now=now)
        else:
            await _append_replay_async(rt, namespace, storage_opts, cspec, action)
    started = (
        await _start_cycle(rt, run, cspec, plan, storage_opts, now=now) if plan.start is not None else None
    )
    for child_name in [*plan.stop_children, *plan.delete_children]:
        await rt.kube.delete(RUN_PLURAL, namespace, child_name)
    for event in plan.events:
        await rt.kube.emit(run, _event(event.type, event.reason, event.message))
    record(
        continual_metrics(),
        namespace=namespace,
        run=name,
        forgetting=plan.forgetting,
        gate_failures=plan.gate_failures,
        generation=plan.generation,
    )
    await rt.write_status(RUN_PLURAL, key, plan.status_patch(started, summary=OWN_SUMMARY))
    await sync_adapter_aliases(rt, namespace)
    due = (plan.next_schedule_time - now).total_seconds() if plan.next_schedule_time else RESYNC_SECONDS
    rt.enqueue("continual", key, max(0.05, min(due, RESYNC_SECONDS)))


async def _start_cycle(
    rt: Runtime,
    run: dict[str, Any],
    cspec: ContinualSpec,
    plan: cyc.Plan,
    storage_opts: dict[str, Any],
    *,
    now: datetime,
) -> dict[str, Any] | None:
    """Create the cycle's child run; its status.cycles entry, or None when there is no new data."""
    start = plan.start
    assert start is not None
    namespace = str(run["metadata"].get("namespace", "default"))
    storage = await rt.storage.get(namespace, storage_opts)
    selection = await rt.storage.run(lambda: _select(run, cspec, start, storage))
    if selection.empty:
        await rt.kube.emit(run, Event("Normal", "NoNewData", f"cycle {start.cycle}: no new data"))
        return None
    buffer = await rt.storage.run(lambda: _load_replay(storage, cspec)) if cspec.replay.ratio > 0 else None
    promoted = (plan.promoted or {}).get("adapter")
    child = cyc.render_child(run, cspec, start, selection, buffer=buffer, promoted_adapter=promoted)
    child["spec"]["storage"] = actions.child_storage(storage_opts, start.cycle)
    child.setdefault("kind", "PostTrainingRun")
    child["metadata"].setdefault("namespace", namespace)
    await rt.kube.create(child)
    # Seen at once: the next pass (on this run's own status event) must find its child.
    rt.caches.put_run({**child, "metadata": {**child["metadata"], "resourceVersion": "0"}})
    if actions.advances_prefix_watermark(cspec):
        plan.book["prefix"] = selection.watermark.to_status()
    await rt.kube.emit(run, Event("Normal", "CycleStarted", f"cycle {start.cycle}: {start.trigger}"))
    return cyc.started_entry(start, selection, now)


def _select(
    run: Mapping[str, Any], cspec: ContinualSpec, start: cyc.StartCycle, storage: Storage
) -> Selection:
    """Blocking (the storage pool): this cycle's new data."""
    source = actions.selection_source(run, cspec, start)
    if isinstance(source, Selection):
        return source
    if isinstance(source, actions.TemplateSource):
        etag = None
        if source.uri.startswith("s3://"):
            head = storage.head(source.uri)
            if head is None:
                return actions.NOT_THERE_YET  # no new data this cycle
            etag = str(head.get("ETag", "")).strip('"') or None
        return source.finish(cspec, etag)
    assert cspec.new_data is not None
    listing = StorageLister(storage).list_objects(source.prefix)
    return select_new_objects(cspec.new_data, listing, source.since)


# -- replay buffer (blocking: the storage pool) -----------------------------------------------------
def _load_replay(storage: Storage, cspec: ContinualSpec) -> ReplayBuffer:
    index = cspec.replay.index_uri
    if index is None or not storage.exists(index):
        return ReplayBuffer()
    try:
        return ReplayBuffer.from_json(storage.get_bytes(index))
    except ReplayError as exc:
        raise Refused(f"spec.continual.replay.buffer.uri: {exc}") from None


def _count(storage: Storage, uri: str) -> int:
    builtin = actions.builtin_examples(uri)
    if builtin is not None:
        return builtin
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(io.BytesIO(storage.get_bytes(uri))).metadata.num_rows)
    return count_jsonl_examples(list(storage.iter_chunks(uri)))


async def _append_replay_async(
    rt: Runtime,
    namespace: str,
    storage_opts: dict[str, Any],
    cspec: ContinualSpec,
    append: actions.ReplayAppend,
) -> None:
    storage = await rt.storage.get(namespace, storage_opts)
    await rt.storage.run(lambda: _append_replay(storage, cspec, append))


def _append_replay(storage: Storage, cspec: ContinualSpec, append: actions.ReplayAppend) -> None:
    buffer = _load_replay(storage, cspec)
    try:
        segments = actions.replay_segments(append.cycle, append.datasets, lambda uri: _count(storage, uri))
    except StorageError as exc:
        raise Retry(f"replay buffer: {exc}", delay=30) from None
    buffer.append(segments, cspec.replay.max_examples, cspec.replay.sampling)
    storage.put_bytes(str(cspec.replay.index_uri), buffer.to_json().encode())


# -- promotion and rollback --------------------------------------------------------------------------
async def adapter_target(rt: Runtime, namespace: str, adapter_name: str) -> AdapterTarget:
    adapter = rt.caches.adapters.get((namespace, adapter_name))
    if adapter is None:
        raise Retry(f"adapter {adapter_name} not found yet")
    try:
        target = AdapterTarget.from_adapter(adapter)
    except PromotionError as exc:
        if (adapter.get("spec") or {}).get("lifecycle") == "retired":
            raise Refused(str(exc)) from None
        raise Retry(str(exc)) from None  # e.g. not verified yet
    try:
        storage = await rt.storage.get(namespace, (adapter.get("spec") or {}).get("artifact") or {})
        manifest, _ = await rt.storage.run(lambda: storage.read_manifest(target.manifest_uri))
        folder = adapter_folder(target.manifest_uri, [f.path for f in manifest.files])
        target = AdapterTarget(target.name, target.manifest_uri, target.base_model, folder, target.generation)
    except StorageError:
        pass  # the manifest folder is still a usable location
    return target


def _read_alias(rt: Runtime, namespace: str, run: str, alias: str) -> tuple[AliasState, bool]:
    cm = rt.caches.aliases.get((namespace, alias_configmap_name(run, alias)))
    if cm is None:
        return AliasState(alias, run), False
    return AliasState.from_configmap(cm), True


async def _write_alias(rt: Runtime, namespace: str, state: AliasState, exists: bool) -> None:
    body = state.configmap(namespace)
    body.setdefault("kind", "ConfigMap")
    body.setdefault("apiVersion", "v1")
    written = await rt.kube.write_configmap(body, exists)
    if written is not None:
        rt.caches.put_alias(written)


async def promote(
    rt: Runtime, namespace: str, run: str, alias: str, adapter_name: str, *, now: datetime
) -> None:
    target = await adapter_target(rt, namespace, adapter_name)
    state, exists = _read_alias(rt, namespace, run, alias)
    if state.promote(target, now=cyc.rfc3339(now)) or not exists:
        await _write_alias(rt, namespace, state, exists)


async def apply_alias_edit(rt: Runtime, key: Key) -> None:
    """A user set an alias ConfigMap's data.adapter: validate, re-render the alias, and point the
    run's status (and the Adapters' alias mirror) at it; refuse and restore otherwise."""
    cm = rt.caches.aliases.get(key)
    if cm is None:
        return
    namespace = key[0]
    state = AliasState.from_configmap(cm)
    wanted = state.edited_to(cm)
    if wanted is None:
        return
    # from_configmap read the edited data.adapter; restore the last recorded target first.
    recorded = state.history[-1] if state.history else None
    try:
        target = await adapter_target(rt, namespace, wanted)
        state.rollback(target, now=cyc.rfc3339(_now()))
    except (PromotionError, Refused, Retry) as exc:
        await rt.kube.emit(cm, Event("Warning", "RollbackRefused", str(exc)))
        if recorded is not None:  # put the alias back where it really points
            state.target = await adapter_target(rt, namespace, recorded.adapter)
            await _write_alias(rt, namespace, state, True)
        return
    await _write_alias(rt, namespace, state, True)
    await rt.kube.emit(cm, Event("Normal", "RolledBack", f"alias {state.alias} -> {wanted}"))
    run = rt.caches.runs.get((namespace, state.run))
    if run is None:
        return
    patch = actions.rolled_back_status(run.get("status") or {}, state.alias, wanted, _now())
    await rt.write_status(RUN_PLURAL, (namespace, state.run), patch)
    await sync_adapter_aliases(rt, namespace)


# -- Adapter.status.aliases mirror -------------------------------------------------------------------
async def sync_adapter_aliases(rt: Runtime, namespace: str) -> None:
    """Mirror the runs' status.aliases into each Adapter's status.aliases, from the caches;
    writes only for Adapters whose list changed."""
    runs = [r for r in rt.caches.runs_in(namespace) if is_continual(r.get("spec") or {})]
    mirror = actions.alias_mirror(runs)
    for (ns, name), aliases in actions.alias_mirror_patches(rt.caches.adapters_in(namespace), mirror):
        await rt.write_status(ADAPTER_PLURAL, (ns, name), {"aliases": aliases})
