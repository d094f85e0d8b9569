"""The planner's stage functions one by one: each state of a stage's latest Job, pure, no cluster."""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from temper.api.run import PostTrainingRun
from temper.planner import Observed, ObservedAdapter, plan
from temper.planner.plan import _Ctx, _finish, _plan_stage, _run_conditions, _walk

from tests.unit.test_planner import CONFIG, NOW, job, sample_run

pytestmark = pytest.mark.unit


def _ctx(observed: Observed | None = None, **spec: object) -> _Ctx:
    raw = sample_run(**spec)
    run = PostTrainingRun.model_validate({"metadata": raw["metadata"], "spec": raw["spec"]})
    return _Ctx(run, observed or Observed(), NOW, CONFIG)


def _sft(ctx: _Ctx) -> object:
    return ctx.spec.stages[0]


def test_no_job_yet_creates_attempt_one() -> None:
    ctx = _ctx()
    result = _plan_stage(ctx, _sft(ctx), [], {}, {})
    assert [o["kind"] for o in result.create] == ["Job"]
    assert (result.view.state, result.view.attempts, result.running) == ("Running", 1, True)


def test_suspended_run_creates_nothing() -> None:
    ctx = _ctx(suspend=True)
    result = _plan_stage(ctx, _sft(ctx), [], {}, {})
    assert result.create == []
    assert (result.view.state, result.view.message) == ("Pending", "run suspended")


def test_active_job_runs_and_a_suspend_patches_it() -> None:
    ctx = _ctx(suspend=True)
    result = _plan_stage(ctx, _sft(ctx), [job("sft")], {}, {})
    assert result.job_patches == [(job("sft").name, {"spec": {"suspend": True}})]
    assert result.running


def test_failed_job_waits_out_its_backoff_then_retries() -> None:
    ctx = _ctx()
    recent = job("sft", outcome="Failed", reason="BackoffLimitExceeded", finished=NOW - timedelta(seconds=4))
    waiting = _plan_stage(ctx, _sft(ctx), [recent], {}, {})
    assert waiting.create == []
    assert waiting.requeue == pytest.approx(6.0)
    old = job("sft", outcome="Failed", reason="BackoffLimitExceeded", finished=NOW - timedelta(minutes=5))
    retry = _plan_stage(ctx, _sft(ctx), [old], {}, {})
    assert retry.next_attempt == 2
    assert retry.retries == ["sft"]
    assert [o["kind"] for o in retry.create] == ["Job"]


def test_completed_job_publishes_then_succeeds_on_a_ready_adapter() -> None:
    done = job("sft", outcome="Complete", result={"manifestUri": "s3://bucket/m.json", "metrics": {}})
    ctx = _ctx()
    publishing = _plan_stage(ctx, _sft(ctx), [done], {}, {})
    assert [o["kind"] for o in publishing.create] == ["Adapter"]
    assert publishing.view.state == "Running"
    adapter = ObservedAdapter(
        name="r1-sft-g1",
        ready="True",
        reason="ArtifactVerified",
        message="",
        manifest_uri="s3://bucket/m.json",
    )
    ctx = _ctx(Observed(adapters={"r1-sft-g1": adapter}))
    outputs: dict[str, object] = {}
    ok = _plan_stage(ctx, _sft(ctx), [done], {}, outputs)  # type: ignore[arg-type]
    assert ok.view.state == "Succeeded"
    assert "sft" in outputs
    assert [t.result for t in ok.transitions] == ["Succeeded"]


def test_walk_waits_behind_the_first_unfinished_stage_and_skips_after_a_failure() -> None:
    ctx = _ctx(Observed(jobs=[job("sft")]))
    assert [v.state for v in _walk(ctx, {}).views] == ["Running", "Pending", "Pending"]
    failed = job("sft", outcome="Failed", reason="PodFailurePolicy")
    ctx = _ctx(Observed(jobs=[failed]))
    walk = _walk(ctx, {})
    assert [v.state for v in walk.views] == ["Failed", "Skipped", "Skipped"]
    assert walk.failed is not None


def test_finish_emits_the_run_event_once_per_phase_change() -> None:
    run = sample_run()
    conds = _run_conditions("succeeded", "Succeeded", "all done")
    first = _finish(run, Observed(), NOW, plan(run, Observed(), NOW, CONFIG), ("Succeeded", conds, [], None))
    assert [e.reason for e in first.events][-1] == "RunSucceeded"
    again = {**run, "status": first.status}
    second = _finish(again, Observed(), NOW, type(first)(), ("Succeeded", conds, [], None))
    assert second.events == []


def test_plan_leaves_its_input_untouched() -> None:
    run = sample_run()
    observed = Observed(jobs=[job("sft", outcome="Failed", reason="BackoffLimitExceeded")])
    before = copy.deepcopy(run)
    plan(run, observed, NOW, CONFIG)
    assert run == before
