"""An eval stage's regression gates, its results for the evaluated Adapter, and stages' drift (pure).

Each suite with ``maxRegression`` was measured by the trainer on the evaluated model and on the
baseline in the same stage (the evaluated adapter's parent, else the base model). The relative
drop (``temper.continual.gates.forgetting``: positive is worse, whatever the metric's direction)
above ``maxRegression`` fails the stage with reason ``RegressionGateFailed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from temper.api.contract import SuiteResult
from temper.continual.gates import HIGHER_IS_BETTER, LOWER_IS_BETTER, forgetting

GATE_FAILED = "RegressionGateFailed"
GATES_PASSED = "RegressionGatesPassed"
EvalOutcome = Literal["Passed", "Failed", "NoBaseline", "Reported"]
DRIFT_KEYS = {"drift/kl_to_parent": "klToParent", "drift/kl_to_base": "klToBase"}


@dataclass(frozen=True)
class SuiteVerdict:
    result: SuiteResult
    regression: float | None
    outcome: EvalOutcome

    def describe(self) -> str:
        """Suite, metric, baseline, value and threshold, in one clause."""
        r = self.result
        if self.outcome == "Reported":
            return f"suite {r.suite} {r.metric}={r.value:.4g}"
        if self.outcome == "NoBaseline":
            return f"suite {r.suite} {r.metric}={r.value:.4g} (no baseline: the base model evaluated itself)"
        if not math.isfinite(r.value):
            return f"suite {r.suite} {r.metric}={r.value} is not a number (baseline {r.baseline})"
        verb = "exceeds" if self.outcome == "Failed" else "within"
        drop, limit = 100 * (self.regression or 0.0), 100 * (r.max_regression or 0.0)
        wins = "" if r.win_rate is None else f", win rate {r.win_rate:.3g}"
        return (
            f"suite {r.suite} {r.metric}: baseline {r.baseline:.4g} ({r.baseline_source}) -> {r.value:.4g}, "
            f"drop {drop:.2f}% {verb} maxRegression {limit:.2f}%{wins}"
        )


def verdicts(results: list[SuiteResult]) -> list[SuiteVerdict]:
    out = []
    for r in results:
        if r.max_regression is None:
            out.append(SuiteVerdict(r, None, "Reported"))
        elif not math.isfinite(r.value):  # a NaN or infinite metric is the worst regression
            out.append(SuiteVerdict(r, None, "Failed"))
        elif r.baseline is None or not math.isfinite(r.baseline):
            out.append(SuiteVerdict(r, None, "NoBaseline"))
        elif r.metric not in LOWER_IS_BETTER | HIGHER_IS_BETTER:  # no known direction: report only
            out.append(SuiteVerdict(r, None, "Reported"))
        else:
            drop = forgetting(r.metric, r.baseline, r.value)
            # A hair of tolerance so that an unchanged metric passes a zero-regression gate.
            failed = drop > r.max_regression + 1e-12
            out.append(SuiteVerdict(r, drop, "Failed" if failed else "Passed"))
    return out


def gate_message(found: list[SuiteVerdict]) -> str:
    """The stage's message: the failed gates, else the passed ones ("" without gates)."""
    failed = [v for v in found if v.outcome == "Failed"]
    shown = failed or [v for v in found if v.outcome == "Passed"]
    if not shown:
        return ""
    head = "regression gate failed: " if failed else "regression gates passed: "
    return head + "; ".join(v.describe() for v in shown)


def adapter_evals(
    found: list[SuiteVerdict], *, run: str, stage: str, cycle: int, time: str | None
) -> dict[str, dict[str, Any]]:
    """The evaluated Adapter's ``status.evals`` entries, keyed by suite."""
    out: dict[str, dict[str, Any]] = {}
    for v in found:
        r = v.result
        entry: dict[str, Any] = {
            "metric": r.metric,
            "value": r.value if math.isfinite(r.value) else None,  # JSON has no NaN
            "examples": r.examples,
            "baseline": r.baseline if r.baseline is not None and math.isfinite(r.baseline) else None,
            "baselineSource": r.baseline_source,
            "maxRegression": r.max_regression,
            "regression": None if v.regression is None else round(v.regression, 6),
            "winRate": r.win_rate,
            "outcome": v.outcome,
            "run": run,
            "stage": stage,
            "cycle": cycle,
            "time": time,
        }
        out[r.suite] = {k: val for k, val in entry.items() if val is not None}
    return out


def stage_drift(metrics: dict[str, float]) -> dict[str, Any] | None:
    """``status.stages[].drift`` from the trainer's drift/* and suite/*/kl_to_reference metrics."""
    drift: dict[str, Any] = {out: metrics[key] for key, out in DRIFT_KEYS.items() if key in metrics}
    suites = {
        key.split("/")[1]: value
        for key, value in metrics.items()
        if key.startswith("suite/") and key.endswith("/kl_to_reference") and key.count("/") == 2
    }
    if suites:
        drift["suites"] = suites
    return drift or None
