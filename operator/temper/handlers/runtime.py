"""The reconcile loop: watch caches in, planner in the middle, apply layer out.

kopf delivers watch events (runs, Jobs, pods, Services, Adapters) into in-memory caches, and
every event enqueues the affected run. Workers take keys off a de-duplicating queue, so a burst
of events for one run costs one reconcile, and one key is never reconciled by two workers at once.
Reconciles read only the caches: the steady state costs no API reads and no writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from temper import adapters as adapter_ctl
from temper import metrics, reverify
from temper.api.common import GROUP, VERSION
from temper.api.contract import AdapterRef, StageProgress
from temper.builders.contract import PARENT_ADAPTER_ANNOTATION
from temper.builders.names import (
    ANNOTATION_RUN_NAME,
    JOB_NAME_LABEL,
    LABEL_RUN,
)
from temper.config import OperatorConfig
from temper.continual.cycle import PARENT_LABEL
from temper.handlers import adapter_lifecycle, continual_apply
from temper.handlers.storage_clients import StorageClients
from temper.kube import ADAPTER_PLURAL, RUN_PLURAL, Kube
from temper.planner import Event, Observed, ObservedAdapter, ObservedJob, Plan, RunningAttempt, plan
from temper.policy import raw_adapter_violations
from temper.storage import StorageError

log = logging.getLogger("temper.reconcile")

Key = tuple[str, str]  # (namespace, name)
# run: a run's reconcile (caches in, API writes out; never S3). The others may wait on S3, so
# they have their own lane: adapter (lifecycle, merge, verification), progress (polls),
# continual (a continual run's cycle), alias (a user's edit of an alias ConfigMap).
Kind = Literal["run", "adapter", "progress", "continual", "alias"]
Lane = Literal["api", "storage"]
STORAGE_KINDS = frozenset({"adapter", "progress", "continual", "alias"})
STALLED_RETRY_SECONDS = 30.0
RUN_API_VERSION = f"{GROUP}/{VERSION}"
ERROR_RETRY_SECONDS = (1.0, 60.0)


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def run_key_of(obj: dict[str, Any]) -> Key | None:
    meta = obj.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(ANNOTATION_RUN_NAME) or (meta.get("labels") or {}).get(
        LABEL_RUN
    )
    return (meta.get("namespace", ""), name) if name else None


def parent_of(run: dict[str, Any]) -> Key | None:
    """The continual run a cycle's child run belongs to."""
    meta = run.get("metadata") or {}
    parent = (meta.get("labels") or {}).get(PARENT_LABEL)
    return (meta.get("namespace", ""), parent) if parent else None


