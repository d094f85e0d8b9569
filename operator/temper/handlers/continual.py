"""kopf handlers for continual PostTrainingRuns: a timer runs the pure planner, then does its I/O.

Only runs with ``spec.continual`` come here (the one-shot reconciler must skip them; the
children ``<run>-g<N>`` it creates are ordinary one-shot runs). A periodic pass (started on
kopf startup) plans every continual run; the alias ConfigMaps are watched so that a user setting
``data.adapter`` back performs a validated rollback.

``TEMPER_CONTINUAL_INTERVAL_SECONDS`` (default 15): the pass interval (schedules have minute
resolution; children finishing and triggers are noticed within one interval).
``TEMPER_NAMESPACES`` (comma-separated, default all): where to look.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, cast

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from temper.api.contract import StorageConfig
from temper.continual import cycle as cyc
from temper.continual.data_selection import (
    Selection,
    StorageLister,
    Watermark,
    select_by_template,
    select_new_objects,
)
from temper.continual.metrics import continual_metrics, forget_run, record
from temper.continual.promotion import (
    ALIAS_LABEL,
    AdapterTarget,
    AliasState,
    PromotionError,
    adapter_folder,
    alias_configmap_name,
)
from temper.continual.replay import ReplayBuffer, ReplayError, Segment, count_jsonl_examples
from temper.continual.schedule import Clock, SystemClock
from temper.continual.spec import ContinualSpecError, parse_continual
from temper.kube import load_api_client, status_changed
from temper.storage import Credentials, Storage, StorageError

GROUP, VERSION, RUNS, ADAPTERS = "temper.dev", "v1alpha1", "posttrainingruns", "adapters"
log = logging.getLogger("temper.continual")
INTERVAL = float(os.environ.get("TEMPER_CONTINUAL_INTERVAL_SECONDS", "15") or 15)
# phase/currentCycle of continual runs: ours only once the one-shot reconciler skips them.
OWN_SUMMARY = os.environ.get("TEMPER_CONTINUAL_OWNS_PHASE", "true") == "true"
CLOCK: Clock = SystemClock()  # tests may swap in a FakeClock when running handlers in-process


def is_continual(spec: Mapping[str, Any], **_: Any) -> bool:
    return bool(spec.get("continual"))


# -- Kubernetes and storage access -------------------------------------------------------------------
@cache
def api_client() -> k8s.ApiClient:
    return load_api_client(pool_size=4)


def custom() -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(api_client())


def core() -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api_client())


def get_adapter(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = custom().get_namespaced_custom_object(GROUP, VERSION, namespace, ADAPTERS, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


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
        import base64

        secret = core().read_namespaced_secret(ref, namespace)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        credentials = Credentials.from_env(data)
        if credentials is None:
            raise kopf.PermanentError(f"secret {ref}: needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    from temper.storage import make_client

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


# -- the continual run -------------------------------------------------------------------------------
def _patch_status(
    namespace: str, name: str, desired: dict[str, Any], current: Mapping[str, Any] | None
) -> None:
    """Write only what differs: an idle continual run costs no API writes."""
    if status_changed(desired, dict(current or {})):
        custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, RUNS, name, {"status": desired}
        )


# A periodic pass instead of kopf timers: kopf would put its finalizer on every continual run.
# Reads only (one LIST per pass); writes happen only when something changed.
PERIODIC: list[Callable[[], None]] = []
_tasks: set[asyncio.Task[None]] = set()


def _namespaces() -> tuple[str, ...]:
    raw = os.environ.get("TEMPER_NAMESPACES", "")
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def list_objects(plural: str) -> list[dict[str, Any]]:
    namespaces = _namespaces()
    if not namespaces:
        return list(custom().list_cluster_custom_object(GROUP, VERSION, plural)["items"])
    items: list[dict[str, Any]] = []
    for ns in namespaces:
        items += custom().list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]
    return items


def reconcile_all_continual() -> None:
    for run in list_objects(RUNS):
        if not is_continual(run.get("spec") or {}) or (run.get("metadata") or {}).get("deletionTimestamp"):
            continue
        meta = run["metadata"]
        try:
            reconcile_continual(run)
        except kopf.TemporaryError as exc:  # e.g. the new adapter is not verified yet
            log.info("continual run %s/%s waits: %s", meta.get("namespace"), meta.get("name"), exc)
        except Exception:  # one bad run must not stop the others
            log.exception("continual run %s/%s", meta.get("namespace"), meta.get("name"))


async def _periodic() -> None:
    while True:
        for job in [reconcile_all_continual, *PERIODIC]:
            try:
                await asyncio.to_thread(job)
            except Exception:
                log.exception("periodic %s", job.__name__)
        await asyncio.sleep(INTERVAL)


@kopf.on.startup()
async def start_continual(**_: Any) -> None:
    task = asyncio.get_running_loop().create_task(_periodic())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def reconcile_continual(run: dict[str, Any]) -> None:
    """One pass of the planner for one continual run, and the I/O it asks for."""
    body = cast(kopf.Body, run)
    spec = run.get("spec") or {}
    namespace, name = str(run["metadata"].get("namespace", "default")), str(run["metadata"]["name"])
    status = run.get("status") or {}
    try:
        cspec = parse_continual(spec)
    except ContinualSpecError as exc:
        condition = {"type": "Stalled", "status": "True", "reason": "InvalidSpec", "message": str(exc)}
        desired = {"conditions": cyc.upsert_condition(status.get("conditions") or [], condition, _now())}
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

    for done in plan.finished:
        if done.promote and cspec.promote is not None and done.adapter:
            _promote(namespace, name, cspec.promote.alias, done.adapter, now)
        if done.succeeded and cspec.replay.uri and done.new_data:
            _append_replay(storage_for(storage_opts, namespace), cspec, done.cycle, done.new_data)

    started: dict[str, Any] | None = None
    if plan.start is not None:
        selection = _select(run, cspec, plan.start, storage_opts, namespace)
        if selection.empty:
            emit(body, "Normal", "NoNewData", f"cycle {plan.start.cycle}: no new data")
        else:
            buffer = (
                _load_replay(storage_for(storage_opts, namespace), cspec) if cspec.replay.ratio > 0 else None
            )
            promoted = (plan.promoted or {}).get("adapter")
            child = cyc.render_child(
                run, cspec, plan.start, selection, buffer=buffer, promoted_adapter=promoted
            )
            # Each cycle writes under its own storage prefix: children all run as cycle 1.
            child["spec"]["storage"] = {
                **storage_opts,
                "uri": f"{str(storage_opts.get('uri', '')).rstrip('/')}/cycles/{plan.start.cycle}/",
            }
            try:
                custom().create_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, child)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            started = cyc.started_entry(plan.start, selection, now)
            if cspec.new_data is not None and cspec.new_data.prefix is not None:
                plan.book["prefix"] = selection.watermark.to_status()
            emit(
                body,
                "Normal",
                reason="CycleStarted",
                message=f"cycle {plan.start.cycle}: {plan.start.trigger}",
            )

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


@kopf.on.event(GROUP, VERSION, RUNS)
def forget_continual(event: kopf.RawEvent, **_: Any) -> None:
    """A deleted continual run's series go, so label cardinality stays bounded."""
    obj = cast(dict[str, Any], event.get("object") or {})
    if event.get("type") != "DELETED" or not is_continual(obj.get("spec") or {}):
        return
    try:
        cspec = parse_continual(obj.get("spec") or {})
    except ContinualSpecError:
        cspec = None
    meta = obj.get("metadata") or {}
    suites = [g.suite for g in cspec.gates] if cspec else []
    forget_run(
        continual_metrics(),
        namespace=str(meta.get("namespace", "")),
        run=str(meta.get("name")),
        suites=suites,
    )


