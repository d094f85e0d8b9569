"""The continual apply layer: Kubernetes and S3 I/O around the pure continual planners.

``temper.continual.cycle`` plans a pass and ``temper.continual.actions`` turns the plan into
concrete writes; this module reads what they need (runs, children, Adapters, alias ConfigMaps,
storage listings and the replay index) and performs the writes they ask for. The kopf handlers
in ``temper.handlers.continual`` only call into here.

``TEMPER_CONTINUAL_OWNS_PHASE`` (default true): whether continual runs' phase/currentCycle are
written here (only once the one-shot reconciler skips them).
``TEMPER_NAMESPACES`` (comma-separated, default all): where to look.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from temper.api.contract import StorageConfig
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
from temper.kube import load_api_client, status_changed
from temper.storage import Credentials, Storage, StorageError, make_client

GROUP, VERSION, RUNS, ADAPTERS = "temper.dev", "v1alpha1", "posttrainingruns", "adapters"
log = logging.getLogger("temper.continual")
# phase/currentCycle of continual runs: ours only once the one-shot reconciler skips them.
OWN_SUMMARY = os.environ.get("TEMPER_CONTINUAL_OWNS_PHASE", "true") == "true"
CLOCK: Clock = SystemClock()  # tests may swap in a FakeClock when running handlers in-process


def is_continual(spec: Mapping[str, Any], **_: Any) -> bool:
    return bool(spec.get("continual"))


# -- Kubernetes and storage access ---------------------------------------------------------------
@cache
def api_client() -> k8s.ApiClient:
    return load_api_client(pool_size=4)


def custom() -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api_client())


def core() -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api_client())


def _get(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def get_adapter(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(ADAPTERS, namespace, name)


def get_run(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(RUNS, namespace, name)


def storage_for(options: Mapping[str, Any], namespace: str) -> Storage:
    """A Storage for an S3Options-shaped mapping (secretRef, endpointUrl, region, addressingStyle)."""
    config = StorageConfig.model_validate(
        {
            "endpointUrl": options.get("endpointUrl")
            or os.environ.get("TEMPER_DEFAULT_STORAGE_ENDPOINT")
            or None,
            "region": options.get("region") or "us-east-1",
            "addressingStyle": options.get("addressingStyle") or "path",
        }
    )
    credentials = None
    ref = (options.get("secretRef") or {}).get("name")
    if ref:
        secret = core().read_namespaced_secret(ref, namespace)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        credentials = Credentials.from_env(data)
        if credentials is None:
            raise kopf.PermanentError(f"secret {ref}: needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return Storage(config, make_client(config, credentials))


def emit(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event (best effort) from any thread: kopf's own poster needs its event loop context."""
    meta = obj.get("metadata") or {}
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "metadata": {
            "name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}",
            "namespace": meta.get("namespace"),
        },
        "involvedObject": {
            "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": obj.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": "temper-operator"},
        "reportingComponent": "temper-operator",
        "reportingInstance": os.environ.get("HOSTNAME", "temper-operator"),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        core().create_namespaced_event(meta.get("namespace"), body)
    except ApiException as exc:
        log.warning("event %s on %s not recorded: HTTP %s", reason, meta.get("name"), exc.status)


def _now() -> datetime:
    return CLOCK.now().astimezone(UTC)


# -- run status and listings -----------------------------------------------------------------------
def _patch_status(
    namespace: str, name: str, desired: dict[str, Any], current: Mapping[str, Any] | None
) -> None:
    """Write only what differs: an idle continual run costs no API writes."""
    if status_changed(desired, dict(current or {})):
        custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, RUNS, name, {"status": desired}
        )


def _namespaces() -> tuple[str, ...]:
    raw = os.environ.get("TEMPER_NAMESPACES", "")
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def list_objects(plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
    namespaces = (namespace,) if namespace else _namespaces()
    if not namespaces:
        return list(custom().list_cluster_custom_object(GROUP, VERSION, plural)["items"])
    items: list[dict[str, Any]] = []
    for ns in namespaces:
        items += custom().list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]
    return items


# -- the continual pass ----------------------------------------------------------------------------
def reconcile_all_continual() -> None:
    """One pass over every continual run, then the Adapter alias mirror."""
    runs = list_objects(RUNS)
    for run in runs:
        if not is_continual(run.get("spec") or {}) or (run.get("metadata") or {}).get("deletionTimestamp"):
            continue
        meta = run["metadata"]
        try:
            reconcile_continual(run)
        except kopf.TemporaryError as exc:  # e.g. the new adapter is not verified yet
            log.info("continual run %s/%s waits: %s", meta.get("namespace"), meta.get("name"), exc)
        except Exception:  # one bad run must not stop the others
            log.exception("continual run %s/%s", meta.get("namespace"), meta.get("name"))
    sync_adapter_aliases()


