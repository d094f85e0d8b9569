"""The observed world of one run, parsed from raw Kubernetes objects (pure; the handler fetches them)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from temper.api.contract import AdapterRef, StageProgress, StageResult
from temper.builders.names import (
    ANNOTATION_SPEC_HASH,
    COMPLETION_INDEX_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_CYCLE,
    LABEL_RUN_UID,
    LABEL_STAGE,
    TRAINER_CONTAINER,
)

JobOutcome = Literal["Complete", "Failed"]
MESSAGE_LIMIT = 512
# Container waiting reasons the kubelet never gets past by itself: the pod would wait forever while
# the Job stays active, so the run must say Stalled instead of Running.
STUCK_WAITING_REASONS = (
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
)
# Kueue admits a queued stage's Job by unsuspending it, and evicts (preempts) it by suspending it
# again: the run says so, and the Job (same attempt) resumes from its checkpoint on readmission.
KUEUE_QUEUED_REASON = "QueuedByKueue"
KUEUE_WAITING = "waiting for Kueue admission"


KUEUE_EVICTED = "evicted by Kueue (preempted or quota reclaimed), requeued"


def kueue_wait_message(job: ObservedJob | None, prev: Mapping[str, Any]) -> str:
    """What a suspended, Kueue-queued stage Job waits for: its first admission, or readmission
    after Kueue evicted it (the status last saw this attempt running, or already said so)."""
    if job is None:
        return KUEUE_WAITING
    same_attempt = int(prev.get("attempts") or 0) == job.attempt
    ran = same_attempt and (prev.get("state") == "Running" or KUEUE_EVICTED in (prev.get("message") or ""))
    if job.evicted or ran:
        return f"{KUEUE_EVICTED}; {KUEUE_WAITING}"
    return KUEUE_WAITING


def stage_reason(state: str, message: str) -> str:
    """The run's Reconciling reason for its current stage: names Kueue while Kueue holds it."""
    if state == "Running":
        return "StageRunning"
    return KUEUE_QUEUED_REASON if KUEUE_WAITING in message else "StagePending"