def _select(
    run: Mapping[str, Any], cspec: Any, start: cyc.StartCycle, storage_opts: dict[str, Any], namespace: str
) -> Selection:
    new_data = cspec.new_data
    name = str((run.get("metadata") or {}).get("name"))
    if new_data is None:
        return Selection((), ("(unchanged datasets)",))
    if new_data.uri_template is not None:
        tz_date = start.scheduled_time.astimezone(cspec.schedule.tz)
        probe = select_by_template(new_data, cycle_date=tz_date, cycle=start.cycle, run=name, etag=None)
        uri = probe.datasets[0].uri
        etag = None
        if uri.startswith("s3://"):
            head = storage_for(storage_opts, namespace).head(uri)
            if head is None:
                return Selection((), ())  # not there (yet): no new data this cycle
            etag = str(head.get("ETag", "")).strip('"') or None
        return select_by_template(new_data, cycle_date=tz_date, cycle=start.cycle, run=name, etag=etag)
    since = Watermark.from_status(((run.get("status") or {}).get("watermark") or {}).get("prefix"))
    listing = StorageLister(storage_for(storage_opts, namespace)).list_objects(new_data.prefix)
    return select_new_objects(new_data, listing, since)


# -- replay buffer -----------------------------------------------------------------------------------
def _load_replay(storage: Storage, cspec: Any) -> ReplayBuffer:
    index = cspec.replay.index_uri
    if index is None or not storage.exists(index):
        return ReplayBuffer()
    try:
        return ReplayBuffer.from_json(storage.get_bytes(index))
    except ReplayError as exc:
        raise kopf.PermanentError(f"spec.continual.replay.buffer.uri: {exc}") from None