def reconcile_continual(run: dict[str, Any]) -> None:
    """One pass of the planner for one continual run, and the I/O it asks for."""
    body = cast(kopf.Body, run)
    spec = run.get("spec") or {}
    namespace, name = str(run["metadata"].get("namespace", "default")), str(run["metadata"]["name"])
    status = run.get("status") or {}
    try:
        cspec = parse_continual(spec)
    except ContinualSpecError as exc:
        desired = actions.invalid_spec_status(status, str(exc), _now())
        if status_changed(desired, dict(status)):
            emit(body, "Warning", "InvalidSpec", str(exc))
        _patch_status(namespace, name, desired, status)
        return
    assert cspec is not None
    now = _now()
    children = custom().list_namespaced_custom_object(
        GROUP, VERSION, namespace, RUNS, label_selector=f"{cyc.PARENT_LABEL}={name}"
    )["items"]
    plan = cyc.plan(run, cspec, children, now)
    storage_opts = dict(spec.get("storage") or {})

    for action in actions.finish_actions(plan, cspec):
        if isinstance(action, actions.Promotion):
            promote(namespace, name, action.alias, action.adapter, now)
        else:
            _append_replay(storage_for(storage_opts, namespace), cspec, action)

    started = _start_cycle(run, cspec, plan, storage_opts, now) if plan.start is not None else None

    for child_name in [*plan.stop_children, *plan.delete_children]:
        try:
            custom().delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                RUNS,
                child_name,
                body=k8s.V1DeleteOptions(propagation_policy="Background"),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    for event in plan.events:
        emit(body, event.type, event.reason, event.message)
    record(
        continual_metrics(),
        namespace=namespace,
        run=name,
        forgetting=plan.forgetting,
        gate_failures=plan.gate_failures,
        generation=plan.generation,
    )
    _patch_status(namespace, name, plan.status_patch(started, summary=OWN_SUMMARY), status)


def _start_cycle(
    run: dict[str, Any], cspec: ContinualSpec, plan: cyc.Plan, storage_opts: dict[str, Any], now: datetime
) -> dict[str, Any] | None:
    """Create the cycle's child run; its status.cycles entry, or None when there is no new data."""
    start = plan.start
    assert start is not None
    body = cast(kopf.Body, run)
    namespace = str(run["metadata"].get("namespace", "default"))
    selection = _select(run, cspec, start, storage_opts, namespace)
    if selection.empty:
        emit(body, "Normal", "NoNewData", f"cycle {start.cycle}: no new data")
        return None
    buffer = _load_replay(storage_for(storage_opts, namespace), cspec) if cspec.replay.ratio > 0 else None
    promoted = (plan.promoted or {}).get("adapter")
    child = cyc.render_child(run, cspec, start, selection, buffer=buffer, promoted_adapter=promoted)
    child["spec"]["storage"] = actions.child_storage(storage_opts, start.cycle)
    try:
        custom().create_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, child)
    except ApiException as exc:
        if exc.status != 409:
            raise
    if actions.advances_prefix_watermark(cspec):
        plan.book["prefix"] = selection.watermark.to_status()
    emit(body, "Normal", reason="CycleStarted", message=f"cycle {start.cycle}: {start.trigger}")
    return cyc.started_entry(start, selection, now)


def _select(
    run: Mapping[str, Any],
    cspec: ContinualSpec,
    start: cyc.StartCycle,
    storage_opts: dict[str, Any],
    namespace: str,
) -> Selection:
    source = actions.selection_source(run, cspec, start)
    if isinstance(source, Selection):
        return source
    if isinstance(source, actions.TemplateSource):
        etag = None
        if source.uri.startswith("s3://"):
            head = storage_for(storage_opts, namespace).head(source.uri)
            if head is None:
                return actions.NOT_THERE_YET  # no new data this cycle
            etag = str(head.get("ETag", "")).strip('"') or None
        return source.finish(cspec, etag)
    assert cspec.new_data is not None
    listing = StorageLister(storage_for(storage_opts, namespace)).list_objects(source.prefix)
    return select_new_objects(cspec.new_data, listing, source.since)


# -- replay buffer -----------------------------------------------------------------------------------
def _load_replay(storage: Storage, cspec: ContinualSpec) -> ReplayBuffer:
    index = cspec.replay.index_uri
    if index is None or not storage.exists(index):
        return ReplayBuffer()
    try:
        return ReplayBuffer.from_json(storage.get_bytes(index))
    except ReplayError as exc:
        raise kopf.PermanentError(f"spec.continual.replay.buffer.uri: {exc}") from None


def _count(storage: Storage, uri: str) -> int:
    builtin = actions.builtin_examples(uri)
    if builtin is not None:
        return builtin
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(io.BytesIO(storage.get_bytes(uri))).metadata.num_rows)
    return count_jsonl_examples(list(storage.iter_chunks(uri)))