def slim(obj: dict[str, Any], keep_spec: tuple[str, ...] = ()) -> dict[str, Any]:
    """What the planner reads, nothing more: managedFields and pod templates (which carry the
    whole stage contract) would otherwise dominate the operator's memory at 1,000 runs."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    spec = obj.get("spec") or {}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": meta,
        "spec": {k: spec[k] for k in keep_spec if k in spec},
        "status": obj.get("status") or {},
    }


def _put(bucket: dict[str, dict[str, Any]], name: str, obj: dict[str, Any]) -> None:
    if _rv(obj) >= _rv(bucket.get(name, {})):
        bucket[name] = obj


def _discard(index: dict[Any, Any], key: Any, member: str) -> None:
    """Remove ``member`` from ``index[key]`` and the bucket itself once empty: caches shrink."""
    bucket = index.get(key)
    if bucket is None:
        return
    if isinstance(bucket, set):
        bucket.discard(member)
    else:
        bucket.pop(member, None)
    if not bucket:
        del index[key]


@dataclass
class Caches:
    runs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)  # run -> job name -> job
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)  # (ns, job) -> pod name -> pod
    services: dict[Key, set[str]] = field(default_factory=dict)  # run -> names
    adapters: dict[Key, dict[str, Any]] = field(default_factory=dict)
    adapters_by_run: dict[Key, set[str]] = field(default_factory=dict)
    children: dict[Key, set[str]] = field(default_factory=dict)  # continual run -> its cycles' runs
    aliases: dict[Key, dict[str, Any]] = field(default_factory=dict)  # alias ConfigMaps

    def put_run(self, run: dict[str, Any]) -> None:
        run = {
            "apiVersion": RUN_API_VERSION,
            "kind": "PostTrainingRun",  # LIST items carry no kind
            **run,
            "metadata": {k: v for k, v in (run.get("metadata") or {}).items() if k != "managedFields"},
        }
        key = _key(run)
        if _rv(run) >= _rv(self.runs.get(key, {})):
            self.runs[key] = run
        parent = parent_of(run)
        if parent is not None:
            self.children.setdefault(parent, set()).add(key[1])

    def put_job(self, job: dict[str, Any], deleted: bool = False) -> Key | None:
        job = slim(job, ("suspend",))
        key = run_key_of(job)
        if key is None:
            return None
        name = job["metadata"]["name"]
        if deleted:
            _discard(self.jobs, key, name)
            self.pods.pop((key[0], name), None)
        else:
            _put(self.jobs.setdefault(key, {}), name, job)
        return key

    def put_pod(self, pod: dict[str, Any], deleted: bool = False) -> Key | None:
        pod = slim(pod)
        meta = pod.get("metadata") or {}
        job = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
        if not job:
            return None
        where = (meta.get("namespace", ""), job)
        if deleted:
            _discard(self.pods, where, meta["name"])
        else:
            _put(self.pods.setdefault(where, {}), meta["name"], pod)
        return run_key_of(pod)

    def put_service(self, svc: dict[str, Any], deleted: bool = False) -> Key | None:
        key = run_key_of(svc)
        if key is not None:
            if deleted:
                _discard(self.services, key, svc["metadata"]["name"])
            else:
                self.services.setdefault(key, set()).add(svc["metadata"]["name"])
        return key

    def put_adapter(self, adapter: dict[str, Any], deleted: bool = False) -> Key | None:
        adapter = slim(
            adapter, ("artifact", "method", "lifecycle", "merge", "baseModel", "task", "retention")
        )
        adapter["apiVersion"], adapter["kind"] = RUN_API_VERSION, "Adapter"
        key = _key(adapter)
        run = run_key_of(adapter)
        if deleted:
            self.adapters.pop(key, None)
            if run is not None:
                _discard(self.adapters_by_run, run, key[1])
            return run
        if _rv(adapter) >= _rv(self.adapters.get(key, {})):
            self.adapters[key] = adapter
        if run is not None:
            self.adapters_by_run.setdefault(run, set()).add(key[1])
        return run

    def put_alias(self, cm: dict[str, Any], deleted: bool = False) -> Key:
        key = _key(cm)
        if deleted:
            self.aliases.pop(key, None)
        elif _rv(cm) >= _rv(self.aliases.get(key, {})):
            self.aliases[key] = slim(cm) | {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "data": cm.get("data") or {},
            }
        return key

    def drop_run(self, key: Key) -> None:
        run = self.runs.pop(key, None)
        for job in self.jobs.pop(key, {}):
            self.pods.pop((key[0], job), None)
        self.services.pop(key, None)
        self.adapters_by_run.pop(key, None)
        parent = parent_of(run) if run is not None else None
        if parent is not None:
            _discard(self.children, parent, key[1])

    def runs_in(self, namespace: str) -> list[dict[str, Any]]:
        return [r for (ns, _), r in self.runs.items() if ns == namespace]

    def adapters_in(self, namespace: str) -> list[dict[str, Any]]:
        return [a for (ns, _), a in self.adapters.items() if ns == namespace]


class Runtime:
    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self.caches = Caches()
        self.storage = StorageClients(kube, config)
        # Priority 0: runs never reconciled (apply -> first Job latency); 1: everything else.
        self.queues: dict[Lane, asyncio.PriorityQueue[tuple[int, int, tuple[Kind, Key]]]] = {
            "api": asyncio.PriorityQueue(),
            "storage": asyncio.PriorityQueue(),
        }
        self.seq = 0
        self.queued: set[tuple[Kind, Key]] = set()
        self.active: set[tuple[Kind, Key]] = set()
        self.dirty: set[tuple[Kind, Key]] = set()
        self.timers: dict[tuple[Kind, Key], asyncio.TimerHandle] = {}
        self.failures: dict[tuple[Kind, Key], int] = {}
        self.running: dict[Key, RunningAttempt] = {}
        self.progress: dict[Key, tuple[tuple[str, int], StageProgress]] = {}
        self.started = False
        self.workers: list[asyncio.Task[None]] = []
        # Ready Adapters: when each was last verified (monotonic), and those due at once
        # (a retention action deleted objects in their folder).
        self.verified_at: dict[Key, float] = {}
        self.recheck: set[Key] = set()

    # -- queue ------------------------------------------------------------------------------
    def enqueue(self, kind: Kind, key: Key, delay: float = 0.0, urgent: bool = False) -> None:
        item = (kind, key)
        if delay > 0:
            old = self.timers.get(item)
            due = asyncio.get_running_loop().time() + delay
            if old is not None and old.when() <= due:
                return  # an earlier wake-up is already scheduled
            if old is not None:
                old.cancel()
            self.timers[item] = asyncio.get_running_loop().call_later(delay, self._fire, item)
            return
        if item in self.active:
            self.dirty.add(item)
        elif item not in self.queued:
            self.queued.add(item)
            self.seq += 1
            lane: Lane = "storage" if kind in STORAGE_KINDS else "api"
            self.queues[lane].put_nowait((0 if urgent else 1, self.seq, item))

    def _fire(self, item: tuple[Kind, Key]) -> None:
        self.timers.pop(item, None)
        self.enqueue(*item)

    async def write_status(
        self,
        plural: str,
        key: Key,
        desired: dict[str, Any],
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        """The one status writer: patch what differs from the cached object, cache what the
        apiserver answered; the cached object afterwards (None if it is not cached)."""
        cache = self.caches.runs if plural == RUN_PLURAL else self.caches.adapters
        current = (cache.get(key) or {}).get("status")
        written = await self.kube.patch_status(
            plural, key[0], key[1], desired, current, resource_version=resource_version
        )
        if written is not None:
            (self.caches.put_run if plural == RUN_PLURAL else self.caches.put_adapter)(written)
        return cache.get(key)

    def forget(self, kinds: tuple[Kind, ...], key: Key) -> None:
        """Drop a deleted object's timers and failure counts: nothing outlives the object."""
        for kind in kinds:
            handle = self.timers.pop((kind, key), None)
            if handle is not None:
                handle.cancel()
            self.failures.pop((kind, key), None)

    def start(self) -> None:
        self.started = True
        self.workers = [asyncio.create_task(self._worker("api")) for _ in range(self.config.workers)]
        self.workers += [
            asyncio.create_task(self._worker("storage")) for _ in range(self.config.storage_workers)
        ]

    async def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        for handle in self.timers.values():
            handle.cancel()
        self.storage.close()

    async def _dispatch(self, kind: Kind, key: Key) -> None:
        if kind == "run":
            await self.reconcile_run(key)
        elif kind == "adapter":
            await self.reconcile_adapter(key)
        elif kind == "progress":
            await self.poll_progress(key)
        elif kind == "continual":
            await continual_apply.reconcile_continual(self, key)
        else:
            await continual_apply.apply_alias_edit(self, key)

    async def _worker(self, lane: Lane) -> None:
        queue = self.queues[lane]
        while True:
            _, _, item = await queue.get()
            self.queued.discard(item)
            self.active.add(item)
            kind, key = item
            try:
                await self._dispatch(kind, key)
                self.failures.pop(item, None)
            except asyncio.CancelledError:
                raise
            except continual_apply.Retry as exc:
                log.info("%s %s/%s waits: %s", kind, *key, exc)
                self.enqueue(kind, key, exc.delay)
            except continual_apply.Refused as exc:
                log.warning("%s %s/%s refused until it changes: %s", kind, *key, exc)
            except Exception as exc:
                n = self.failures.get(item, 0) + 1
                self.failures[item] = n
                delay = min(ERROR_RETRY_SECONDS[1], ERROR_RETRY_SECONDS[0] * 2 ** (n - 1))
                log.warning(
                    "%s %s/%s failed (%s: %s); retry in %.0fs", kind, *key, type(exc).__name__, exc, delay
                )
                self.enqueue(kind, key, delay)
            finally:
                self.active.discard(item)
                if item in self.dirty:
                    self.dirty.discard(item)
                    self.enqueue(kind, key)

    # -- runs -------------------------------------------------------------------------------
    def observe(self, key: Key, run: dict[str, Any]) -> Observed:
        ns = key[0]
        jobs = [
            ObservedJob.from_k8s(job, list(self.caches.pods.get((ns, name), {}).values()))
            for name, job in self.caches.jobs.get(key, {}).items()
        ]
        owned = {}
        for name in self.caches.adapters_by_run.get(key, set()):
            adapter = self.caches.adapters.get((ns, name))
            if adapter is not None:
                owned[name] = ObservedAdapter.from_k8s(adapter)
        # Adapters the run names but does not own: reward models, judges, merge sources, and the
        # promoted adapter a continual cycle continues from; same namespace only.
        annotations = (run.get("metadata") or {}).get("annotations") or {}
        names = [annotations.get(PARENT_ADAPTER_ANNOTATION)]
        for stage in (run.get("spec") or {}).get("stages") or []:
            names += [r.get("adapter") for r in stage.get("rewards") or []]
            names += [(x.get("judge") or {}).get("adapter") for x in stage.get("suites") or []]
            names += [m.get("adapter") for m in (stage.get("merge") or {}).get("sources") or []]
        external: dict[str, AdapterRef] = {}
        for name in filter(None, names):
            adapter = self.caches.adapters.get((ns, name))
            if adapter is not None and ObservedAdapter.from_k8s(adapter).ready == "True":
                external[name] = ObservedAdapter.from_k8s(adapter).ref()
        cached = self.progress.get(key)
        status = run.get("status") or {}
        return Observed(
            jobs=jobs,
            adapters=owned,
            services=self.caches.services.get(key, set()),
            progress=cached[1] if cached else None,
            progress_key=cached[0] if cached else None,
            external_adapters=external,
            cycle=int(status.get("currentCycle") or 1),
        )

    async def reconcile_run(self, key: Key) -> None:
        run = self.caches.runs.get(key)
        # A continual run is a template (like a CronJob): its cycles are child runs, planned by
        # temper.handlers.continual_apply; running its stages here would train on placeholder data.
        if run is None or (run.get("spec") or {}).get("continual"):
            return
        started = time.perf_counter()
        try:
            p = plan(run, self.observe(key, run), datetime.now(UTC), self.config)
            await self.apply(key, run, p)
        finally:
            metrics.RECONCILE_DURATION.labels("PostTrainingRun").observe(time.perf_counter() - started)

    async def apply(self, key: Key, run: dict[str, Any], p: Plan) -> None:
        ns, name = key
        for obj in p.create:
            created = await self.kube.create(obj)
            if obj["kind"] == "Job":
                self.caches.put_job(obj)  # seen at once: the next pass does not re-plan it
            elif obj["kind"] == "Adapter":
                self.caches.put_adapter(obj)
            elif obj["kind"] == "Service":
                self.caches.put_service(obj)
            if created:
                log.info("created %s %s/%s", obj["kind"], ns, obj["metadata"]["name"])
        for job_name in p.job_deletes:
            await self.kube.delete_job(ns, job_name)
        for job_name, patch in p.job_patches:
            await self.kube.patch_job(ns, job_name, patch)
            job = self.caches.jobs.get(key, {}).get(job_name)
            if job is not None:
                job.setdefault("spec", {}).update(patch["spec"])
        # Events go out before the status that records the transition: a crash in between
        # repeats an event on restart instead of losing it (at-least-once).
        for event in p.events:
            await self.kube.emit(run, event)
        # An eval stage's results go onto what it evaluated before the run says the stage is done.
        for adapter, evals in p.adapter_evals.items():
            await self.write_status(ADAPTER_PLURAL, (ns, adapter), {"evals": evals})
        if p.status:
            await self.write_status(RUN_PLURAL, key, p.status)
        metrics.set_drift(ns, name, (p.status or {}).get("stages") or [])
        for t in p.transitions:
            metrics.STAGE_DURATION.labels(t.stage_type, t.result).observe(t.duration_seconds)
            if t.result == "Failed":
                metrics.STAGE_FAILURES.labels(t.stage_type, t.reason or "Failed").inc()
        for stage_type in p.retries:
            metrics.STAGE_RETRIES.labels(stage_type).inc()
        for stage_type, reason in p.failed_attempts:
            metrics.STAGE_FAILURES.labels(stage_type, reason).inc()
        if p.status:
            metrics.RUN_TALLY.set(key, p.phase)
        if p.running is not None:
            first = key not in self.running
            self.running[key] = p.running
            progress = (p.status.get("progress") or {}) if p.status else {}
            metrics.set_progress(
                ns, name, float(progress.get("percent") or 0.0) / 100.0, progress.get("loss")
            )
            if first:
                self.enqueue("progress", key, min(self.config.progress_interval_seconds, 1.0))
        elif key in self.running:
            self.running.pop(key, None)
            self.progress.pop(key, None)
            metrics.set_progress(ns, name, None, None)
        if p.requeue_after is not None:
            self.enqueue("run", key, p.requeue_after + 0.05)
        conditions = {c["type"]: c for c in (p.status or {}).get("conditions", [])}
        if conditions.get("Stalled", {}).get("reason") == "UnresolvedReference":
            self.enqueue("run", key, STALLED_RETRY_SECONDS)

    def forget_run(self, key: Key) -> None:
        self.caches.drop_run(key)
        self.forget(("run", "progress", "continual"), key)
        self.running.pop(key, None)
        self.progress.pop(key, None)
        metrics.RUN_TALLY.drop(key)
        metrics.set_progress(key[0], key[1], None, None)
        metrics.set_drift(key[0], key[1], [])

    # -- progress ---------------------------------------------------------------------------
    async def poll_progress(self, key: Key) -> None:
        running = self.running.get(key)
        run = self.caches.runs.get(key)
        if running is None or run is None:
            return
        options = (run.get("spec") or {}).get("storage") or {}
        try:
            storage = await self.storage.get(key[0], options)
            raw = await self.storage.run(lambda: storage.get_bytes(running.progress_uri))
            progress: StageProgress | None = StageProgress.model_validate(json.loads(raw))
        except (StorageError, ValueError) as exc:
            self.storage.refused(key[0], options, str(exc))
            progress = None  # not written yet, or unreadable: keep the last known value
        except Exception as exc:  # e.g. no credentials, endpoint down: progress is best-effort
            log.debug("progress of %s/%s unreadable: %s", *key, type(exc).__name__)
            progress = None
        if progress is not None:
            stage_key = (running.stage, running.attempt)
            old = self.progress.get(key)
            if old is None or old != (stage_key, progress):
                self.progress[key] = (stage_key, progress)
                self.enqueue("run", key)
        if key in self.running:
            self.enqueue("progress", key, self.config.progress_interval_seconds)

    # -- adapters ---------------------------------------------------------------------------
    def adapter_policy(self, adapter: dict[str, Any]) -> list[str]:
        """The platform policy's storage rules for this Adapter (empty: it may be served)."""
        return raw_adapter_violations(adapter, self.config.policy, self.config.default_storage_secret)

    def recheck_touching(self, deleted: list[str]) -> None:
        """Re-verify at once every Ready Adapter with a file among ``deleted`` (any namespace)."""
        for key, adapter in list(self.caches.adapters.items()):
            if reverify.was_ready(adapter) and reverify.touches(adapter, deleted):
                self.recheck.add(key)
                self.enqueue("adapter", key)

    async def reconcile_adapter(self, key: Key) -> None:
        """Policy, then lifecycle (finalizer, retirement, merge), then verification when it is due."""
        adapter = self.caches.adapters.get(key)
        if adapter is None:
            return
        spec = adapter.get("spec") or {}
        status = adapter.get("status") or {}
        ready: dict[str, Any] = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        metrics.ADAPTER_TALLY.set(
            key, spec.get("lifecycle", "active"), str(ready.get("status") == "True").lower()
        )
        started = time.perf_counter()
        try:
            refusal = self.adapter_policy(adapter)
            winding_down = bool((adapter.get("metadata") or {}).get("deletionTimestamp"))
            if refusal and not winding_down and spec.get("lifecycle") != "retired":
                await self._refuse_adapter(key, adapter, refusal)
                return
            adapter = await adapter_lifecycle.reconcile(self, key, adapter)
            if adapter is None or refusal:
                return
            if adapter_ctl.needs_verification(adapter):
                await self._verify_adapter(key, adapter)
            elif reverify.was_ready(adapter):
                await self._reverify_adapter(key, adapter)
        finally:
            metrics.RECONCILE_DURATION.labels("Adapter").observe(time.perf_counter() - started)

    async def _refuse_adapter(self, key: Key, adapter: dict[str, Any], refusal: list[str]) -> None:
        """Stalled PolicyViolation, no S3 call: the Adapter names storage its namespace may not use."""
        message = f"platform policy: {'; '.join(refusal)}"
        generation = (adapter.get("metadata") or {}).get("generation")
        ready = {
            "type": "Ready",
            "status": "False",
            "reason": "PolicyViolation",
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        old: dict[str, Any] = next(
            (c for c in (adapter.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        if old.get("reason") == "PolicyViolation" and old.get("message") == message:
            return
        desired = {
            "observedGeneration": generation,
            "phase": "Failed",
            "conditions": adapter_ctl.kstatus_conditions(ready, "stalled"),
        }
        await self.write_status(ADAPTER_PLURAL, key, desired)
        await self.kube.emit(adapter, Event("Warning", "PolicyViolation", message))

    async def _verify_adapter(self, key: Key, adapter: dict[str, Any]) -> None:
        artifact = (adapter.get("spec") or {}).get("artifact") or {}
        storage = await self.storage.get(key[0], artifact)
        result = await self.storage.run(lambda: adapter_ctl.verify(adapter, storage))
        self.storage.refused(key[0], artifact, "; ".join(result.problems))
        desired = adapter_ctl.verification_status(adapter, result, adapter_ctl.now())
        await self.write_status(ADAPTER_PLURAL, key, desired)
        if adapter_ctl.retry_verification(adapter, desired["conditions"][0]["reason"]):
            self.enqueue("adapter", key, STALLED_RETRY_SECONDS)
        elif result.ok:
            self.verified_at[key] = time.monotonic()
            self._schedule_reverify(key, self.config.adapter_reverify_seconds)

    def _schedule_reverify(self, key: Key, delay: float) -> None:
        if self.config.adapter_reverify_seconds > 0:
            self.enqueue("adapter", key, max(delay, 0.05))

    async def _reverify_adapter(self, key: Key, adapter: dict[str, Any]) -> None:
        """A Ready Adapter: verify again when its interval is up (or a deletion touched it)."""
        interval = self.config.adapter_reverify_seconds
        now = time.monotonic()
        last = self.verified_at.get(key)
        if key not in self.recheck:
            if interval <= 0:
                return
            if last is None:  # not verified by this process: spread the first pass over an interval
                self.verified_at[key] = now - interval + reverify.first_delay(interval)
                self._schedule_reverify(key, self.verified_at[key] + interval - now)
                return
            if now - last < interval:
                self._schedule_reverify(key, last + interval - now)
                return
        self.recheck.discard(key)
        artifact = (adapter.get("spec") or {}).get("artifact") or {}
        storage = await self.storage.get(key[0], artifact)
        result = await self.storage.run(lambda: adapter_ctl.verify(adapter, storage))
        reason = reverify.lost_reason(adapter, result)
        if reason is None:
            self.verified_at[key] = time.monotonic()
            delay = STALLED_RETRY_SECONDS if not result.ok else interval
            self._schedule_reverify(key, delay)
            return
        self.verified_at.pop(key, None)
        desired = reverify.lost_status(
            adapter, result, reason, adapter_ctl.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        await self.write_status(ADAPTER_PLURAL, key, desired)
        await self.kube.emit(adapter, Event("Warning", reason, desired["conditions"][0]["message"]))

    def forget_adapter(self, key: Key) -> None:
        self.forget(("adapter",), key)
        self.verified_at.pop(key, None)
        self.recheck.discard(key)
        metrics.ADAPTER_TALLY.drop(key)
