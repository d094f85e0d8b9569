"""The continual planner: spec.continual + status + observed cycle runs + now -> what to do.

A continual PostTrainingRun is a template, like a CronJob: each cycle N is a child
PostTrainingRun ``<run>-g<N>`` (labels ``temper.dev/continual-run``, ``temper.dev/cycle``; owned
by the parent) whose spec is the parent's without ``continual``, with the cycle's new data in
place of ``newData.dataset`` and the replay buffer's segments as ``data.replay`` of the stages
that train on it. The operator's ordinary reconciler runs it. When it succeeds, its eval stage's
suite results are gated against the promoted adapter's; passing promotes (if ``promote`` is set).

Cycles start at schedule times, or at once when the annotation ``temper.dev/trigger-cycle`` is
set to a new value (tests and "run now" use it; the concurrency policy still applies).

Status written on the parent (``temper.api.run.PostTrainingRunStatus``): ``cycles`` (bounded by
historyLimit), ``aliases``, ``currentCycle``, ``lastScheduleTime``, ``nextScheduleTime``,
``phase``, the ``GatesPassed`` condition, and the planner's bookkeeping in ``watermark``
(prefix watermark, last cycle number, last trigger, missed count, the promoted baseline).

Everything here is pure: :func:`plan` decides, :func:`render_child` builds the child object and
:meth:`Plan.status_patch` the status; the kopf handler does the I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from temper.builders.contract import PARENT_ADAPTER_ANNOTATION
from temper.continual.data_selection import Selection
from temper.continual.gates import GateReport, evaluate
from temper.continual.replay import ReplayBuffer, replay_seed
from temper.continual.schedule import decide
from temper.continual.spec import ContinualSpec

PARENT_LABEL = "temper.dev/continual-run"
CYCLE_LABEL = "temper.dev/cycle"
TRIGGER_ANNOTATION = "temper.dev/trigger-cycle"
SCHEDULED_ANNOTATION = "temper.dev/scheduled-time"
NEW_DATA_ANNOTATION = "temper.dev/new-datasets"
GATES_CONDITION = "GatesPassed"
TRAINING_TYPES = frozenset({"sft", "dpo", "grpo", "reward-model"})
RUNNING, SUCCEEDED, FAILED, REPLACED = "Running", "Succeeded", "Failed", "Replaced"


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def child_name(run: str, cycle: int) -> str:
    return f"{run}-g{cycle}"


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class StartCycle:
    cycle: int
    scheduled_time: datetime
    child_name: str
    trigger: str  # "schedule" or "trigger <annotation value>"


@dataclass(frozen=True)
class FinishedCycle:
    cycle: int
    child_name: str
    succeeded: bool
    adapter: str | None
    report: GateReport
    promote: bool
    new_data: tuple[dict[str, Any], ...]  # the child's new datasets, for the replay buffer


@dataclass
class Plan:
    start: StartCycle | None = None
    stop_children: list[str] = field(default_factory=list)  # Replace policy
    delete_children: list[str] = field(default_factory=list)  # fell out of the history
    finished: list[FinishedCycle] = field(default_factory=list)
    cycles: list[dict[str, Any]] = field(default_factory=list)
    book: dict[str, Any] = field(default_factory=dict)  # status.watermark
    aliases: list[dict[str, Any]] = field(default_factory=list)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    next_schedule_time: datetime | None = None
    last_schedule_time: str | None = None
    suspended: bool = False
    events: list[Event] = field(default_factory=list)
    forgetting: dict[str, float] = field(default_factory=dict)  # suite -> latest forgetting
    gate_failures: list[str] = field(default_factory=list)  # suites that failed this round
    history_limit: int = 10

    @property
    def promoted(self) -> dict[str, Any] | None:
        """The alias target after this round: {name, adapter, cycle, promotedAt}."""
        return self.aliases[0] if self.aliases else None

    @property
    def generation(self) -> int:
        """The promoted cycle number (0 before the first promotion)."""
        return int((self.promoted or {}).get("cycle") or 0)

    def status_patch(
        self, started: Mapping[str, Any] | None = None, *, summary: bool = True
    ) -> dict[str, Any]:
        """The parent's status; ``started``: the entry of the cycle the handler just created.

        ``summary=False`` leaves ``phase`` and ``currentCycle`` out, for as long as the one-shot
        reconciler also writes them on continual runs (two writers would ping-pong)."""
        cycles = list(self.cycles)
        book = dict(self.book)
        if started is not None:
            cycles.append(dict(started))
            book["lastCycle"] = int(started["cycle"])
        cycles = cycles[-self.history_limit :]
        running = [c for c in cycles if c.get("state") == RUNNING]
        phase = "Suspended" if self.suspended else ("Running" if running else "Waiting")
        patch: dict[str, Any] = {
            "cycles": cycles,
            "aliases": self.aliases,
            "conditions": self.conditions,
            "lastScheduleTime": self.last_schedule_time,
            "nextScheduleTime": rfc3339(self.next_schedule_time) if self.next_schedule_time else None,
            "watermark": book,
        }
        if summary:
            patch["phase"] = phase
            patch["currentCycle"] = int(running[-1]["cycle"]) if running else None
        return patch


def _child_state(child: Mapping[str, Any]) -> str:
    conditions = (child.get("status") or {}).get("conditions") or []
    by_type = {c.get("type"): c.get("status") for c in conditions}
    if by_type.get("Succeeded") == "True":
        return SUCCEEDED
    if by_type.get("Failed") == "True":
        return FAILED
    return RUNNING


def cycle_results(child: Mapping[str, Any]) -> tuple[str | None, dict[str, float]]:
    """The adapter a cycle produced (the one its eval stage evaluated) and its suite metrics."""
    spec_stages = {s.get("name"): s for s in (child.get("spec") or {}).get("stages") or []}
    status_stages = {s.get("name"): s for s in (child.get("status") or {}).get("stages") or []}
    metrics: dict[str, float] = {}
    adapter: str | None = None
    for name, stage in spec_stages.items():
        if stage.get("type") != "eval":
            continue
        for key, value in ((status_stages.get(name) or {}).get("metrics") or {}).items():
            if isinstance(value, int | float):
                metrics[str(key)] = float(value)
        source = stage.get("from")
        if isinstance(source, str) and (status_stages.get(source) or {}).get("adapter"):
            adapter = str(status_stages[source]["adapter"])
    if adapter is None:  # no eval stage: the last stage that published an adapter
        for name, stage in spec_stages.items():
            if stage.get("type") != "eval" and (status_stages.get(name) or {}).get("adapter"):
                adapter = str(status_stages[name]["adapter"])
    return adapter, metrics


def cycle_drift(child: Mapping[str, Any], adapter: str | None) -> dict[str, Any] | None:
    """The drift of the stage that produced the cycle's adapter (``status.stages[].drift``)."""
    for stage in (child.get("status") or {}).get("stages") or []:
        if adapter and stage.get("adapter") == adapter and stage.get("drift"):
            return dict(stage["drift"])
    return None