# A pod the scheduler cannot place because a claim it mounts (a pvc:// base model, the model
# cache) does not exist: fixable by creating the claim, so the run stalls rather than fails.
CLAIM_NOT_FOUND = "ClaimNotFound"
_CLAIM_MISSING = re.compile(r'persistentvolumeclaim "([^"]+)" not found')


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ObservedJob:
    name: str
    stage: str
    cycle: int
    attempt: int
    created: datetime | None = None
    started: datetime | None = None
    suspended: bool = False
    active: int = 0
    outcome: JobOutcome | None = None
    reason: str = ""
    message: str = ""
    finished: datetime | None = None
    spec_hash: str = ""
    result: StageResult | None = None
    disruptions: int = 0  # pods preempted/evicted: replaced by the Job, never counted as failures
    exit_code: int | None = None
    deleting: bool = False
    waiting_reason: str = ""  # one of STUCK_WAITING_REASONS, from the trainer container
    waiting_message: str = ""
    evicted: bool = False  # suspended after it ran: Kueue took its quota back

    @classmethod
    def from_k8s(cls, job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> ObservedJob:
        meta = job.get("metadata", {})
        labels = meta.get("labels") or {}
        status = job.get("status") or {}
        outcome: JobOutcome | None = None
        reason = message = ""
        finished = parse_time(status.get("completionTime"))
        for cond in status.get("conditions") or []:
            if cond.get("status") != "True":
                continue
            if cond.get("type") in ("Complete", "Failed"):
                outcome = cond["type"]
                reason = cond.get("reason", "") or ""
                message = cond.get("message", "") or ""
                finished = finished or parse_time(cond.get("lastTransitionTime"))
        result, disruptions, exit_code = _from_pods(pods or [])
        waiting_reason, waiting_message = _stuck_waiting(pods or [])
        suspended = bool((job.get("spec") or {}).get("suspend"))
        return cls(
            name=meta.get("name", ""),
            stage=labels.get(LABEL_STAGE, ""),
            cycle=_int(labels.get(LABEL_CYCLE), 1),
            attempt=_int(labels.get(LABEL_ATTEMPT), 1),
            created=parse_time(meta.get("creationTimestamp")),
            started=parse_time(status.get("startTime")),
            suspended=suspended,
            active=int(status.get("active") or 0),
            outcome=outcome,
            reason=reason,
            message=message[:MESSAGE_LIMIT],
            finished=finished,
            spec_hash=(meta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH, ""),
            result=result,
            disruptions=disruptions,
            exit_code=exit_code,
            deleting=bool(meta.get("deletionTimestamp")),
            waiting_reason=waiting_reason,
            waiting_message=waiting_message[:MESSAGE_LIMIT],
            evicted=suspended and outcome is None and bool(pods),
        )


def _int(raw: str | None, default: int) -> int:
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def _from_pods(pods: list[dict[str, Any]]) -> tuple[StageResult | None, int, int | None]:
    """The trainer's StageResult, disruptions and the exit code that decides a retry.

    A published result (rank 0's) wins; else the first pod to fail is the root cause: the other
    pods of a multi-node attempt fail after it, when their peer vanishes mid-collective.
    """
    found: list[tuple[str, int, int | None, StageResult | None]] = []  # finishedAt, index, exit, result
    disruptions = 0
    for pod in pods:
        status = pod.get("status") or {}
        if any(
            c.get("type") == "DisruptionTarget" and c.get("status") == "True"
            for c in status.get("conditions") or []
        ):
            disruptions += 1
            continue
        index = _int((pod.get("metadata", {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION), 0)
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if cs.get("name") != TRAINER_CONTAINER or not term:
                continue
            found.append((str(term.get("finishedAt") or ""), index, term.get("exitCode"), _result(term)))
    published = sorted((f for f in found if f[3] is not None and f[3].manifest_uri), key=lambda f: f[1])
    if published:
        return published[0][3], disruptions, published[0][2]
    pool = sorted([f for f in found if f[2] not in (0, None)] or found, key=lambda f: (f[0], f[1]))
    if not pool:
        return None, disruptions, None
    result = next((f[3] for f in pool if f[3] is not None), None)
    return result, disruptions, pool[0][2]


def _result(term: dict[str, Any]) -> StageResult | None:
    """The trainer's StageResult from a termination message, or the log tail of a container that
    died before writing one (a wrong image, a crash at import)."""
    raw = term.get("message")
    if not raw:
        return None
    try:
        return StageResult.model_validate(json.loads(raw))
    except ValueError:
        if term.get("exitCode"):
            return StageResult(error=" | ".join(raw.strip().splitlines()[-3:])[-MESSAGE_LIMIT:])
        return None


def _stuck_waiting(pods: list[dict[str, Any]]) -> tuple[str, str]:
    """(reason, message) of the first trainer container stuck waiting, or ("", "")."""
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != TRAINER_CONTAINER:
                continue
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING_REASONS:
                return str(waiting["reason"]), str(waiting.get("message") or "")
        missing = _missing_claim(pod)
        if missing:
            return CLAIM_NOT_FOUND, f"persistentvolumeclaim {missing!r} not found"
    return "", ""


def _missing_claim(pod: dict[str, Any]) -> str | None:
    """The claim an unschedulable pod waits for, from the scheduler's PodScheduled message."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            match = _CLAIM_MISSING.search(str(cond.get("message") or ""))
            if match:
                return match.group(1)
    return None


AdapterReadiness = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class ObservedAdapter:
    name: str
    manifest_uri: str
    ready: AdapterReadiness = "Unknown"
    reason: str = ""
    message: str = ""
    run_uid: str = ""

    @classmethod
    def from_k8s(cls, adapter: dict[str, Any]) -> ObservedAdapter:
        meta = adapter.get("metadata", {})
        status = adapter.get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        return cls(
            name=meta.get("name", ""),
            manifest_uri=((adapter.get("spec") or {}).get("artifact") or {}).get("uri", ""),
            ready=(ready or {}).get("status", "Unknown"),
            reason=(ready or {}).get("reason", ""),
            message=((ready or {}).get("message", "") or "")[:MESSAGE_LIMIT],
            run_uid=(meta.get("labels") or {}).get(LABEL_RUN_UID, ""),
        )

    def ref(self) -> AdapterRef:
        return AdapterRef(name=self.name, manifest_uri=self.manifest_uri)


@dataclass
class Observed:
    jobs: list[ObservedJob] = field(default_factory=list)
    adapters: dict[str, ObservedAdapter] = field(default_factory=dict)  # by name
    services: set[str] = field(default_factory=set)
    progress: StageProgress | None = None  # of the running attempt, when polled
    progress_key: tuple[str, int] | None = None  # (stage, attempt) the progress belongs to
    # Adapters named by stages (reward models, merge sources), Ready ones only.
    external_adapters: dict[str, AdapterRef] = field(default_factory=dict)
    cycle: int = 1
