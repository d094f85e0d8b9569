"""Eval stages in the planner: regression gates fail the stage, results land on the evaluated Adapter,
no Adapter of their own, drift per stage; the eval contract names the baseline."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from temper.api.adapter import AdapterStatus
from temper.api.contract import AdapterRef, StageContract
from temper.api.run import PostTrainingRun, PostTrainingRunStatus
from temper.builders import stage_contract
from temper.metrics import STAGE_DRIFT, set_drift
from temper.planner import Observed, plan
from temper.planner.evals import adapter_evals, gate_message, verdicts

from tests.unit.test_planner import CONFIG, NOW, conds, job, ready_adapter, sample_run

pytestmark = pytest.mark.unit

SFT = "s3://bucket/runs/r1/g1/sft/manifest.json"
ALIGN = "s3://bucket/runs/r1/g1/align/manifest.json"


def gated_run(max_regression: float = 0.05, **labels: str) -> dict[str, Any]:
    run = sample_run()
    run["spec"]["stages"][2]["suites"] = [
        {"name": "old", "dataset": "heldout", "metric": "exact_match", "maxRegression": max_regression},
        {"name": "ppl", "dataset": "heldout", "metric": "loss"},
    ]
    if labels:
        run["metadata"]["labels"] = labels
    return run


def eval_result(value: float, baseline: float) -> dict[str, Any]:
    return {
        "manifestUri": "s3://bucket/runs/r1/g1/regress/manifest.json",
        "metrics": {"suite/old/exact_match": value, "suite/ppl/loss": 1.5},
        "evals": [
            {
                "suite": "old",
                "metric": "exact_match",
                "value": value,
                "examples": 40,
                "maxRegression": 0.05,
                "baseline": baseline,
                "baselineSource": "adapter r1-sft-g1",
            },
            {"suite": "ppl", "metric": "loss", "value": 1.5, "examples": 40},
        ],
    }


def finished_plan(
    run: dict[str, Any], value: float, baseline: float, prev: dict[str, Any] | None = None
) -> Any:
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": SFT, "metrics": {"drift/kl_to_base": 0.2}}),
        job(
            "align",
            outcome="Complete",
            result={"manifestUri": ALIGN, "metrics": {"drift/kl_to_parent": 0.03, "drift/kl_to_base": 0.25}},
        ),
        job("regress", outcome="Complete", result=eval_result(value, baseline)),
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"))}
    if prev is not None:
        run = copy.deepcopy(run)
        run["status"] = prev
    return plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG)


def test_a_drop_beyond_max_regression_fails_the_stage_naming_suite_metric_baseline_value_threshold() -> None:
    p = finished_plan(gated_run(), 0.90, 0.95)
    assert p.phase == "Failed"
    regress = p.status["stages"][2]
    assert regress["state"] == "Failed"
    assert "adapter" not in regress  # an eval stage publishes no Adapter
    assert all(obj["kind"] != "Adapter" for obj in p.create)
    expected = (
        "regression gate failed: suite old exact_match: baseline 0.95 (adapter r1-sft-g1) -> 0.9, "
        "drop 5.26% exceeds maxRegression 5.00%"
    )
    assert regress["message"] == expected
    c = {c["type"]: c for c in p.status["conditions"]}
    assert c["Failed"]["message"] == f"stage regress failed: {expected}"
    assert (c["Stalled"]["status"], c["Stalled"]["reason"]) == ("True", "RegressionGateFailed")
    events = {e.reason: e for e in p.events}
    assert events["RegressionGateFailed"].type == "Warning"
    assert events["RegressionGateFailed"].message == f"stage regress: {expected}"
    assert events["StageFailed"].message == f"stage regress: {expected}"
    assert [(t.stage_type, t.result, t.reason) for t in p.transitions if t.result == "Failed"] == [
        ("eval", "Failed", "RegressionGateFailed")
    ]
    PostTrainingRunStatus.model_validate(p.status)


def test_a_drop_within_max_regression_passes_and_the_results_land_on_the_evaluated_adapter() -> None:
    p = finished_plan(gated_run(), 0.925, 0.95)
    assert p.phase == "Succeeded", p.status["stages"]
    assert conds(p)["Succeeded"] == ("True", "AllStagesSucceeded")
    assert p.status["stages"][2]["message"].startswith("regression gates passed: suite old exact_match")
    assert "RegressionGatesPassed" in [e.reason for e in p.events]
    evals = p.adapter_evals["r1-align-g1"]
    assert evals == {
        "old": {
            "metric": "exact_match",
            "value": 0.925,
            "examples": 40,
            "baseline": 0.95,
            "baselineSource": "adapter r1-sft-g1",
            "maxRegression": 0.05,
            "regression": pytest.approx(0.026316, abs=1e-6),
            "outcome": "Passed",
            "run": "r1",
            "stage": "regress",
            "cycle": 1,
            "time": "2026-11-26T11:59:00Z",
        },
        "ppl": {
            "metric": "loss",
            "value": 1.5,
            "examples": 40,
            "outcome": "Reported",
            "run": "r1",
            "stage": "regress",
            "cycle": 1,
            "time": "2026-11-26T11:59:00Z",
        },
    }
    AdapterStatus.model_validate({"evals": evals})
    # The next pass plans the same: no new events, the same desired evals (no write).
    again = finished_plan(gated_run(), 0.925, 0.95, prev=p.status)
    assert not [e for e in again.events if e.reason.startswith("Regression")]
    assert again.adapter_evals == p.adapter_evals


def test_the_verdict_survives_the_pod_going_away() -> None:
    failed = finished_plan(gated_run(), 0.5, 0.95)
    run = copy.deepcopy(gated_run())
    run["status"] = failed.status
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": SFT}),
        job("align", outcome="Complete", result={"manifestUri": ALIGN}),
        job("regress", outcome="Complete"),  # no pod, no termination message
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"))}
    p = plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG)
    assert p.phase == "Failed"
    assert p.status["stages"][2]["message"].startswith("regression gate failed")
    assert not p.events


def test_in_a_continual_cycle_a_failed_gate_reports_and_the_promotion_gates_decide() -> None:
    p = finished_plan(gated_run(**{"temper.dev/continual-run": "bot"}), 0.5, 0.95)
    assert p.phase == "Succeeded"
    assert p.status["stages"][2]["message"].endswith("; in a continual cycle the promotion gates decide")
    assert p.adapter_evals["r1-align-g1"]["old"]["outcome"] == "Failed"


def test_zero_baseline_and_lower_is_better_metrics() -> None:
    from temper.api.contract import SuiteResult

    def one(metric: str, value: float, baseline: float, limit: float) -> str:
        result = SuiteResult(suite="s", metric=metric, value=value, baseline=baseline, max_regression=limit)
        return verdicts([result])[0].outcome

    assert one("loss", 1.1, 1.0, 0.05) == "Failed"  # loss up 10%
    assert one("loss", 0.9, 1.0, 0.0) == "Passed"
    assert one("exact_match", 0.0, 0.0, 0.0) == "Passed"
    assert one("loss", float("nan"), 1.0, 10.0) == "Failed"
    assert one("a_metric_without_direction", 0.1, 1.0, 0.0) == "Reported"
    nan = SuiteResult(suite="s", metric="loss", value=float("nan"), baseline=1.0, max_regression=0.1)
    assert "is not a number" in gate_message(verdicts([nan]))  # unchanged passes a zero-regression gate
    no_baseline = SuiteResult(suite="s", metric="exact_match", value=0.3, max_regression=0.1)
    assert verdicts([no_baseline])[0].outcome == "NoBaseline"


def test_a_diverged_eval_fails_and_its_status_stays_valid_json() -> None:
    import json

    from temper.api.contract import StageResult

    result = eval_result(float("nan"), 0.95)
    result["evals"][0]["value"] = float("nan")
    wire = StageResult.model_validate(result).model_dump_json(by_alias=True)  # the trainer's message
    assert '"NaN"' in wire
    run = gated_run()
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": SFT}),
        job("align", outcome="Complete", result={"manifestUri": ALIGN}),
        job("regress", outcome="Complete", result=json.loads(wire)),
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"))}
    p = plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG)
    assert p.phase == "Failed"
    assert "suite old exact_match=nan is not a number" in p.status["stages"][2]["message"]
    json.dumps([p.status, p.adapter_evals], allow_nan=False)
    assert "value" not in p.adapter_evals["r1-align-g1"]["old"]


def test_drift_per_stage_in_status_and_as_a_metric() -> None:
    p = finished_plan(gated_run(), 0.925, 0.95)
    stages = {s["name"]: s for s in p.status["stages"]}
    assert stages["sft"]["drift"] == {"klToBase": 0.2}
    assert stages["align"]["drift"] == {"klToParent": 0.03, "klToBase": 0.25}
    assert "drift" not in stages["regress"]
    set_drift("ml", "r1", p.status["stages"])
    assert STAGE_DRIFT.labels("ml", "r1", "align", "parent")._value.get() == 0.03
    set_drift("ml", "r1", [])
    names = {s.labels.get("run") for m in STAGE_DRIFT.collect() for s in m.samples}
    assert "r1" not in names


def test_eval_contract_names_the_evaluated_adapters_parent_as_baseline() -> None:
    run = gated_run()
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": SFT}),
        job("align", outcome="Complete", result={"manifestUri": ALIGN}),
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"))}
    p = plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG)
    (created,) = [o for o in p.create if o["kind"] == "Job"]
    env = {e["name"]: e.get("value") for e in created["spec"]["template"]["spec"]["containers"][0]["env"]}
    contract = StageContract.from_env(env["TEMPER_STAGE_CONTRACT"])
    assert contract.parent is not None
    assert contract.parent.name == "r1-align-g1"
    assert contract.baseline is not None
    assert contract.baseline.name == "r1-sft-g1"
    # An eval of an SFT stage trained from the base model compares against the base model.
    run["spec"]["stages"][2]["from"] = "sft"
    model = PostTrainingRun.model_validate(run)
    outputs = {"sft": AdapterRef(name="r1-sft-g1", manifest_uri=SFT)}
    contract = stage_contract(
        model, model.spec.stages[2], cycle=1, attempt=1, config=CONFIG, stage_outputs=outputs
    )
    assert contract.parent == outputs["sft"]
    assert contract.baseline is None


def test_a_cycle_carries_the_drift_of_the_stage_that_produced_its_adapter() -> None:
    from temper.continual.cycle import cycle_drift

    child = {
        "status": {
            "stages": [
                {"name": "sft", "adapter": "bot-g2-sft-g1", "drift": {"klToParent": 0.04, "klToBase": 0.3}},
                {"name": "regress", "state": "Succeeded"},
            ]
        }
    }
    assert cycle_drift(child, "bot-g2-sft-g1") == {"klToParent": 0.04, "klToBase": 0.3}
    assert cycle_drift(child, None) is None


def _judge_run(judge: dict[str, str]) -> dict[str, Any]:
    run = gated_run()
    run["spec"]["datasets"].append(
        {"name": "asks", "uri": "builtin://arith?n=8&split=eval", "format": "prompt"}
    )
    run["spec"]["stages"][2]["suites"].append(
        {"name": "taste", "dataset": "asks", "metric": "judge", "judge": judge, "maxRegression": 0.1}
    )
    return run


def _eval_contract(p: Any) -> StageContract:
    (created,) = [o for o in p.create if o["kind"] == "Job"]
    env = {e["name"]: e.get("value") for e in created["spec"]["template"]["spec"]["containers"][0]["env"]}
    return StageContract.from_env(env["TEMPER_STAGE_CONTRACT"])


def test_a_judge_suite_waits_for_its_reward_model_adapter_and_carries_its_manifest() -> None:
    run = _judge_run({"adapter": "rm-v1"})
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": SFT}),
        job("align", outcome="Complete", result={"manifestUri": ALIGN}),
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"))}
    waiting = plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG)
    assert not [o for o in waiting.create if o["kind"] == "Job"]  # not Ready (or absent): no Job
    regress = waiting.status["stages"][2]
    assert regress["message"] == "spec.stages[2].suites[2].judge: Adapter 'rm-v1' not found or not Ready"
    rm = AdapterRef(name="rm-v1", manifest_uri="s3://bucket/adapters/rm-v1/manifest.json")
    observed = Observed(jobs=jobs, adapters=adapters, external_adapters={"rm-v1": rm})
    contract = _eval_contract(plan(run, observed, NOW, CONFIG))
    taste = contract.suites[2]
    assert (taste.metric, taste.judge, taste.max_regression) == ("judge", rm, 0.1)
    assert [s.judge for s in contract.suites[:2]] == [None, None]


def test_a_judge_suite_names_an_earlier_reward_model_stage() -> None:
    run = _judge_run({"stage": "rm"})
    run["spec"]["stages"].insert(2, {"name": "rm", "type": "reward-model", "data": {"train": ["prefs"]}})
    rm_uri = "s3://bucket/runs/r1/g1/rm/manifest.json"
    jobs = [
        job("sft", outcome="Complete", result={"manifestUri": SFT}),
        job("align", outcome="Complete", result={"manifestUri": ALIGN}),
        job("rm", outcome="Complete", result={"manifestUri": rm_uri}),
    ]
    adapters = {a.name: a for a in (ready_adapter("sft"), ready_adapter("align"), ready_adapter("rm"))}
    contract = _eval_contract(plan(run, Observed(jobs=jobs, adapters=adapters), NOW, CONFIG))
    assert contract.suites[2].judge == AdapterRef(name="r1-rm-g1", manifest_uri=rm_uri)


def test_a_judge_gate_fails_on_a_lower_mean_reward_and_reports_the_win_rate() -> None:
    from temper.api.contract import SuiteResult

    result = SuiteResult(
        suite="taste",
        metric="judge",
        value=0.4,
        baseline=0.5,
        baseline_source="adapter r1-sft-g1",
        max_regression=0.1,
        win_rate=0.25,
    )
    found = verdicts([result])
    assert found[0].outcome == "Failed"
    assert gate_message(found) == (
        "regression gate failed: suite taste judge: baseline 0.5 (adapter r1-sft-g1) -> 0.4, "
        "drop 20.00% exceeds maxRegression 10.00%, win rate 0.25"
    )
    entry = adapter_evals(found, run="r1", stage="regress", cycle=1, time=None)["taste"]
    assert entry["winRate"] == 0.25
    AdapterStatus.model_validate({"evals": {"taste": entry}})