def _append_replay(storage: Storage, cspec: ContinualSpec, append: actions.ReplayAppend) -> None:
    buffer = _load_replay(storage, cspec)
    try:
        segments = actions.replay_segments(append.cycle, append.datasets, lambda uri: _count(storage, uri))
    except StorageError as exc:
        raise kopf.TemporaryError(f"replay buffer: {exc}", delay=30) from None
    buffer.append(segments, cspec.replay.max_examples, cspec.replay.sampling)
    storage.put_bytes(str(cspec.replay.index_uri), buffer.to_json().encode())


# -- promotion and rollback --------------------------------------------------------------------------
def adapter_target(namespace: str, adapter_name: str) -> AdapterTarget:
    adapter = get_adapter(namespace, adapter_name)
    if adapter is None:
        raise kopf.TemporaryError(f"adapter {adapter_name} not found yet", delay=5)
    try:
        target = AdapterTarget.from_adapter(adapter)
    except PromotionError as exc:
        if (adapter.get("spec") or {}).get("lifecycle") == "retired":
            raise kopf.PermanentError(str(exc)) from None
        raise kopf.TemporaryError(str(exc), delay=5) from None  # e.g. not verified yet
    try:
        manifest, _ = storage_for(adapter["spec"]["artifact"], namespace).read_manifest(target.manifest_uri)
        folder = adapter_folder(target.manifest_uri, [f.path for f in manifest.files])
        target = AdapterTarget(target.name, target.manifest_uri, target.base_model, folder, target.generation)
    except StorageError:
        pass  # the manifest folder is still a usable location
    return target


def _read_alias(namespace: str, run: str, alias: str) -> tuple[AliasState, bool]:
    try:
        cm = core().read_namespaced_config_map(alias_configmap_name(run, alias), namespace)
    except ApiException as exc:
        if exc.status == 404:
            return AliasState(alias, run), False
        raise
    return AliasState.from_configmap(api_client().sanitize_for_serialization(cm)), True


def _write_alias(namespace: str, state: AliasState, exists: bool) -> None:
    body = state.configmap(namespace)
    if exists:
        core().replace_namespaced_config_map(body["metadata"]["name"], namespace, body)
    else:
        core().create_namespaced_config_map(namespace, body)


def promote(namespace: str, run: str, alias: str, adapter_name: str, now: datetime) -> None:
    target = adapter_target(namespace, adapter_name)
    state, exists = _read_alias(namespace, run, alias)
    if state.promote(target, now=cyc.rfc3339(now)) or not exists:
        _write_alias(namespace, state, exists)


def apply_alias_edit(cm: dict[str, Any]) -> None:
    """A user set an alias ConfigMap's data.adapter: validate, re-render the alias, and point the
    run's status (and the Adapters' alias mirror) at it; refuse and restore otherwise."""
    body = cast(kopf.Body, cm)
    namespace = str((cm.get("metadata") or {}).get("namespace", "default"))
    state = AliasState.from_configmap(cm)
    wanted = state.edited_to(cm)
    if wanted is None:
        return
    # from_configmap read the edited data.adapter; restore the last recorded target first.
    recorded = state.history[-1] if state.history else None
    try:
        target = adapter_target(namespace, wanted)
        state.rollback(target, now=cyc.rfc3339(_now()))
    except (PromotionError, kopf.PermanentError) as exc:
        emit(body, "Warning", "RollbackRefused", str(exc))
        if recorded is not None:  # put the alias back where it really points
            state.target = adapter_target(namespace, recorded.adapter)
            _write_alias(namespace, state, True)
        return
    _write_alias(namespace, state, True)
    emit(body, "Normal", "RolledBack", f"alias {state.alias} -> {wanted}")
    run = get_run(namespace, state.run)
    if run is None:
        return
    patch = actions.rolled_back_status(run.get("status") or {}, state.alias, wanted, _now())
    custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, RUNS, state.run, {"status": patch}
    )
    sync_adapter_aliases(namespace)


# -- Adapter.status.aliases mirror -------------------------------------------------------------------
def sync_adapter_aliases(namespace: str | None = None) -> None:
    """Mirror the runs' status.aliases into each Adapter's status.aliases: one LIST of runs and
    one of Adapters; writes only for Adapters whose list changed."""
    runs = [r for r in list_objects(RUNS, namespace) if is_continual(r.get("spec") or {})]
    mirror = actions.alias_mirror(runs)
    for (ns, name), aliases in actions.alias_mirror_patches(list_objects(ADAPTERS, namespace), mirror):
        try:
            custom().patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, ADAPTERS, name, {"status": {"aliases": aliases}}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to mirror
                raise
