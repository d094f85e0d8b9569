"""``plan(run, observed, now) -> Plan``: the whole decision of one reconcile, with no I/O.

Everything in the status is re-derived from observed children (Jobs, their pods' termination
messages, Adapters), so a status write lost to a crash is simply recomputed on the next pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from temper.api import common
from temper.api.contract import AdapterRef, StageProgress
from temper.api.run import PostTrainingRun, Stage
from temper.builders import (
    UnresolvedReference,
    build_adapter,
    build_job,
    build_service,
    spec_hash,
    stage_contract,
)
from temper.builders.names import adapter_name, manifest_uri, output_prefix, progress_uri, service_name
from temper.config import OperatorConfig
from temper.planner.observed import Observed, ObservedJob, format_time

EventType = Literal["Normal", "Warning"]
OWNED_CONDITIONS = (*common.CONDITION_TYPES, "SpecChangePending")
# Adapter Ready=False reasons that are not a verdict on the artifact: verification has not run
# yet, or storage could not be read (the Adapter controller retries those), so the stage waits.
NOT_A_VERDICT = frozenset({"", "Verifying", "Pending", "ReadError"})
UNREACHABLE_MARKERS = (
    "Could not connect to the endpoint URL",
    "EndpointConnectionError",
    "ConnectTimeoutError",
)
NON_RETRYABLE_REASONS = ("PodFailurePolicy",)  # FailJob from the trainer's non-retryable exit codes


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class StageTransition:
    """A stage attempt that ended, for metrics."""

    stage_type: str
    result: Literal["Succeeded", "Failed"]
    duration_seconds: float
    reason: str = ""


@dataclass(frozen=True)
class RunningAttempt:
    stage: str
    attempt: int
    progress_uri: str


@dataclass
class Plan:
    create: list[dict[str, Any]] = field(default_factory=list)  # in order: Services, Jobs, Adapters
    job_patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # our fields of .status, complete
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    running: RunningAttempt | None = None
    transitions: list[StageTransition] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)  # stage types of new retry attempts
    failed_attempts: list[tuple[str, str]] = field(default_factory=list)  # (stage type, reason) retried
    phase: str = "Pending"


@dataclass
class _StageView:
    stage: Stage
    state: str = "Pending"
    job: str | None = None
    attempts: int = 0
    start: datetime | None = None
    completion: datetime | None = None
    adapter: str | None = None
    manifest: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    message: str | None = None
    output: AdapterRef | None = None
    cause: str | None = None  # why the stage failed, as a condition reason, when it is plain
    topology: dict[str, Any] | None = None  # what the latest finished attempt ran on

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.stage.name, "state": self.state, "attempts": self.attempts}
        for key, value in (
            ("job", self.job),
            ("startTime", format_time(self.start)),
            ("completionTime", format_time(self.completion)),
            ("adapter", self.adapter),
            ("manifestUri", self.manifest),
            ("message", self.message),
        ):
            if value is not None:
                out[key] = value
        out["metrics"] = dict(self.metrics)
        if self.topology:
            out["topology"] = dict(self.topology)
        return out


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _condition(  # noqa: PLR0917 - one tuple per condition reads best at the call sites
    prev: dict[str, dict[str, Any]],
    ctype: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> dict[str, Any]:
    old = prev.get(ctype)
    changed = old is None or old.get("status") != status
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": format_time(now) if changed else old.get("lastTransitionTime") if old else None,
    }


RunOutcome = Literal["progressing", "succeeded", "failed", "stalled", "suspended"]


def _run_conditions(
    outcome: RunOutcome, reason: str, msg: str, stalled_reason: str | None = None
) -> list[tuple[str, str, str, str]]:
    """The six kstatus/temper conditions (type, status, reason, message) of a run in one outcome.

    Ready, Succeeded and Reconciling always carry the message; the others only while True.
    ``stalled_reason`` names the root cause on Stalled where it is more precise than ``reason``.
    """
    done = outcome == "succeeded"
    failed = outcome == "failed"
    return [
        (common.READY, "True" if done else "False", reason, msg),
        (
            common.SUCCEEDED,
            "True" if done else "False" if failed else "Unknown",
            "AllStagesSucceeded" if done else reason,
            msg,
        ),
        (
            common.FAILED,
            "True" if failed else "False",
            "AllStagesSucceeded" if done else reason,
            msg if failed or reason == "InvalidSpec" else "",
        ),
        (
            common.SUSPENDED,
            *(("True", reason, msg) if outcome == "suspended" else ("False", "NotSuspended", "")),
        ),
        (common.RECONCILING, "True" if outcome == "progressing" else "False", reason, msg),
        (
            common.STALLED,
            "True" if failed or outcome == "stalled" else "False",
            stalled_reason or reason,
            msg if failed or outcome == "stalled" else "",
        ),
    ]


def _blocked_reason(job: ObservedJob) -> str:
    """The run's Stalled reason for a trainer pod stuck waiting: the root cause where it is plain."""
    text = job.waiting_message.lower()
    if job.waiting_reason == "CreateContainerConfigError" and "secret" in text and "not found" in text:
        return "SecretNotFound"
    return job.waiting_reason


