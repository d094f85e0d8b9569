"""kopf handlers for continual PostTrainingRuns; the work is in ``temper.handlers.continual_apply``.

Only runs with ``spec.continual`` come here (the one-shot reconciler must skip them; the
children ``<run>-g<N>`` it creates are ordinary one-shot runs). A periodic pass (started on
kopf startup) plans every continual run; the alias ConfigMaps are watched so that a user setting
``data.adapter`` back performs a validated rollback.

``TEMPER_CONTINUAL_INTERVAL_SECONDS`` (default 15): the pass interval (schedules have minute
resolution; children finishing and triggers are noticed within one interval).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, cast

import kopf

from temper.continual.metrics import continual_metrics, forget_run
from temper.continual.promotion import ALIAS_LABEL
from temper.continual.spec import ContinualSpecError, parse_continual

# Re-exported: temper.handlers.adapter_lifecycle shares the continual apply layer's clients.
from temper.handlers.continual_apply import (
    ADAPTERS,
    GROUP,
    RUNS,
    VERSION,
    _now,
    api_client,
    apply_alias_edit,
    custom,
    emit,
    get_adapter,
    is_continual,
    list_objects,
    log,
    reconcile_all_continual,
    storage_for,
)

__all__ = [
    "ADAPTERS",
    "GROUP",
    "PERIODIC",
    "VERSION",
    "_now",
    "api_client",
    "custom",
    "emit",
    "get_adapter",
    "list_objects",
    "log",
    "storage_for",
]

INTERVAL = float(os.environ.get("TEMPER_CONTINUAL_INTERVAL_SECONDS", "15") or 15)
# A periodic pass instead of kopf timers: kopf would put its finalizer on every continual run.
# Reads only (a few LISTs per pass); writes happen only when something changed.
PERIODIC: list[Callable[[], None]] = []
_tasks: set[asyncio.Task[None]] = set()


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
    suites = [g.suite for g in cspec.gates] if cspec else []
    meta = obj.get("metadata") or {}
    forget_run(
        continual_metrics(),
        namespace=str(meta.get("namespace", "")),
        run=str(meta.get("name")),
        suites=suites,
    )


@kopf.on.event("", "v1", "configmaps", labels={ALIAS_LABEL: kopf.PRESENT})
def rollback_alias(event: kopf.RawEvent, **_: Any) -> None:
    """A user set data.adapter: validate, re-render the alias, and point the run's status at it."""
    if event.get("type") != "DELETED":
        apply_alias_edit(cast(dict[str, Any], dict(event["object"])))