def _count(storage: Storage, uri: str) -> int:
    if uri.startswith("builtin://"):
        from urllib.parse import parse_qs, urlparse

        return int(parse_qs(urlparse(uri).query).get("n", ["64"])[0])
    if uri.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        return int(pq.ParquetFile(io.BytesIO(storage.get_bytes(uri))).metadata.num_rows)
    return count_jsonl_examples(list(storage.iter_chunks(uri)))


def _append_replay(storage: Storage, cspec: Any, cycle: int, datasets: tuple[dict[str, Any], ...]) -> None:
    buffer = _load_replay(storage, cspec)
    try:
        segments = [
            Segment(
                cycle=cycle,
                name=str(d["name"]),
                uri=str(d["uri"]),
                examples=_count(storage, str(d["uri"])),
                format=d.get("format", "prompt-completion"),
                task=d.get("task"),
            )
            for d in datasets
        ]
    except StorageError as exc:
        raise kopf.TemporaryError(f"replay buffer: {exc}", delay=30) from None
    buffer.append(segments, cspec.replay.max_examples, cspec.replay.sampling)
    storage.put_bytes(str(cspec.replay.index_uri), buffer.to_json().encode())


# -- promotion and rollback --------------------------------------------------------------------------
def _target(namespace: str, adapter_name: str) -> AdapterTarget:
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


def _promote(namespace: str, run: str, alias: str, adapter_name: str, now: datetime) -> None:
    target = _target(namespace, adapter_name)
    state, exists = _read_alias(namespace, run, alias)
    if state.promote(target, now=cyc.rfc3339(now)) or not exists:
        _write_alias(namespace, state, exists)


@kopf.on.event("", "v1", "configmaps", labels={ALIAS_LABEL: kopf.PRESENT})
def rollback_alias(event: kopf.RawEvent, **_: Any) -> None:
    """A user set data.adapter: validate, re-render the alias, and point the run's status at it."""
    if event.get("type") == "DELETED":
        return
    cm = cast(dict[str, Any], dict(event["object"]))
    body = cast(kopf.Body, cm)
    namespace = str((cm.get("metadata") or {}).get("namespace", "default"))
    state = AliasState.from_configmap(cm)
    wanted = state.edited_to(cm)
    if wanted is None:
        return
    # from_configmap read the edited data.adapter; restore the last recorded target first.
    recorded = state.history[-1] if state.history else None
    try:
        target = _target(namespace, wanted)
        state.rollback(target, now=cyc.rfc3339(_now()))
    except (PromotionError, kopf.PermanentError) as exc:
        emit(body, "Warning", "RollbackRefused", str(exc))
        if recorded is not None:  # put the alias back where it really points
            previous = _target(namespace, recorded.adapter)
            state.target = previous
            _write_alias(namespace, state, True)
        return
    _write_alias(namespace, state, True)
    emit(body, "Normal", "RolledBack", f"alias {state.alias} -> {wanted}")
    run = get_run(namespace, state.run)
    if run is None:
        return
    status = run.get("status") or {}
    cycle = next((c.get("cycle") for c in status.get("cycles") or [] if c.get("adapter") == wanted), None)
    aliases = [a for a in status.get("aliases") or [] if a.get("name") != state.alias]
    aliases.append(
        {"name": state.alias, "adapter": wanted, "cycle": cycle, "promotedAt": cyc.rfc3339(_now())}
    )
    book = dict(status.get("watermark") or {})
    book.pop("baseline", None)  # the gates' baseline now comes from the rolled-back cycle's results
    custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, RUNS, state.run, {"status": {"aliases": aliases, "watermark": book}}
    )


def get_run(namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = custom().get_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj
