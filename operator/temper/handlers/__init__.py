"""kopf handlers: each feeds one watch event into the caches and enqueues the affected run.

Only ``on.event`` handlers are registered, so kopf writes nothing to the watched objects (no
progress annotations, no finalizers): an idle cluster sees zero writes from the operator.
"""

from __future__ import annotations

from typing import Any

import kopf

from temper import metrics
from temper.api.common import GROUP, VERSION
from temper.builders.names import LABEL_COMPONENT, LABEL_RUN
from temper.handlers.runtime import Runtime

_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def _rt() -> Runtime:
    if _runtime is None:
        raise RuntimeError("handlers used before temper.handlers.install()")
    return _runtime


def _deleted(event: kopf.RawEvent) -> bool:
    return event.get("type") == "DELETED"


@kopf.on.event(GROUP, VERSION, "posttrainingruns")
async def run_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    obj: dict[str, Any] = dict(event["object"])
    key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
    if _deleted(event):
        rt.forget_run(key)  # owner references let the garbage collector delete the Jobs
        return
    rt.caches.put_run(obj)
    rt.enqueue("run", key, urgent=not obj.get("status"))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})
async def job_event(event: kopf.RawEvent, **_: Any) -> None:
    rt = _rt()
    key = rt.caches.put_job(dict(event["object"]), deleted=_deleted(event))
    if key is not None:
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
        metrics.ADAPTER_TALLY.drop(key)
    else:
        rt.enqueue("adapter", key)
    if run is not None:
        rt.enqueue("run", run)


# Continual learning (periodic planner, alias rollback) and the Adapter lifecycle (retention
# finalizer, merge): registered on import; see docs/continual.md.
from temper.handlers import adapter_lifecycle, continual  # noqa: E402, F401
