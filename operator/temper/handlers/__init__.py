"""kopf handlers: each feeds one watch event into the caches and enqueues what it affects.

Runs, Jobs, pods, Services, Adapters and alias ConfigMaps all take this one path (caches, one
de-duplicating queue, ``temper.kube`` as the only writer): continual runs, merges, retention and
alias edits included (``continual_apply``, ``adapter_lifecycle``).

Only ``on.event`` handlers are registered, so kopf writes nothing to the watched objects (no
progress annotations, no finalizers): an idle cluster sees zero writes from the operator.
"""

from __future__ import annotations

from typing import Any

import kopf

from temper.api.common import GROUP, VERSION
from temper.builders.names import LABEL_COMPONENT, LABEL_RUN
from temper.continual.metrics import continual_metrics, forget_run
from temper.continual.promotion import ALIAS_LABEL
from temper.continual.spec import ContinualSpecError, parse_continual
from temper.handlers import adapter_lifecycle
from temper.handlers.continual_apply import is_continual
from temper.handlers.runtime import Runtime, parent_of
from temper.kube import connection_info

_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def _rt() -> Runtime:
    if _runtime is None:
        raise RuntimeError("handlers used before temper.handlers.install()")
    return _runtime


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf logs in as temper.kube does; its default would import the ``kubernetes`` client (50 MB)."""
    return connection_info()


def _deleted(event: kopf.RawEvent) -> bool:
    return event.get("type") == "DELETED"


@kopf.on.event(GROUP, VERSION, "posttrainingruns")
async def run_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    obj: dict[str, Any] = dict(event["object"])
    key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
    parent = parent_of(obj)
    continual = is_continual(obj.get("spec") or {})
    if _deleted(event):
        rt.forget_run(key)  # owner references let the garbage collector delete the Jobs
        if continual:
            forget_continual(obj)
    else:
        rt.caches.put_run(obj)
        if continual:
            rt.enqueue("continual", key)
        else:
            rt.enqueue("run", key, urgent=not obj.get("status"))
    if parent is not None:  # a cycle's run changed: its continual run may finish the cycle
        rt.enqueue("continual", parent)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def job_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    key = rt.caches.put_job(dict(event["object"]), deleted=_deleted(event))
    if key is None:
        return
    if key in rt.caches.adapters:  # a merge Job: its Adapter waits for it to publish
        rt.enqueue("adapter", key)
    else:
        rt.enqueue("run", key)


@kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT, LABEL_COMPONENT: "trainer"})
async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    key = rt.caches.put_pod(dict(event["object"]), deleted=_deleted(event))
    if key is not None:
        rt.enqueue("run", key)


@kopf.on.event("", "v1", "services", labels={LABEL_RUN: kopf.PRESENT, LABEL_COMPONENT: "trainer"})
async def service_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    key = rt.caches.put_service(dict(event["object"]), deleted=_deleted(event))
    if key is not None:
        rt.enqueue("run", key)


@kopf.on.event(GROUP, VERSION, "adapters")
async def adapter_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    obj: dict[str, Any] = dict(event["object"])
    deleted = _deleted(event)
    run = rt.caches.put_adapter(obj, deleted=deleted)
    key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
    if deleted:
        rt.forget_adapter(key)
    else:
        rt.enqueue("adapter", key)
    for merged in adapter_lifecycle.waiting_merges(rt, key):
        rt.enqueue("adapter", merged)
    if run is not None:
        rt.enqueue("run", run)


@kopf.on.event("", "v1", "configmaps", labels={ALIAS_LABEL: kopf.PRESENT})
async def alias_event(event: kopf.RawEvent, **_: Any) -> None:
    """A user may set an alias ConfigMap's data.adapter: a validated rollback."""
    rt = _rt()
    key = rt.caches.put_alias(dict(event["object"]), deleted=_deleted(event))
    if not _deleted(event):
        rt.enqueue("alias", key)


def forget_continual(obj: dict[str, Any]) -> None:
    """A deleted continual run's series go, so label cardinality stays bounded."""
    try:
        cspec = parse_continual(obj.get("spec") or {})
    except ContinualSpecError:
        cspec = None
    meta = obj.get("metadata") or {}
    forget_run(
        continual_metrics(),
        namespace=str(meta.get("namespace", "")),
        run=str(meta.get("name")),
        suites=[g.suite for g in cspec.gates] if cspec else [],
    )
