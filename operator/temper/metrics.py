"""The operator's Prometheus metrics, served on ``/metrics``. Label values are bounded (docs/metrics.md)."""

from __future__ import annotations

import contextlib
from collections import Counter as _Tally
from typing import Any, get_args

from prometheus_client import Counter, Gauge, Histogram

from temper import __version__ as _version
from temper.api.contract import StageType

RUN_STATES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
STAGE_TYPES: tuple[str, ...] = get_args(StageType)
STAGE_RESULTS = ("Succeeded", "Failed")  # planner.plan.StageTransition.result
# adapters.failure_reason's vocabulary.
VERIFICATION_REASONS = (
    "ManifestMissing",
    "ManifestInvalid",
    "FileMissing",
    "SizeMismatch",
    "Sha256Mismatch",
    "ReadError",
)

RUNS = Gauge("temper_runs", "PostTrainingRuns per state.", ["state"])
STAGE_DURATION = Histogram(
    "temper_stage_duration_seconds",
    "Wall time of a stage, first Job created to final result, across attempts.",
    ["stage_type", "result"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200),
)
RECONCILE_DURATION = Histogram(
    "temper_reconcile_duration_seconds",
    "Time spent in one reconcile.",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_ERRORS = Counter(
    "temper_api_errors_total", "Kubernetes API calls that failed.", ["verb", "resource", "code"]
)
API_REQUESTS = Counter(
    "temper_api_requests_total", "Kubernetes API calls made by the operator.", ["verb", "resource"]
)
STORAGE_REQUESTS = Counter(
    "temper_storage_requests_total", "S3 requests made by the operator.", ["operation"]
)
ADAPTERS = Gauge("temper_adapters", "Adapters by lifecycle and readiness.", ["lifecycle", "ready"])
RUN_PROGRESS = Gauge(
    "temper_run_progress_ratio", "Progress (0-1) of a run with a running stage.", ["namespace", "run"]
)
RUN_LOSS = Gauge("temper_run_loss", "Latest training loss of a run's running stage.", ["namespace", "run"])
STAGE_RETRIES = Counter(
    "temper_stage_retries_total", "Stage attempts started after a failed attempt.", ["stage_type"]
)
STAGE_FAILURES = Counter("temper_stage_failures_total", "Stages that failed.", ["stage_type", "reason"])
GATE_FAILURES = Counter("temper_gate_failures_total", "Regression gates that blocked a promotion.", ["suite"])
FORGETTING = Gauge(
    "temper_forgetting_ratio",
    "Relative drop of an old suite's metric vs the promoted adapter.",
    ["namespace", "run", "suite"],
)
STAGE_DRIFT = Gauge(
    "temper_stage_drift_kl",
    "Mean per-token KL of a stage's output on the trainer's probe set, to its parent or the base model.",
    ["namespace", "run", "stage", "reference"],
)
RUN_GENERATION = Gauge(
    "temper_run_generation", "Latest continual-learning generation of a run.", ["namespace", "run"]
)
VERIFICATION_FAILURES = Counter(
    "temper_adapter_verification_failures_total", "Adapter artifacts that failed verification.", ["reason"]
)
BUILD_INFO = Gauge("temper_build_info", "Always 1; the operator's version.", ["version"])
BUILD_INFO.labels(_version).set(1)
# Known label values start at 0, as client libraries advise: increase() and
# histogram_quantile() then see a stage's first result and panels show 0, not "No data".
for _state in RUN_STATES:
    RUNS.labels(_state).set(0)
for _type in STAGE_TYPES:
    STAGE_RETRIES.labels(_type)
    for _result in STAGE_RESULTS:
        STAGE_DURATION.labels(_type, _result)
for _reason in VERIFICATION_REASONS:
    VERIFICATION_FAILURES.labels(_reason)


class StateTally:
    """Object -> state, exported as a per-state gauge; O(1) per update, no re-listing."""

    def __init__(self, gauge: Gauge, states: tuple[str, ...] = ()) -> None:
        self.gauge = gauge
        self.states: dict[tuple[str, str], tuple[str, ...]] = {}
        self.counts: _Tally[tuple[str, ...]] = _Tally()
        for state in states:
            self.counts[(state,)] = 0

    def set(self, key: tuple[str, str], *labels: str) -> None:
        old = self.states.get(key)
        if old == labels:
            return
        if old is not None:
            self.counts[old] -= 1
            self.gauge.labels(*old).set(self.counts[old])
        self.states[key] = labels
        self.counts[labels] += 1
        self.gauge.labels(*labels).set(self.counts[labels])

    def drop(self, key: tuple[str, str]) -> None:
        old = self.states.pop(key, None)
        if old is not None:
            self.counts[old] -= 1
            self.gauge.labels(*old).set(self.counts[old])


RUN_TALLY = StateTally(RUNS, RUN_STATES)
ADAPTER_TALLY = StateTally(ADAPTERS)


def set_progress(namespace: str, run: str, ratio: float | None, loss: float | None) -> None:
    """Per-run series exist only while a stage runs (``ratio`` None removes them)."""
    if ratio is None:
        for gauge in (RUN_PROGRESS, RUN_LOSS):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, run)
        return
    RUN_PROGRESS.labels(namespace, run).set(ratio)
    if loss is not None:
        RUN_LOSS.labels(namespace, run).set(loss)


_DRIFT_SERIES: dict[tuple[str, str], set[tuple[str, str]]] = {}
DRIFT_REFERENCES = {"klToParent": "parent", "klToBase": "base"}


def set_drift(namespace: str, run: str, stages: list[dict[str, Any]]) -> None:
    """One series per (stage, reference) of a run's status; a run's series go with it (``[]``)."""
    wanted = {
        (str(s.get("name")), ref): float(s["drift"][field])
        for s in stages
        for field, ref in DRIFT_REFERENCES.items()
        if isinstance(s.get("drift"), dict) and isinstance(s["drift"].get(field), int | float)
    }
    for stage, ref in _DRIFT_SERIES.get((namespace, run), set()) - set(wanted):
        with contextlib.suppress(KeyError):
            STAGE_DRIFT.remove(namespace, run, stage, ref)
    for (stage, ref), value in wanted.items():
        STAGE_DRIFT.labels(namespace, run, stage, ref).set(value)
    if wanted:
        _DRIFT_SERIES[(namespace, run)] = set(wanted)
    else:
        _DRIFT_SERIES.pop((namespace, run), None)
