"""Regression gates: each suite's metric vs the currently promoted adapter's.

Forgetting is the *relative drop* from the baseline, signed so that positive is worse whatever
the metric's direction::

    higher is better (exact_match, preference_accuracy, distinct_n, safety, robustness, judge):
        (baseline - current) / |baseline|
    lower is better (loss, perplexity, self_bleu, kl_to_reference): (current - baseline) / |baseline|

With a zero baseline the relative drop is undefined; the absolute difference is used instead.
A gate fails when forgetting > maxRegression (a maxRegression of 0 tolerates no drop at all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

LOWER_IS_BETTER = frozenset({"loss", "perplexity", "self_bleu", "kl_to_reference"})
HIGHER_IS_BETTER = frozenset(
    {"exact_match", "preference_accuracy", "distinct_n", "safety", "robustness", "judge"}
)

GateOutcome = Literal["Passed", "Failed", "NoBaseline", "Missing"]


class GateError(ValueError):
    """A gate refers to something that cannot be evaluated; the message names the field."""


@dataclass(frozen=True)
class Gate:
    suite: str
    metric: str
    max_regression: float

    @property
    def key(self) -> str:
        """The metric key the eval stage reports (``suite/<name>/<metric>``)."""
        return f"suite/{self.suite}/{self.metric}"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> Gate:
        suite, metric = raw.get("suite") or raw.get("name"), raw.get("metric")
        if not isinstance(suite, str) or not suite:
            raise GateError(f"{where}.suite: required")
        if metric not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
            raise GateError(
                f"{where}.metric: {metric!r} is not one of {sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER)}"
            )
        max_regression = raw.get("maxRegression", 0.0)
        if (
            not isinstance(max_regression, int | float)
            or isinstance(max_regression, bool)
            or max_regression < 0
        ):
            raise GateError(f"{where}.maxRegression: must be a number >= 0, got {max_regression!r}")
        return cls(suite, str(metric), float(max_regression))


@dataclass(frozen=True)
class GateResult:
    suite: str
    metric: str
    baseline: float | None
    current: float | None
    forgetting: float | None
    max_regression: float
    outcome: GateOutcome

    @property
    def passed(self) -> bool:
        return self.outcome in ("Passed", "NoBaseline")

    def describe(self) -> str:
        if self.outcome == "Missing":
            return f"{self.suite}/{self.metric}: no result from the eval stage"
        if self.outcome == "NoBaseline":
            return f"{self.suite}/{self.metric}={_fmt(self.current)} (no promoted baseline)"
        verb = "exceeds" if self.outcome == "Failed" else "within"
        return (
            f"{self.suite}/{self.metric} {_fmt(self.baseline)} -> {_fmt(self.current)}: "
            f"forgetting {_pct(self.forgetting)} {verb} maxRegression {_pct(self.max_regression)}"
        )

    def to_status(self) -> dict[str, Any]:
        """The run's ``status.cycles[].gateResults[]`` entry (the message carries maxRegression)."""
        out: dict[str, Any] = {"suite": self.suite, "metric": self.metric, "outcome": self.outcome}
        for key, value in (
            ("baseline", self.baseline),
            ("current", self.current),
            ("forgetting", self.forgetting),
        ):
            if value is not None:
                out[key] = round(value, 6)
        return out


@dataclass(frozen=True)
class GateReport:
    results: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def outcome(self) -> Literal["Passed", "Failed", "Skipped"]:
        if not self.results:
            return "Skipped"
        return "Passed" if self.passed else "Failed"

    def message(self) -> str:
        shown = self.failures or self.results
        head = "gates failed: " if self.failures else "gates passed: "
        return head + "; ".join(r.describe() for r in shown)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def forgetting(metric: str, baseline: float, current: float) -> float:
    """Relative drop from ``baseline`` to ``current``; positive means worse."""
    if metric in LOWER_IS_BETTER:
        drop = current - baseline
    elif metric in HIGHER_IS_BETTER:
        drop = baseline - current
    else:
        raise GateError(f"metric: {metric!r} has no known direction")
    return drop / abs(baseline) if baseline != 0 else drop


def evaluate(
    gates: Sequence[Gate], current: Mapping[str, float], baseline: Mapping[str, float] | None
) -> GateReport:
    """Evaluate every gate; ``baseline`` None means nothing is promoted yet (all NoBaseline)."""
    results: list[GateResult] = []
    for gate in gates:
        value = current.get(gate.key)
        if value is None or not math.isfinite(value):
            results.append(
                GateResult(gate.suite, gate.metric, None, None, None, gate.max_regression, "Missing")
            )
            continue
        base = None if baseline is None else baseline.get(gate.key)
        if base is None or not math.isfinite(base):
            results.append(
                GateResult(gate.suite, gate.metric, None, value, None, gate.max_regression, "NoBaseline")
            )
            continue
        drop = forgetting(gate.metric, base, value)
        # A hair of tolerance so that an unchanged metric passes a zero-regression gate.
        outcome: GateOutcome = "Failed" if drop > gate.max_regression + 1e-12 else "Passed"
        results.append(GateResult(gate.suite, gate.metric, base, value, drop, gate.max_regression, outcome))
    return GateReport(tuple(results))
