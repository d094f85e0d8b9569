"""``plan(run, observed, now) -> Plan``: the whole decision of one reconcile, with no I/O.

Everything in the status is re-derived from observed children (Jobs, their pods' termination
messages, Adapters), so a status write lost to a crash is simply recomputed on the next pass.
"""

from __future__ import annotations

import math
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
    owner_reference,
    spec_hash,
    stage_contract,
    trainer_network_policy,
)
from temper.builders.names import adapter_name, manifest_uri, output_prefix, progress_uri, service_name
from temper.config import OperatorConfig
from temper.continual.cycle import PARENT_LABEL
from temper.planner.evals import GATE_FAILED, GATES_PASSED, adapter_evals, gate_message, stage_drift, verdicts
from temper.planner.observed import (
    Observed,
    ObservedJob,
    format_time,
    kueue_wait_message,
    parse_time,
    stage_reason,
)
from temper.policy import run_violations

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
    job_deletes: list[str] = field(default_factory=list)  # suspended Kueue attempts
    status: dict[str, Any] = field(default_factory=dict)  # our fields of .status, complete
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    running: RunningAttempt | None = None
    transitions: list[StageTransition] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)  # stage types of new retry attempts
    failed_attempts: list[tuple[str, str]] = field(default_factory=list)  # (stage type, reason) retried
    adapter_evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # Adapter -> status.evals
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
        out["metrics"] = {k: v for k, v in self.metrics.items() if math.isfinite(v)}  # JSON has no NaN
        if self.topology:
            out["topology"] = dict(self.topology)
        drift = stage_drift(self.metrics)
        if drift:
            out["drift"] = drift
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
    if error.startswith("HubUnavailable:"):  # an hf:// model or dataset the Hub did not serve
        return "HubUnreachable"
    # botocore's connection errors, wrapped in the trainer's StorageError or not, after its retries
    if any(marker in error for marker in UNREACHABLE_MARKERS):
        return "StorageUnreachable"
    if error.startswith("storage:"):
        return "StorageError"
    return None


def _policy_violations(run: PostTrainingRun, config: OperatorConfig) -> list[str]:
    """The platform policy re-checked in code (admission checks it first, if installed)."""
    if config.policy is None:
        return []
    annotations = run.metadata.get("annotations") or {}
    credentials = bool(run.spec.storage.secret_ref or config.default_storage_secret)
    namespace = run.metadata.get("namespace", "")
    return run_violations(run.spec, namespace, annotations, config.policy, credentials=credentials)


def policy_refusal(run_obj: dict[str, Any], config: OperatorConfig) -> str | None:
    """The PolicyViolation message of a run (a continual template too), or None; invalid specs
    are reported by their own path."""
    try:
        run = PostTrainingRun.model_validate(
            {"metadata": run_obj.get("metadata") or {}, "spec": run_obj.get("spec") or {}}
        )
    except ValidationError:
        return None
    violations = _policy_violations(run, config)
    return f"platform policy: {'; '.join(violations)}" if violations else None


def backoff_seconds(base: int, attempt: int, cap: int) -> float:
    """Delay before attempt ``attempt + 1``: base, 2*base, 4*base ... capped."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


@dataclass(frozen=True)
class _Ctx:
    """What every stage decision reads: the validated run and this pass's observations."""

    run: PostTrainingRun
    observed: Observed
    now: datetime
    config: OperatorConfig

    @property
    def spec(self) -> Any:
        return self.run.spec

    @property
    def name(self) -> str:
        return str(self.run.metadata["name"])

    @property
    def uid(self) -> str:
        return str(self.run.metadata.get("uid") or "")