def child_new_data(child: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    names = set(
        filter(
            None,
            ((child.get("metadata") or {}).get("annotations") or {}).get(NEW_DATA_ANNOTATION, "").split(","),
        )
    )
    return tuple(d for d in (child.get("spec") or {}).get("datasets") or [] if d.get("name") in names)


def upsert_condition(
    conditions: Sequence[Mapping[str, Any]], new: Mapping[str, Any], now: datetime
) -> list[dict[str, Any]]:
    out = [dict(c) for c in conditions]
    for c in out:
        if c.get("type") == new["type"]:
            if c.get("status") != new["status"]:
                c["lastTransitionTime"] = rfc3339(now)
            c.update({k: v for k, v in new.items() if k != "lastTransitionTime"})
            return out
    out.append({**new, "lastTransitionTime": rfc3339(now)})
    return out


def _baseline(
    cycles: Sequence[Mapping[str, Any]], promoted: Mapping[str, Any] | None, book: Mapping[str, Any]
) -> dict[str, float] | None:
    """The promoted cycle's gate values; kept in the bookkeeping once its history entry is gone."""
    if not promoted:
        return None
    for c in cycles:
        if c.get("cycle") == promoted.get("cycle") and c.get("gateResults"):
            values = {
                f"suite/{g['suite']}/{g['metric']}": float(g["current"])
                for g in c["gateResults"]
                if g.get("current") is not None
            }
            if values:
                return values
    stored = book.get("baseline")
    return {str(k): float(v) for k, v in stored.items()} if stored else None


def plan(
    run: Mapping[str, Any], spec: ContinualSpec, children: Sequence[Mapping[str, Any]], now: datetime
) -> Plan:
    """Decide this round: finish cycles whose child ended, then maybe start the next one."""
    meta = run.get("metadata") or {}
    status = run.get("status") or {}
    name = str(meta.get("name"))
    book: dict[str, Any] = dict(status.get("watermark") or {})
    cycles = [dict(c) for c in status.get("cycles") or [] if "cycle" in c]
    known = {int(c["cycle"]) for c in cycles}
    kids: dict[int, Mapping[str, Any]] = {}
    for k in children:
        label = ((k.get("metadata") or {}).get("labels") or {}).get(CYCLE_LABEL, "")
        if str(label).isdigit():
            kids[int(label)] = k
    out = Plan(history_limit=spec.history_limit, suspended=bool((run.get("spec") or {}).get("suspend")))
    conditions = [dict(c) for c in status.get("conditions") or []]
    alias_name = spec.promote.alias if spec.promote else None
    aliases = [dict(a) for a in status.get("aliases") or []]
    promoted = next((a for a in aliases if a.get("name") == alias_name), None)

    # Adopt children created before their status entry landed (a crash between the two writes).
    for cycle, orphan in sorted(kids.items()):
        if cycle not in known and cycle > int(book.get("lastCycle", 0)) - spec.history_limit:
            annotations = (orphan.get("metadata") or {}).get("annotations") or {}
            cycles.append(
                {"cycle": cycle, "state": RUNNING, "scheduledTime": annotations.get(SCHEDULED_ANNOTATION)}
            )
            book["lastCycle"] = max(int(book.get("lastCycle", 0)), cycle)
    cycles.sort(key=lambda c: int(c["cycle"]))

    for entry in cycles:
        if entry.get("state") != RUNNING:
            continue
        cycle = int(entry["cycle"])
        kid = kids.get(cycle)
        cname = child_name(name, cycle)
        if kid is None:
            entry.update(state=FAILED, completionTime=rfc3339(now), message=f"cycle run {cname} was deleted")
            out.events.append(Event("Warning", "CycleFailed", f"cycle {cycle}: run {cname} was deleted"))
            continue
        state = _child_state(kid)
        if state == RUNNING:
            continue
        entry["completionTime"] = rfc3339(now)
        if state == FAILED:
            entry.update(state=FAILED, message=f"cycle run {cname} failed")
            out.events.append(Event("Warning", "CycleFailed", f"cycle {cycle}: run {cname} failed"))
            out.finished.append(FinishedCycle(cycle, cname, False, None, GateReport(()), False, ()))
            continue
        adapter, metrics = cycle_results(kid)
        report = evaluate(spec.gates, metrics, _baseline(cycles, promoted, book))
        entry.update(state=SUCCEEDED, adapter=adapter, gates=report.outcome)
        drift = cycle_drift(kid, adapter)
        if drift:
            entry["drift"] = drift
        entry["gateResults"] = [r.to_status() for r in report.results]
        for result in report.results:
            if result.forgetting is not None:
                out.forgetting[result.suite] = result.forgetting
            if not result.passed:
                out.gate_failures.append(result.suite)
        promote = (
            spec.promote is not None
            and adapter is not None
            and (report.passed or not spec.promote.require_gates)
        )
        entry["promoted"] = promote
        if report.results:
            message = f"cycle {cycle} ({adapter}): {report.message()}"
            if not promote and spec.promote is not None:
                current = (promoted or {}).get("adapter") or "nothing"
                message += f"; promotion blocked, {spec.promote.alias} stays at {current}"
            entry["message"] = message
            ok = report.passed
            conditions = upsert_condition(
                conditions,
                {
                    "type": GATES_CONDITION,
                    "status": "True" if ok else "False",
                    "reason": "GatesPassed" if ok else "GateFailed",
                    "message": message,
                    "observedGeneration": meta.get("generation"),
                },
                now,
            )
            out.events.append(
                Event("Normal" if ok else "Warning", "GatesPassed" if ok else "GateFailed", message)
            )
        if promote and alias_name is not None and adapter is not None:
            promoted = {"name": alias_name, "adapter": adapter, "cycle": cycle, "promotedAt": rfc3339(now)}
            aliases = [a for a in aliases if a.get("name") != alias_name] + [promoted]
            book["baseline"] = {k: round(v, 6) for k, v in metrics.items() if k.startswith("suite/")}
            out.events.append(Event("Normal", "Promoted", f"cycle {cycle}: alias {alias_name} -> {adapter}"))
        out.finished.append(FinishedCycle(cycle, cname, True, adapter, report, promote, child_new_data(kid)))

    # Schedule: cron first, then the manual trigger.
    active = [c for c in cycles if c.get("state") == RUNNING]
    last_scheduled = parse_time(status.get("lastScheduleTime"))
    decision = decide(
        spec.schedule,
        now=now,
        last_scheduled=last_scheduled,
        created=parse_time(meta.get("creationTimestamp")) or now,
        active_cycles=len(active),
        policy=spec.concurrency_policy,
        starting_deadline_seconds=spec.starting_deadline_seconds,
        suspended=out.suspended,
    )
    out.next_schedule_time = None if out.suspended else decision.next_time
    out.last_schedule_time = status.get("lastScheduleTime")
    if decision.missed:
        book["missedSchedules"] = int(book.get("missedSchedules", 0)) + decision.missed
        out.events.append(
            Event(
                "Warning",
                "MissedSchedule",
                f"{decision.missed} scheduled cycle(s) missed ({decision.reason})",
            )
        )
    if decision.start is not None:
        out.last_schedule_time = rfc3339(decision.start)
    elif decision.reason == "MissedDeadline":
        out.last_schedule_time = rfc3339(now)  # consumed: never start those late
    start_time, trigger = decision.start, "schedule"
    wanted = (meta.get("annotations") or {}).get(TRIGGER_ANNOTATION)
    if start_time is None and wanted and wanted != book.get("lastTrigger") and not out.suspended:
        if active and spec.concurrency_policy == "Forbid":
            out.events.append(
                Event("Normal", "TriggerWaiting", f"trigger {wanted!r} waits for the running cycle (Forbid)")
            )
        else:
            start_time, trigger = now, f"trigger {wanted}"
    if wanted and start_time is not None:
        book["lastTrigger"] = wanted  # a due schedule also satisfies a pending trigger
    if start_time is not None:
        if active and spec.concurrency_policy == "Replace":
            for c in active:
                out.stop_children.append(child_name(name, int(c["cycle"])))
                c.update(
                    state=REPLACED, completionTime=rfc3339(now), message="replaced by a newer cycle (Replace)"
                )
        cycle = max([int(book.get("lastCycle", 0)), *(int(c["cycle"]) for c in cycles)]) + 1
        out.start = StartCycle(cycle, start_time, child_name(name, cycle), trigger)

    # History bound: finished cycles beyond historyLimit (counting the one about to start) go.
    room = spec.history_limit - (1 if out.start else 0)
    running = [c for c in cycles if c.get("state") == RUNNING]
    done = [c for c in cycles if c.get("state") != RUNNING]
    budget = max(room - len(running), 0)
    dropped = done[: max(len(done) - budget, 0)]
    out.cycles = sorted(running + done[len(dropped) :], key=lambda c: int(c["cycle"]))
    # Every child outside the kept history goes (the catalog's Adapters stay: they have no owner).
    kept = {int(c["cycle"]) for c in out.cycles}
    out.delete_children = [child_name(name, n) for n in sorted(kids) if n not in kept]
    out.book = book
    out.aliases = aliases
    out.conditions = conditions
    return out


def started_entry(start: StartCycle, selection: Selection, now: datetime) -> dict[str, Any]:
    """The status.cycles entry of a cycle the handler has just created."""
    return {
        "cycle": start.cycle,
        "state": RUNNING,
        "scheduledTime": rfc3339(start.scheduled_time),
        "startTime": rfc3339(now),
        "dataVersions": list(selection.versions),
        "message": f"started by {start.trigger}",
    }


def render_child(
    run: Mapping[str, Any],
    spec: ContinualSpec,
    start: StartCycle,
    selection: Selection,
    *,
    buffer: ReplayBuffer | None,
    promoted_adapter: str | None,
) -> dict[str, Any]:
    """The cycle's PostTrainingRun: the parent's spec with new data and replay rendered in."""
    meta = run.get("metadata") or {}
    child_spec = copy.deepcopy(dict(run.get("spec") or {}))
    child_spec.pop("continual", None)
    child_spec["suspend"] = False
    datasets: list[dict[str, Any]] = list(child_spec.get("datasets") or [])
    new_names: list[str] = []
    if spec.new_data is not None:
        template = next((d for d in datasets if d.get("name") == spec.new_data.dataset), {})
        datasets = [d for d in datasets if d.get("name") != spec.new_data.dataset]
        for ds in selection.datasets:
            # Only name and uri change: format, task and the rest come from the parent's entry.
            datasets.append({**template, "name": ds.name, "uri": ds.uri})
            new_names.append(ds.name)
    replay_names: list[str] = []
    if buffer is not None and spec.replay.ratio > 0:
        for seg in buffer.segments:
            rname = f"replay-c{seg.cycle}-{seg.name}"[:63].rstrip("-")
            datasets.append({"name": rname, "uri": seg.uri, "format": seg.format, "task": seg.task_key})
            replay_names.append(rname)
    child_spec["datasets"] = datasets
    stages: list[dict[str, Any]] = []
    for original in child_spec.get("stages") or []:
        stage = dict(original)
        data = dict(stage.get("data") or {})
        train = list(data.get("train") or [])
        if spec.new_data is not None and spec.new_data.dataset in train:
            at = train.index(spec.new_data.dataset)
            train[at : at + 1] = new_names
            data["train"] = train
            if replay_names:
                data["replay"] = {
                    "ratio": spec.replay.ratio,
                    "datasets": replay_names,
                    "sampling": spec.replay.sampling,
                    **({"maxExamples": spec.replay.max_examples} if spec.replay.max_examples else {}),
                    "seed": replay_seed(str(meta.get("name", "")), start.cycle),  # reproducible mixes
                }
            stage["data"] = data
        stages.append(stage)
    child_spec["stages"] = stages
    annotations = {
        SCHEDULED_ANNOTATION: rfc3339(start.scheduled_time),
        NEW_DATA_ANNOTATION: ",".join(new_names),
    }
    if promoted_adapter:
        annotations[PARENT_ADAPTER_ANNOTATION] = promoted_adapter
    owner = {
        "apiVersion": run.get("apiVersion", "temper.dev/v1alpha1"),
        "kind": run.get("kind", "PostTrainingRun"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {
        "apiVersion": run.get("apiVersion", "temper.dev/v1alpha1"),
        "kind": run.get("kind", "PostTrainingRun"),
        "metadata": {
            "name": start.child_name,
            "namespace": meta.get("namespace"),
            "labels": {PARENT_LABEL: str(meta.get("name")), CYCLE_LABEL: str(start.cycle)},
            "annotations": annotations,
            "ownerReferences": [owner],
        },
        "spec": child_spec,
    }
