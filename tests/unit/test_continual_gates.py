"""Regression gates: forgetting math per metric direction, thresholds, messages with numbers."""

from __future__ import annotations

import pytest
from temper.continual.gates import Gate, GateError, evaluate, forgetting

pytestmark = pytest.mark.unit


def test_forgetting_direction_per_metric() -> None:
    assert forgetting("exact_match", 0.80, 0.60) == pytest.approx(0.25)
    assert forgetting("exact_match", 0.60, 0.80) == pytest.approx(-1 / 3)  # improvement is negative
    assert forgetting("loss", 0.50, 0.75) == pytest.approx(0.5)  # loss up 50% = worse
    assert forgetting("perplexity", 4.0, 3.0) == pytest.approx(-0.25)
    assert forgetting("preference_accuracy", 0.9, 0.9) == 0.0
    assert forgetting("exact_match", 0.0, 0.1) == pytest.approx(-0.1)  # zero baseline: absolute
    with pytest.raises(GateError, match="no known direction"):
        forgetting("bleu", 1.0, 1.0)


def test_evaluate_pass_fail_and_message_numbers() -> None:
    gates = [Gate("old-tasks", "exact_match", 0.05), Gate("heldout", "loss", 0.10)]
    baseline = {"suite/old-tasks/exact_match": 0.80, "suite/heldout/loss": 0.50}
    report = evaluate(gates, {"suite/old-tasks/exact_match": 0.78, "suite/heldout/loss": 0.60}, baseline)
    assert not report.passed
    assert report.outcome == "Failed"
    assert [r.outcome for r in report.results] == ["Passed", "Failed"]
    assert report.results[0].forgetting == pytest.approx(0.025)
    assert report.results[1].forgetting == pytest.approx(0.2)
    message = report.message()
    assert message.startswith("gates failed: ")
    assert "heldout/loss 0.5 -> 0.6: forgetting 20.00% exceeds maxRegression 10.00%" in message
    assert "old-tasks" not in message  # only failures are named when some fail
    status = report.results[1].to_status()
    assert status == {
        "suite": "heldout",
        "metric": "loss",
        "outcome": "Failed",
        "baseline": 0.5,
        "current": 0.6,
        "forgetting": 0.2,
    }


def test_zero_max_regression_allows_equal_but_not_worse() -> None:
    gate = [Gate("a", "exact_match", 0.0)]
    assert evaluate(gate, {"suite/a/exact_match": 0.5}, {"suite/a/exact_match": 0.5}).passed
    assert not evaluate(gate, {"suite/a/exact_match": 0.499}, {"suite/a/exact_match": 0.5}).passed


def test_no_baseline_passes_and_missing_result_fails() -> None:
    gates = [Gate("a", "loss", 0.1)]
    first = evaluate(gates, {"suite/a/loss": 1.2}, None)
    assert first.passed
    assert first.results[0].outcome == "NoBaseline"
    assert "no promoted baseline" in first.message()
    missing = evaluate(gates, {}, {"suite/a/loss": 1.0})
    assert not missing.passed
    assert missing.results[0].outcome == "Missing"
    assert "no result from the eval stage" in missing.message()
    nan = evaluate(gates, {"suite/a/loss": float("nan")}, {"suite/a/loss": 1.0})
    assert nan.results[0].outcome == "Missing"


def test_no_gates_is_skipped() -> None:
    assert evaluate([], {"suite/a/loss": 1.0}, None).outcome == "Skipped"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"metric": "loss"}, r"gates\[0\]\.suite: required"),
        ({"suite": "a", "metric": "bleu"}, r"gates\[0\]\.metric: 'bleu'"),
        ({"suite": "a", "metric": "loss", "maxRegression": -0.1}, r"gates\[0\]\.maxRegression"),
        ({"suite": "a", "metric": "loss", "maxRegression": "5%"}, r"gates\[0\]\.maxRegression"),
    ],
)
def test_gate_validation_names_the_field(raw: dict[str, object], match: str) -> None:
    with pytest.raises(GateError, match=match):
        Gate.from_dict(raw, "spec.continual.gates[0]")


def test_metrics_record_and_forget() -> None:
    from prometheus_client import CollectorRegistry
    from temper.continual.metrics import continual_metrics, forget_run, record

    registry = CollectorRegistry()
    m = continual_metrics(registry)
    record(m, namespace="ml", run="bot", forgetting={"arith": 0.25}, gate_failures=["arith"], generation=3)
    assert (
        registry.get_sample_value(
            "temper_forgetting_ratio", {"namespace": "ml", "run": "bot", "suite": "arith"}
        )
        == 0.25
    )
    assert registry.get_sample_value("temper_gate_failures_total", {"suite": "arith"}) == 1.0
    assert registry.get_sample_value("temper_run_generation", {"namespace": "ml", "run": "bot"}) == 3.0
    forget_run(m, namespace="ml", run="bot", suites=["arith"])
    assert (
        registry.get_sample_value(
            "temper_forgetting_ratio", {"namespace": "ml", "run": "bot", "suite": "arith"}
        )
        is None
    )
    assert registry.get_sample_value("temper_run_generation", {"namespace": "ml", "run": "bot"}) is None
    # Without a registry the operator's own series (temper.metrics) are reused, not duplicated.
    from temper import metrics as operator_metrics

    assert continual_metrics().forgetting is operator_metrics.FORGETTING