@dataclass
class _StageResult:
    """One stage's decision: its status view and the actions it asks for."""

    view: _StageView
    create: list[dict[str, Any]] = field(default_factory=list)
    job_patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    job_deletes: list[str] = field(default_factory=list)
    transitions: list[StageTransition] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    failed_attempts: list[tuple[str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    adapter_evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    requeue: float | None = None
    blocked: tuple[str, str] | None = None  # (reason, message) of a trainer pod that cannot start
    stalled: str | None = None  # an unresolved reference
    drift: bool = False  # the running attempt's contract differs from the spec's
    running: bool = False  # this stage is the one running
    next_attempt: int | None = None
    last_failure: str | None = None


@dataclass
class _Walk:
    """All stages, in order, as far as the chain gets."""

    results: list[_StageResult] = field(default_factory=list)
    failed: _StageView | None = None

    @property
    def views(self) -> list[_StageView]:
        return [r.view for r in self.results]

    @property
    def running(self) -> _StageView | None:
        return next((r.view for r in reversed(self.results) if r.running), None)

    def first(self, attr: str) -> Any:
        return next((getattr(r, attr) for r in self.results if getattr(r, attr) is not None), None)


def plan(run_obj: dict[str, Any], observed: Observed, now: datetime, config: OperatorConfig) -> Plan:
    """The whole decision of one reconcile: validate, walk the stage chain, sum it up."""
    meta = run_obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Plan()  # garbage collection deletes the Jobs; nothing to write
    prev_status = run_obj.get("status") or {}
    prev_conditions = {c["type"]: c for c in prev_status.get("conditions") or [] if "type" in c}
    try:
        run = PostTrainingRun.model_validate({"metadata": meta, "spec": run_obj.get("spec") or {}})
    except ValidationError as exc:
        message = f"invalid spec: {_validation_message(exc)}"
        events = []
        if prev_conditions.get(common.STALLED, {}).get("message") != message:
            events.append(Event("Warning", "InvalidSpec", message))
        conds = _run_conditions("stalled", "InvalidSpec", message)
        return _finish(run_obj, observed, now, Plan(events=events), ("Pending", conds, None, None))
    violations = _policy_violations(run, config)
    if violations:
        message = f"platform policy: {'; '.join(violations)}"
        events = []
        if prev_conditions.get(common.STALLED, {}).get("message") != message:
            events.append(Event("Warning", "PolicyViolation", message))
        conds = _run_conditions("stalled", "PolicyViolation", message)
        return _finish(run_obj, observed, now, Plan(events=events), ("Pending", conds, None, None))
    ctx = _Ctx(run, observed, now, config)
    walk = _walk(ctx, prev_status)
    out = Plan()
    for r in walk.results:
        out.create += r.create
        out.job_patches += r.job_patches
        out.job_deletes += r.job_deletes
        out.transitions += r.transitions
        out.retries += r.retries
        out.failed_attempts += r.failed_attempts
        out.events += r.events
        out.adapter_evals.update(r.adapter_evals)
    requeues = [r.requeue for r in walk.results if r.requeue is not None]
    out.requeue_after = min(requeues) if requeues else None
    out.running = _running_attempt(ctx, walk.running)
    return _finish(run_obj, observed, now, out, _outcome(ctx, walk, prev_status, prev_conditions, out))


def _finish(
    run_obj: dict[str, Any],
    observed: Observed,
    now: datetime,
    out: Plan,
    outcome: tuple[str, list[tuple[str, str, str, str]], list[dict[str, Any]] | None, dict[str, Any] | None],
) -> Plan:
    """The complete status for ``outcome`` (phase, conditions, stages, progress), and run events."""
    phase, conds, stages, progress = outcome
    meta = run_obj.get("metadata") or {}
    generation = int(meta.get("generation") or 0)
    prev_status = run_obj.get("status") or {}
    prev_conditions = {c["type"]: c for c in prev_status.get("conditions") or [] if "type" in c}
    foreign = [c for t, c in prev_conditions.items() if t not in OWNED_CONDITIONS]
    conditions = [_condition(prev_conditions, t, st, r, m, generation, now) for t, st, r, m in conds]
    out.phase = phase
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
        message = next((m for t, _, _, m in conds if t == common.READY), "")
        out.events.append(Event(kind, f"Run{phase}", message))
    elif prev_status.get("phase") == "Suspended" and phase != "Suspended":
        out.events.append(Event("Normal", "RunResumed", "run resumed"))
    return out


def _walk(ctx: _Ctx, prev_status: dict[str, Any]) -> _Walk:
    """Stages in list order: each waits for the one before it; after a failure the rest skip."""
    jobs_by_stage: dict[str, list[ObservedJob]] = {}
    for seen in ctx.observed.jobs:
        if seen.cycle == ctx.observed.cycle:
            jobs_by_stage.setdefault(seen.stage, []).append(seen)
    prev_stages = {s.get("name"): s for s in prev_status.get("stages") or []}
    outputs: dict[str, AdapterRef] = {}
    walk = _Walk()
    blocked_by: str | None = None  # first stage not Succeeded: later stages wait
    for stage in ctx.spec.stages:
        prev = prev_stages.get(stage.name) or {}
        if walk.failed is not None or blocked_by is not None:
            result = _StageResult(_StageView(stage, metrics=dict(prev.get("metrics") or {})))
            if walk.failed is not None:
                result.view.state = "Skipped"
                result.view.message = f"stage {walk.failed.stage.name} failed"
            else:
                result.view.message = f"waiting for stage {blocked_by}"
        else:
            jobs = sorted(jobs_by_stage.get(stage.name, []), key=lambda j: j.attempt)
            result = _plan_stage(ctx, stage, jobs, prev, outputs)
            if result.view.state == "Failed":
                walk.failed = result.view
            elif result.view.state != "Succeeded":
                blocked_by = stage.name
            result.events += _stage_events(prev, result.view)
        walk.results.append(result)
    return walk


def _plan_stage(
    ctx: _Ctx, stage: Stage, jobs: list[ObservedJob], prev: dict[str, Any], outputs: dict[str, AdapterRef]
) -> _StageResult:
    """One stage of the chain, by the state of its latest attempt's Job."""
    view = _StageView(stage, metrics=dict(prev.get("metrics") or {}), topology=prev.get("topology"))
    result = _StageResult(view)
    if jobs and jobs[-1].result is not None and jobs[-1].result.topology is not None:
        view.topology = jobs[-1].result.topology.model_dump(by_alias=True)
    if not jobs:
        result.next_attempt = 1
    else:
        latest = jobs[-1]
        view.job, view.attempts = latest.name, latest.attempt
        # The time recorded when temper created the first attempt wins over the Job's own
        # creationTimestamp, so the pass that first sees the Job writes nothing new.
        first = min((j.created for j in jobs if j.created), default=None)
        view.start = parse_time(prev.get("startTime")) or first
        if latest.outcome is None or latest.deleting:
            _active_attempt(ctx, stage, latest, outputs, result, prev)
        elif latest.outcome == "Complete" and stage.type == "eval":
            _completed_eval(ctx, stage, latest, outputs, result, prev)
        elif latest.outcome == "Complete":
            _completed_attempt(ctx, stage, latest, outputs, result)
        else:
            _failed_attempt(ctx, stage, jobs, latest, result, prev=prev)
        if view.state == "Succeeded" and prev.get("state") != "Succeeded":
            result.transitions.append(_transition(stage, "Succeeded", jobs, latest, ""))
        if view.state == "Failed" and latest.outcome == "Complete" and prev.get("state") != "Failed":
            result.transitions.append(_transition(stage, "Failed", jobs, latest, view.cause or "Failed"))
    if result.next_attempt is not None:
        _next_attempt(ctx, stage, jobs, outputs, result, prev)
    return result


def _active_attempt(  # noqa: PLR0917 - the stage's inputs, as _plan_stage has them
    ctx: _Ctx,
    stage: Stage,
    latest: ObservedJob,
    outputs: dict[str, AdapterRef],
    result: _StageResult,
    prev: dict[str, Any],
) -> None:
    """The latest Job is still active (or being deleted): queued, blocked, suspended or running."""
    view, spec = result.view, ctx.spec
    if latest.suspended:
        view.state = "Suspended" if spec.suspend else "Pending"
        view.message = (
            "suspended"
            if spec.suspend
            else (kueue_wait_message(latest, prev) if spec.queue_name else "resuming")
        )
    elif latest.waiting_reason:
        # The Job stays active but its pod cannot start until someone fixes the cluster.
        view.state = "Pending"
        view.message = f"attempt {latest.attempt} blocked: {_pod_detail(latest)}"
        result.blocked = (_blocked_reason(latest), f"stage {stage.name}: {view.message}")
    else:
        view.state = "Running"
        view.message = f"attempt {latest.attempt} running"
        result.running = True
    if latest.disruptions:
        view.message = f"{view.message}; preempted {latest.disruptions}x (not counted as failures)"
    # Suspend and resume act on the Job itself; Kueue unsuspends queued Jobs on admission.
    if spec.suspend and spec.queue_name:
        # Kueue would unsuspend an admitted Job: deleting it releases the quota and leaves the
        # queue; resume recreates the same attempt, resuming its checkpoint.
        view.state, view.message = "Suspended", "suspended"
        if not latest.deleting:
            result.job_deletes.append(latest.name)
    elif spec.suspend and not latest.suspended:
        result.job_patches.append((latest.name, {"spec": {"suspend": True}}))
    elif not spec.suspend and latest.suspended and not spec.queue_name:
        result.job_patches.append((latest.name, {"spec": {"suspend": False}}))
    try:
        contract = _contract(ctx, stage, latest.attempt, outputs)
        result.drift = bool(latest.spec_hash) and spec_hash(contract) != latest.spec_hash
    except UnresolvedReference:
        pass


def _completed_attempt(
    ctx: _Ctx, stage: Stage, latest: ObservedJob, outputs: dict[str, AdapterRef], result: _StageResult
) -> None:
    """The latest Job completed: the stage succeeds once its Adapter (if any) is verified Ready."""
    view, cycle = result.view, ctx.observed.cycle
    if latest.result is not None:
        view.metrics = dict(latest.result.metrics)
    published = latest.result.manifest_uri if latest.result is not None else None
    if published is None and latest.result is None:
        # pod gone: the manifest's location is deterministic
        published = manifest_uri(output_prefix(ctx.spec.storage.uri, stage.name, cycle))
    if published is None:
        view.state, view.completion = "Succeeded", latest.finished
        return
    view.manifest = published
    aname = adapter_name(ctx.name, stage.name, cycle)
    view.adapter = aname
    adapter = ctx.observed.adapters.get(aname)
    uid = ctx.uid
    if adapter is None:
        parent_ref = outputs.get(stage.from_) if stage.from_ else None
        parent = parent_ref.name if parent_ref is not None else None
        result.create.append(
            build_adapter(ctx.run, stage, cycle=cycle, manifest_uri=published, parent=parent)
        )
        view.state, view.message = "Running", f"publishing Adapter {aname}"
    elif uid and adapter.run_uid and adapter.run_uid != uid:
        view.state, view.message = "Failed", f"Adapter {aname} already exists and belongs to another run"
    elif adapter.ready == "True":
        view.state, view.completion = "Succeeded", latest.finished
        view.output = adapter.ref()
        outputs[stage.name] = view.output
    elif adapter.ready == "False" and adapter.reason not in NOT_A_VERDICT:
        view.state = "Failed"
        view.message = f"Adapter {aname} failed verification: {adapter.reason}: {adapter.message}"
    else:
        view.state, view.message = "Running", f"verifying Adapter {aname}"
    if view.state == "Failed":
        view.completion = latest.finished


def _completed_eval(  # noqa: PLR0917 - the stage's inputs, as _plan_stage has them
    ctx: _Ctx,
    stage: Stage,
    latest: ObservedJob,
    outputs: dict[str, AdapterRef],
    result: _StageResult,
    prev: dict[str, Any],
) -> None:
    """An eval stage publishes no Adapter: its gates decide it, its results go to the evaluated Adapter.

    In a continual cycle a failed gate only reports: the continual gates block the promotion."""
    view = result.view
    view.completion = latest.finished
    if latest.result is None:  # pod gone: the status already holds the verdict
        view.state = "Failed" if prev.get("state") == "Failed" else "Succeeded"
        view.message = prev.get("message")
        view.cause = GATE_FAILED if view.state == "Failed" else None
        return
    view.metrics = dict(latest.result.metrics)
    view.manifest = latest.result.manifest_uri
    found = verdicts(latest.result.evals)
    message = gate_message(found)
    failed = any(v.outcome == "Failed" for v in found)
    continual = bool((ctx.run.metadata.get("labels") or {}).get(PARENT_LABEL))
    view.state = "Failed" if failed and not continual else "Succeeded"
    view.cause = GATE_FAILED if view.state == "Failed" else None
    if failed and continual:
        message += "; in a continual cycle the promotion gates decide"
    view.message = message or None
    evaluated = outputs.get(stage.from_) if stage.from_ else None
    if evaluated is not None and evaluated.name in ctx.observed.adapters:
        time = format_time(latest.finished)
        result.adapter_evals[evaluated.name] = adapter_evals(
            found, run=ctx.name, stage=stage.name, cycle=ctx.observed.cycle, time=time
        )
    if message and prev.get("state") not in ("Succeeded", "Failed"):
        kind: EventType = "Warning" if failed else "Normal"
        reason = GATE_FAILED if failed else GATES_PASSED
        result.events.append(Event(kind, reason, f"stage {stage.name}: {message}"))


def _failed_attempt(
    ctx: _Ctx,
    stage: Stage,
    jobs: list[ObservedJob],
    latest: ObservedJob,
    result: _StageResult,
    *,
    prev: dict[str, Any],
) -> None:
    """The latest Job failed: retry after a backoff, or fail the stage (not retryable, or out of retries)."""
    view = result.view
    retries = stage.retries.max_retries if stage.retries else 2
    base_backoff = stage.retries.backoff_seconds if stage.retries else 30
    reason = latest.reason or "Failed"
    pod_detail = _pod_detail(latest)
    detail = (
        latest.result.error
        if latest.result is not None and latest.result.error
        else pod_detail or latest.message
    )
    why = f"attempt {latest.attempt} failed: {reason}" + (f" ({detail})" if detail else "")
    if reason in NON_RETRYABLE_REASONS:
        view.state, view.completion = "Failed", latest.finished
        view.message = f"{why}; not retryable (exit code {latest.exit_code})"
    elif latest.attempt > retries:
        view.state, view.completion = "Failed", latest.finished
        view.message = f"{why}; retries exhausted ({retries} max)"
    else:
        delay = backoff_seconds(base_backoff, latest.attempt, ctx.config.backoff_cap_seconds)
        wait = (latest.finished or ctx.now).timestamp() + delay - ctx.now.timestamp()
        if wait <= 0:
            result.next_attempt = latest.attempt + 1
        else:
            view.state = "Running"
            view.message = f"{why}; retry {latest.attempt} of {retries} in {wait:.0f}s"
            result.requeue = wait
            if pod_detail:  # the pod never started: retrying alone will not fix that
                view.state = "Pending"
                result.blocked = (_blocked_reason(latest), f"stage {stage.name}: {view.message}")
    result.last_failure = reason
    view.cause = _failure_cause(latest)
    if view.state == "Failed" and prev.get("state") != "Failed":
        result.transitions.append(_transition(stage, "Failed", jobs, latest, reason))


def _next_attempt(  # noqa: PLR0917 - the stage's inputs, as _plan_stage has them
    ctx: _Ctx,
    stage: Stage,
    jobs: list[ObservedJob],
    outputs: dict[str, AdapterRef],
    result: _StageResult,
    prev: dict[str, Any],
) -> None:
    """Create the stage's next attempt (its Job, and a Service for multi-node), unless suspended."""
    view, spec, attempt = result.view, ctx.spec, result.next_attempt or 1
    if spec.suspend:
        # A Kueue run's suspended attempt has no Job: it still counts as started.
        view.attempts = max(view.attempts, int(prev.get("attempts") or 0))
        view.state = "Suspended" if jobs or view.attempts else "Pending"
        view.message = "run suspended"
        return
    try:
        contract = _contract(ctx, stage, attempt, outputs)
        job = build_job(
            ctx.run,
            stage,
            contract,
            cycle=ctx.observed.cycle,
            attempt=attempt,
            suspend=bool(spec.queue_name),
            config=ctx.config,
        )
    except UnresolvedReference as exc:
        result.stalled = view.message = str(exc)
        return
    network = trainer_network_policy(
        ctx.run, ctx.config.trainer_network, ctx.config.trainer_metrics_port, owner_reference(ctx.run)
    )
    if network is not None:  # created with the run's first Job; 409s after
        result.create.append(network)
    nodes = stage.resources.nodes if stage.resources else 1
    if nodes > 1 and service_name(job["metadata"]["name"]) not in ctx.observed.services:
        result.create.append(build_service(ctx.run, job, ctx.config))
    result.create.append(job)
    view.job, view.attempts = job["metadata"]["name"], attempt
    view.start = view.start or ctx.now
    view.state = "Pending" if spec.queue_name else "Running"
    # Same words as the next pass will derive from the observed Job: no second status write.
    view.message = kueue_wait_message(None, {}) if spec.queue_name else f"attempt {attempt} running"
    if attempt > max(1, int(prev.get("attempts") or 0)):  # not a resumed attempt
        result.retries.append(stage.type)
        result.failed_attempts.append((stage.type, result.last_failure or "Failed"))
    result.running = not spec.queue_name


def _contract(ctx: _Ctx, stage: Stage, attempt: int, outputs: dict[str, AdapterRef]) -> Any:
    return stage_contract(
        ctx.run,
        stage,
        cycle=ctx.observed.cycle,
        attempt=attempt,
        config=ctx.config,
        stage_outputs=outputs,
        adapters=ctx.observed.external_adapters,
    )


def _running_attempt(ctx: _Ctx, running: _StageView | None) -> RunningAttempt | None:
    if running is None:
        return None
    prefix = output_prefix(ctx.spec.storage.uri, running.stage.name, ctx.observed.cycle)
    return RunningAttempt(running.stage.name, running.attempts, progress_uri(prefix, running.attempts))


def _outcome(
    ctx: _Ctx, walk: _Walk, prev_status: dict[str, Any], prev_conditions: dict[str, dict[str, Any]], out: Plan
) -> tuple[str, list[tuple[str, str, str, str]], list[dict[str, Any]], dict[str, Any] | None]:
    """The run's phase and conditions from its stages: failed, done, stalled, blocked, suspended, going."""
    views = walk.views
    total, done = len(views), sum(1 for v in views if v.state == "Succeeded")
    stages = [v.status() for v in views]
    progress = _progress(ctx.observed, walk.running, prev_status.get("progress"), done, total)
    drift = [r.view.stage.name for r in walk.results if r.drift]
    extra: list[tuple[str, str, str, str]] = []
    if drift:
        extra.append(
            (
                "SpecChangePending",
                "True",
                "RunningAttemptKeepsItsSpec",
                f"spec changed while stage {', '.join(drift)} runs: the running attempt keeps the spec it "
                "started with; later attempts and stages use the new one",
            )
        )
    if walk.failed is not None:
        msg = f"stage {walk.failed.stage.name} failed: {walk.failed.message}"
        return (
            "Failed",
            [*_run_conditions("failed", "StageFailed", msg, walk.failed.cause), *extra],
            stages,
            progress,
        )
    if done == total:
        msg = f"all {total} stages succeeded"
        final = {"percent": 100.0, "step": 0, "totalSteps": 0}
        return "Succeeded", [*_run_conditions("succeeded", "Succeeded", msg), *extra], stages, final
    current = next(v for v in views if v.state != "Succeeded")
    stalled, blocked = walk.first("stalled"), walk.first("blocked")
    if stalled is not None:
        return (
            "Pending",
            [*_run_conditions("stalled", "UnresolvedReference", stalled), *extra],
            stages,
            progress,
        )
    if blocked is not None and not ctx.spec.suspend:
        if prev_conditions.get(common.STALLED, {}).get("message") != blocked[1]:
            out.events.append(Event("Warning", blocked[0], blocked[1]))
        return "Pending", [*_run_conditions("stalled", *blocked), *extra], stages, progress
    if ctx.spec.suspend:
        msg = f"suspended at stage {current.stage.name}"
        return "Suspended", [*_run_conditions("suspended", "Suspended", msg), *extra], stages, progress
    pct = f" {progress['percent']:.0f}%" if progress and current.state == "Running" else ""
    msg = f"stage {current.stage.name} {current.state.lower()}{pct}: {current.message or ''}".rstrip(": ")
    going = (any(v.attempts for v in views) and current.state != "Pending") or done
    reason = stage_reason(current.state, current.message or "")
    return (
        "Running" if going else "Pending",
        [*_run_conditions("progressing", reason, msg), *extra],
        stages,
        progress,
    )


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


def _stage_events(prev: dict[str, Any], view: _StageView) -> list[Event]:
    old_state, old_attempts = prev.get("state", "Pending"), int(prev.get("attempts") or 0)
    name = view.stage.name
    events: list[Event] = []
    if view.attempts > old_attempts:
        if view.attempts == 1:
            events.append(Event("Normal", "StageStarted", f"stage {name}: created Job {view.job}"))
        else:
            events.append(
                Event("Normal", "StageRetrying", f"stage {name}: attempt {view.attempts}, Job {view.job}")
            )
    if view.state == old_state:
        return events
    if view.state == "Succeeded":
        detail = f", Adapter {view.adapter}" if view.adapter else ""
        events.append(Event("Normal", "StageSucceeded", f"stage {name} succeeded{detail}"))
    elif view.state == "Failed":
        events.append(Event("Warning", "StageFailed", f"stage {name}: {view.message}"))
    elif view.state == "Suspended":
        events.append(Event("Normal", "StageSuspended", f"stage {name} suspended"))
    elif view.state == "Running" and old_state in ("Pending", "Suspended") and view.attempts <= old_attempts:
        events.append(Event("Normal", "StageRunning", f"stage {name}: {view.message}"))
    return events


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
