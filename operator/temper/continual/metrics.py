"""Continual-learning metrics; label cardinality is bounded by runs x suites (gates <= 16 per run).

- ``temper_gate_failures_total{suite}``: gates that failed, per suite name.
- ``temper_forgetting_ratio{namespace,run,suite}``: the latest cycle's relative drop vs the
  promoted adapter (positive is worse); removed with the run.
- ``temper_run_generation{namespace,run}``: the promoted cycle number; removed with the run.

The series are the operator's own (``temper.metrics``) when it defines them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class ContinualMetrics:
    gate_failures: Counter
    forgetting: Gauge
    generation: Gauge


@cache
def continual_metrics(registry: CollectorRegistry | None = None) -> ContinualMetrics:
    """The operator's own series when ``temper.metrics`` defines them, else new ones on ``registry``."""
    if registry is None:
        try:
            ops = importlib.import_module("temper.metrics")
        except ImportError:
            ops = None
        found = [getattr(ops, n, None) for n in ("GATE_FAILURES", "FORGETTING", "RUN_GENERATION")]
        if isinstance(found[0], Counter) and isinstance(found[1], Gauge) and isinstance(found[2], Gauge):
            return ContinualMetrics(found[0], found[1], found[2])
    target = registry if registry is not None else DEFAULT_REGISTRY
    return ContinualMetrics(
        gate_failures=Counter(
            "temper_gate_failures_total",
            "Regression gates that failed, by suite.",
            ["suite"],
            registry=target,
        ),
        forgetting=Gauge(
            "temper_forgetting_ratio",
            "Latest cycle's relative drop of a suite's metric vs the promoted adapter (positive is worse).",
            ["namespace", "run", "suite"],
            registry=target,
        ),
        generation=Gauge(
            "temper_run_generation",
            "The promoted cycle of a continual run.",
            ["namespace", "run"],
            registry=target,
        ),
    )


def record(
    metrics: ContinualMetrics,
    *,
    namespace: str,
    run: str,
    forgetting: Mapping[str, float],
    gate_failures: list[str],
    generation: int,
) -> None:
    for suite, value in forgetting.items():
        metrics.forgetting.labels(namespace, run, suite).set(value)
    for suite in gate_failures:
        metrics.gate_failures.labels(suite).inc()
    if generation:
        metrics.generation.labels(namespace, run).set(generation)


def forget_run(metrics: ContinualMetrics, *, namespace: str, run: str, suites: list[str]) -> None:
    """Drop a deleted run's series so cardinality stays bounded."""
    for suite in suites:
        with contextlib.suppress(KeyError):
            metrics.forgetting.remove(namespace, run, suite)
    with contextlib.suppress(KeyError):
        metrics.generation.remove(namespace, run)