def _pod_detail(job: ObservedJob) -> str:
    """Why the attempt's pod could not start ("" when it did), for messages."""
    if not job.waiting_reason:
        return ""
    return f"pod {job.waiting_reason}" + (f": {job.waiting_message}" if job.waiting_message else "")


def _failure_cause(job: ObservedJob) -> str | None:
    """A failed attempt's root cause as a condition reason, from what its pod reported."""
    if job.waiting_reason:
        return _blocked_reason(job)
    error = job.result.error if job.result is not None else None
    if not error:
        return None
    if error.startswith("InvalidInput: baseModel"):
        return "BaseModelNotFound"
    # botocore's connection errors, wrapped in the trainer's StorageError or not, after its retries
    if any(marker in error for marker in UNREACHABLE_MARKERS):
        return "StorageUnreachable"
    if error.startswith("storage:"):
        return "StorageError"
    return None


def backoff_seconds(base: int, attempt: int, cap: int) -> float:
    """Delay before attempt ``attempt + 1``: base, 2*base, 4*base ... capped."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


def plan(run_obj: dict[str, Any], observed: Observed, now: datetime, config: OperatorConfig) -> Plan:
    meta = run_obj.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    prev_status = run_obj.get("status") or {}
    prev_conditions = {c["type"]: c for c in prev_status.get("conditions") or [] if "type" in c}
    out = Plan()
    foreign = [c for t, c in prev_conditions.items() if t not in OWNED_CONDITIONS]

    def finish(
        phase: str,
        conds: list[tuple[str, str, str, str]],
        stages: list[dict[str, Any]] | None,
        progress: dict[str, Any] | None,
    ) -> Plan:
        out.phase = phase
        conditions = [_condition(prev_conditions, t, s, r, m, generation, now) for t, s, r, m in conds]
        out.status = {
            "observedGeneration": generation,
            "phase": phase,
            "conditions": conditions + foreign,
            "stages": stages if stages is not None else prev_status.get("stages", []),
            "progress": progress,
            "currentCycle": observed.cycle,
        }
        if phase != prev_status.get("phase") and phase in ("Succeeded", "Failed", "Suspended"):
            kind: EventType = "Warning" if phase == "Failed" else "Normal"
            message = next((m for t, s, _, m in conds if t == common.READY), "")
            out.events.append(Event(kind, f"Run{phase}", message))
        elif prev_status.get("phase") == "Suspended" and phase != "Suspended":
            out.events.append(Event("Normal", "RunResumed", "run resumed"))
        return out

    if meta.get("deletionTimestamp"):
        return out  # garbage collection deletes the Jobs; nothing to write
    try:
        run = PostTrainingRun.model_validate({"metadata": meta, "spec": run_obj.get("spec") or {}})
    except ValidationError as exc:
        message = f"invalid spec: {_validation_message(exc)}"
        if prev_conditions.get(common.STALLED, {}).get("message") != message:
            out.events.append(Event("Warning", "InvalidSpec", message))
        return finish("Pending", _run_conditions("stalled", "InvalidSpec", message), None, None)

    spec = run.spec
    cycle = observed.cycle
    name = meta["name"]
    uid = meta.get("uid", "")
    suspend = spec.suspend
    jobs_by_stage: dict[str, list[ObservedJob]] = {}
    for seen in observed.jobs:
        if seen.cycle == cycle:
            jobs_by_stage.setdefault(seen.stage, []).append(seen)
    prev_stages = {s.get("name"): s for s in prev_status.get("stages") or []}
    views: list[_StageView] = []
    outputs: dict[str, AdapterRef] = {}
    blocked_by: str | None = None  # first stage not Succeeded: later stages wait
    failed: _StageView | None = None
    stalled: str | None = None
    blocked: tuple[str, str] | None = None  # (reason, message) of a trainer pod that cannot start
    drift: list[str] = []
    running_view: _StageView | None = None
    requeue: list[float] = []

    for stage in spec.stages:
        view = _StageView(stage)
        views.append(view)
        prev = prev_stages.get(stage.name) or {}
        view.metrics = dict(prev.get("metrics") or {})
        jobs = sorted(jobs_by_stage.get(stage.name, []), key=lambda j: j.attempt)
        view.topology = prev.get("topology")
        if jobs and jobs[-1].result is not None and jobs[-1].result.topology is not None:
            view.topology = jobs[-1].result.topology.model_dump(by_alias=True)
        prefix = output_prefix(spec.storage.uri, stage.name, cycle)
        if failed is not None:
            view.state = "Skipped"
            view.message = f"stage {failed.stage.name} failed"
            continue
        if blocked_by is not None:
            view.message = f"waiting for stage {blocked_by}"
            continue
        if jobs:
            latest = jobs[-1]
            view.job = latest.name
            view.attempts = latest.attempt
            view.start = min((j.created for j in jobs if j.created), default=None)
        last_failure: str | None = None
        retries = stage.retries.max_retries if stage.retries else 2
        base_backoff = stage.retries.backoff_seconds if stage.retries else 30
        next_attempt: int | None = None
        if not jobs:
            next_attempt = 1
        else:
            latest = jobs[-1]
            if latest.outcome is None or latest.deleting:
                if latest.suspended:
                    view.state = "Suspended" if suspend else "Pending"
                    view.message = (
                        "suspended"
                        if suspend
                        else ("waiting for Kueue admission" if spec.queue_name else "resuming")
                    )
                elif latest.waiting_reason:
                    # The Job stays active but its pod cannot start until someone fixes the cluster.
                    view.state = "Pending"
                    view.message = f"attempt {latest.attempt} blocked: {_pod_detail(latest)}"
                    blocked = blocked or (_blocked_reason(latest), f"stage {stage.name}: {view.message}")
                else:
                    view.state = "Running"
                    view.message = f"attempt {latest.attempt} running"
                    running_view = view
                if latest.disruptions:
                    view.message = (
                        f"{view.message}; preempted {latest.disruptions}x (not counted as failures)"
                    )
                # Suspend and resume act on the Job itself; Kueue unsuspends queued Jobs on admission.
                if suspend and not latest.suspended:
                    out.job_patches.append((latest.name, {"spec": {"suspend": True}}))
                elif not suspend and latest.suspended and not spec.queue_name:
                    out.job_patches.append((latest.name, {"spec": {"suspend": False}}))
                try:
                    running_contract = stage_contract(
                        run,
                        stage,
                        cycle=cycle,
                        attempt=latest.attempt,
                        config=config,
                        stage_outputs=outputs,
                        adapters=observed.external_adapters,
                    )
                    if latest.spec_hash and spec_hash(running_contract) != latest.spec_hash:
                        drift.append(stage.name)
                except UnresolvedReference:
                    pass
            elif latest.outcome == "Complete":
                if latest.result is not None:
                    view.metrics = dict(latest.result.metrics)
                published = latest.result.manifest_uri if latest.result is not None else None
                if published is None and (latest.result is None and stage.type != "eval"):
                    published = manifest_uri(prefix)  # pod gone: the manifest's location is deterministic
                if published is None:
                    view.state = "Succeeded"
                    view.completion = latest.finished
                else:
                    view.manifest = published
                    aname = adapter_name(name, stage.name, cycle)
                    view.adapter = aname
                    adapter = observed.adapters.get(aname)
                    if adapter is None:
                        parent_ref = outputs.get(stage.from_) if stage.from_ else None
                        parent = parent_ref.name if parent_ref is not None else None
                        out.create.append(
                            build_adapter(run, stage, cycle=cycle, manifest_uri=published, parent=parent)
                        )
                        view.state = "Running"
                        view.message = f"publishing Adapter {aname}"
                    elif uid and adapter.run_uid and adapter.run_uid != uid:
                        view.state = "Failed"
                        view.message = f"Adapter {aname} already exists and belongs to another run"
                    elif adapter.ready == "True":
                        view.state = "Succeeded"
                        view.completion = latest.finished
                        view.output = adapter.ref()
                        outputs[stage.name] = view.output
                    elif adapter.ready == "False" and adapter.reason not in NOT_A_VERDICT:
                        view.state = "Failed"
                        view.message = (
                            f"Adapter {aname} failed verification: {adapter.reason}: {adapter.message}"
                        )
                    else:
                        view.state = "Running"
                        view.message = f"verifying Adapter {aname}"
                    if view.state == "Failed":
                        view.completion = latest.finished
            else:  # Failed
                reason = latest.reason or "Failed"
                pod_detail = _pod_detail(latest)
                detail = (
                    latest.result.error
                    if latest.result is not None and latest.result.error
                    else pod_detail or latest.message
                )
                why = f"attempt {latest.attempt} failed: {reason}" + (f" ({detail})" if detail else "")
                if reason in NON_RETRYABLE_REASONS:
                    view.state = "Failed"
                    view.message = f"{why}; not retryable (exit code {latest.exit_code})"
                    view.completion = latest.finished
                elif latest.attempt > retries:
                    view.state = "Failed"
                    view.message = f"{why}; retries exhausted ({retries} max)"
                    view.completion = latest.finished
                else:
                    delay = backoff_seconds(base_backoff, latest.attempt, config.backoff_cap_seconds)
                    due = (latest.finished or now).timestamp() + delay
                    wait = due - now.timestamp()
                    if wait <= 0:
                        next_attempt = latest.attempt + 1
                    else:
                        view.state = "Running"
                        view.message = f"{why}; retry {latest.attempt} of {retries} in {wait:.0f}s"
                        requeue.append(wait)
                        if pod_detail:  # the pod never started: retrying alone will not fix that
                            view.state = "Pending"
                            blocked = blocked or (
                                _blocked_reason(latest),
                                f"stage {stage.name}: {view.message}",
                            )
                last_failure = reason
                view.cause = _failure_cause(latest)
                if view.state == "Failed" and prev.get("state") != "Failed":
                    out.transitions.append(_transition(stage, "Failed", jobs, latest, reason))
            if view.state == "Succeeded" and prev.get("state") != "Succeeded":
                out.transitions.append(_transition(stage, "Succeeded", jobs, latest, ""))
        if next_attempt is not None:
            if suspend:
                view.state = "Suspended" if jobs else "Pending"
                view.message = "run suspended"
            else:
                try:
                    contract = stage_contract(
                        run,
                        stage,
                        cycle=cycle,
                        attempt=next_attempt,
                        config=config,
                        stage_outputs=outputs,
                        adapters=observed.external_adapters,
                    )
                    job = build_job(
                        run,
                        stage,
                        contract,
                        cycle=cycle,
                        attempt=next_attempt,
                        suspend=bool(spec.queue_name),
                        config=config,
                    )
                except UnresolvedReference as exc:
                    stalled = str(exc)
                    view.message = stalled
                else:
                    nodes = stage.resources.nodes if stage.resources else 1
                    if nodes > 1 and service_name(job["metadata"]["name"]) not in observed.services:
                        out.create.append(build_service(run, job, config))
                    out.create.append(job)
                    view.job = job["metadata"]["name"]
                    view.attempts = next_attempt
                    view.start = view.start or now
                    view.state = "Pending" if spec.queue_name else "Running"
                    # Same words as the next pass will derive from the observed Job: no second status write.
                    view.message = (
                        "waiting for Kueue admission"
                        if spec.queue_name
                        else f"attempt {next_attempt} running"
                    )
                    if next_attempt > 1:
                        out.retries.append(stage.type)
                        out.failed_attempts.append((stage.type, last_failure or "Failed"))
                    if not spec.queue_name:
                        running_view = view
        if view.state == "Failed":
            failed = view
        elif view.state != "Succeeded":
            blocked_by = stage.name
        _stage_events(out, prev, view)

    total = len(views)
    done = sum(1 for v in views if v.state == "Succeeded")
    stages_status = [v.status() for v in views]
    progress = _progress(observed, running_view, prev_status.get("progress"), done, total)
    if running_view is not None:
        out.running = RunningAttempt(
            running_view.stage.name,
            running_view.attempts,
            progress_uri(
                output_prefix(spec.storage.uri, running_view.stage.name, cycle), running_view.attempts
            ),
        )
    if requeue:
        out.requeue_after = min(requeue)

    conds: list[tuple[str, str, str, str]] = []
    if drift:
        conds.append(
            (
                "SpecChangePending",
                "True",
                "RunningAttemptKeepsItsSpec",
                f"spec changed while stage {', '.join(drift)} runs: the running attempt keeps the spec it "
                "started with; later attempts and stages use the new one",
            )
        )
    if failed is not None:
        msg = f"stage {failed.stage.name} failed: {failed.message}"
        return finish(
            "Failed",
            [*_run_conditions("failed", "StageFailed", msg, failed.cause), *conds],
            stages_status,
            progress,
        )
    if done == total:
        msg = f"all {total} stages succeeded"
        return finish(
            "Succeeded",
            [*_run_conditions("succeeded", "Succeeded", msg), *conds],
            stages_status,
            {"percent": 100.0, "step": 0, "totalSteps": 0},
        )
    current = next(v for v in views if v.state != "Succeeded")
    if stalled is not None:
        return finish(
            "Pending",
            [*_run_conditions("stalled", "UnresolvedReference", stalled), *conds],
            stages_status,
            progress,
        )
    if blocked is not None and not suspend:
        if prev_conditions.get(common.STALLED, {}).get("message") != blocked[1]:
            out.events.append(Event("Warning", blocked[0], blocked[1]))
        return finish("Pending", [*_run_conditions("stalled", *blocked), *conds], stages_status, progress)
    if suspend:
        msg = f"suspended at stage {current.stage.name}"
        return finish(
            "Suspended", [*_run_conditions("suspended", "Suspended", msg), *conds], stages_status, progress
        )
    pct = f" {progress['percent']:.0f}%" if progress and current.state == "Running" else ""
    msg = f"stage {current.stage.name} {current.state.lower()}{pct}: {current.message or ''}".rstrip(": ")
    phase = (
        "Running" if (any(v.attempts for v in views) and current.state != "Pending") or done else "Pending"
    )
    reason = "StageRunning" if current.state == "Running" else "StagePending"
    return finish(phase, [*_run_conditions("progressing", reason, msg), *conds], stages_status, progress)


def _transition(
    stage: Stage,
    result: Literal["Succeeded", "Failed"],
    jobs: list[ObservedJob],
    latest: ObservedJob,
    reason: str,
) -> StageTransition:
    start = min((j.created for j in jobs if j.created), default=None)
    duration = (latest.finished - start).total_seconds() if start and latest.finished else 0.0
    return StageTransition(stage.type, result, max(0.0, duration), reason)


def _stage_events(out: Plan, prev: dict[str, Any], view: _StageView) -> None:
    old_state, old_attempts = prev.get("state", "Pending"), int(prev.get("attempts") or 0)
    name = view.stage.name
    if view.attempts > old_attempts:
        if view.attempts == 1:
            out.events.append(Event("Normal", "StageStarted", f"stage {name}: created Job {view.job}"))
        else:
            out.events.append(
                Event("Normal", "StageRetrying", f"stage {name}: attempt {view.attempts}, Job {view.job}")
            )
    if view.state == old_state:
        return
    if view.state == "Succeeded":
        detail = f", Adapter {view.adapter}" if view.adapter else ""
        out.events.append(Event("Normal", "StageSucceeded", f"stage {name} succeeded{detail}"))
    elif view.state == "Failed":
        out.events.append(Event("Warning", "StageFailed", f"stage {name}: {view.message}"))
    elif view.state == "Suspended":
        out.events.append(Event("Normal", "StageSuspended", f"stage {name} suspended"))
    elif view.state == "Running" and old_state in ("Pending", "Suspended") and view.attempts <= old_attempts:
        out.events.append(Event("Normal", "StageRunning", f"stage {name}: {view.message}"))


def _progress(
    observed: Observed, running: _StageView | None, prev: dict[str, Any] | None, done: int, total: int
) -> dict[str, Any] | None:
    if running is None:
        return None
    key = (running.stage.name, running.attempts)
    fresh: StageProgress | None = observed.progress if observed.progress_key == key else None
    if fresh is None:
        # Not polled this pass: keep what the status already says about this stage, so an
        # event-driven reconcile never flaps the progress block.
        if prev and prev.get("stage") == running.stage.name:
            return prev
        return {
            "stage": running.stage.name,
            "percent": round(100.0 * done / total, 1),
            "step": 0,
            "totalSteps": 0,
        }
    fraction = min(1.0, max(0.0, fresh.percent / 100.0))
    block: dict[str, Any] = {
        "stage": running.stage.name,
        "percent": round(100.0 * (done + fraction) / total, 1),
        "step": fresh.step,
        "totalSteps": fresh.total_steps,
    }
    if fresh.loss is not None:
        block["loss"] = round(fresh.loss, 4)
    if fresh.eta_seconds is not None:
        block["etaSeconds"] = round(max(0.0, fresh.eta_seconds), 0)
    if fresh.updated_at:
        block["updatedAt"] = fresh.updated_at
    return block
