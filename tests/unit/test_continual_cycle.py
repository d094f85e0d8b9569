"""The continual planner: cycles start on schedule or trigger, gates decide promotion, history bounds."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temper.builders.contract import PARENT_ADAPTER_ANNOTATION
from temper.continual.cycle import (
    CYCLE_LABEL,
    NEW_DATA_ANNOTATION,
    PARENT_LABEL,
    TRIGGER_ANNOTATION,
    plan,
    render_child,
    started_entry,
)
from temper.continual.data_selection import NewDataSpec, ObjectInfo, Selection, Watermark, select_new_objects
from temper.continual.replay import ReplayBuffer, Segment
from temper.continual.schedule import FakeClock
from temper.continual.spec import ContinualSpecError, parse_continual

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


def run_obj(**continual: Any) -> dict[str, Any]:
    spec = {
        "baseModel": {"uri": "builtin://tiny"},
        "storage": {"uri": "s3://adapters/bot/", "secretRef": {"name": "s3"}},
        "datasets": [
            {
                "name": "new",
                "uri": "s3://data/placeholder.jsonl",
                "format": "prompt-completion",
                "task": "t",
            },
            {"name": "arith-eval", "uri": "builtin://arith?split=eval&n=16"},
        ],
        "stages": [
            {"name": "sft", "type": "sft", "data": {"train": ["new"]}},
            {
                "name": "regress",
                "type": "eval",
                "from": "sft",
                "suites": [
                    {"name": "arith", "dataset": "arith-eval", "metric": "loss", "maxRegression": 0.1}
                ],
            },
        ],
        "continual": {
            "schedule": "0 3 * * *",
            "timeZone": "UTC",
            "newData": {"dataset": "new", "prefix": "s3://data/in/"},
            "replay": {
                "ratio": 0.25,
                "buffer": {"uri": "s3://data/replay/", "sampling": "per-task-balanced"},
            },
            "promote": {"alias": "stable"},
            "historyLimit": 3,
            **continual,
        },
    }
    return {
        "apiVersion": "temper.dev/v1alpha1",
        "kind": "PostTrainingRun",
        "metadata": {
            "name": "bot",
            "namespace": "ml",
            "uid": "uid-1",
            "generation": 1,
            "creationTimestamp": "2026-03-01T00:00:00Z",
        },
        "spec": spec,
        "status": {},
    }


def child(gen: int, *, state: str = "running", loss: float | None = None) -> dict[str, Any]:
    conditions = []
    if state == "succeeded":
        conditions = [{"type": "Succeeded", "status": "True"}]
    elif state == "failed":
        conditions = [{"type": "Failed", "status": "True"}]
    stages: list[dict[str, Any]] = [{"name": "sft", "state": "Succeeded", "adapter": f"bot-g{gen}-sft"}]
    if loss is not None:
        metrics = {"suite/arith/loss": loss, "eval/loss": 9.0}
        stages.append({"name": "regress", "state": "Succeeded", "metrics": metrics})
    spec = copy.deepcopy(run_obj()["spec"])
    del spec["continual"]
    return {
        "metadata": {
            "name": f"bot-g{gen}",
            "labels": {PARENT_LABEL: "bot", CYCLE_LABEL: str(gen)},
            "annotations": {NEW_DATA_ANNOTATION: "new"},
        },
        "spec": spec,
        "status": {"conditions": conditions, "stages": stages},
    }


def apply(run: dict[str, Any], p: Any, *, now: datetime, with_start: bool = True) -> None:
    """What the handler does with a plan: the status patch, with the started cycle's entry."""
    started = None
    if p.start and with_start:
        sel = select_new_objects(
            NewDataSpec.from_dict({"dataset": "new", "prefix": "s3://data/in/"}),
            [ObjectInfo(f"s3://data/in/{p.start.cycle}.jsonl", "etag", now, 1)],
            Watermark(),
        )
        started = started_entry(p.start, sel, now)
    run["status"] = {**run["status"], **p.status_patch(started)}


def test_parse_rejects_bad_settings_naming_the_field() -> None:
    with pytest.raises(ContinualSpecError, match=r"spec.continual.schedule minute"):
        parse_continual(run_obj(schedule="99 * * * *")["spec"])
    with pytest.raises(ContinualSpecError, match=r"spec.continual.timeZone"):
        parse_continual(run_obj(timeZone="Nowhere/City")["spec"])
    with pytest.raises(
        ContinualSpecError, match=r"spec.continual.newData.dataset: 'tickets' is not in spec.datasets"
    ):
        parse_continual(run_obj(newData={"dataset": "tickets", "prefix": "s3://d/"})["spec"])
    with pytest.raises(ContinualSpecError, match=r"spec.continual.historyLimit"):
        parse_continual(run_obj(historyLimit=0)["spec"])
    with pytest.raises(ContinualSpecError, match=r"spec.continual.concurrencyPolicy"):
        parse_continual(run_obj(concurrencyPolicy="Never")["spec"])
    with pytest.raises(ContinualSpecError, match=r"spec.continual.promote.alias"):
        parse_continual(run_obj(promote={"requireGates": True})["spec"])
    spec = parse_continual(
        run_obj(gates=[{"suite": "extra", "metric": "exact_match", "maxRegression": 0.02}])["spec"]
    )
    assert spec is not None
    assert [(g.suite, g.metric, g.max_regression) for g in spec.gates] == [
        ("extra", "exact_match", 0.02),
        ("arith", "loss", 0.1),
    ]
    assert parse_continual({"stages": []}) is None


def test_full_cycle_story_with_a_fake_clock() -> None:
    run = run_obj()
    spec = parse_continual(run["spec"])
    assert spec is not None
    clock = FakeClock(T0 + timedelta(hours=1))

    # Not due yet: nothing starts, nextScheduleTime is 03:00.
    p = plan(run, spec, [], clock.now())
    assert p.start is None
    assert p.next_schedule_time == T0 + timedelta(hours=3)

    # 03:00: cycle 1 starts.
    clock.advance(timedelta(hours=2, seconds=1))
    p = plan(run, spec, [], clock.now())
    assert p.start is not None
    assert p.start.cycle == 1
    assert p.start.child_name == "bot-g1"
    apply(run, p, now=clock.now())
    assert run["status"]["cycles"][0]["state"] == "Running"

    # Still running: nothing new, Forbid holds back tomorrow's schedule.
    clock.advance(timedelta(days=1))
    p = plan(run, spec, [child(1)], clock.now())
    assert p.start is None
    assert not any(e.reason == "MissedSchedule" for e in p.events)

    # Cycle 1 succeeds: no baseline yet -> gates pass (NoBaseline), promoted.
    p = plan(run, spec, [child(1, state="succeeded", loss=0.50)], clock.now())
    done = p.finished[0]
    assert done.succeeded
    assert done.promote
    assert done.adapter == "bot-g1-sft"
    assert p.promoted is not None
    assert {k: p.promoted[k] for k in ("name", "adapter", "cycle")} == {
        "name": "stable",
        "adapter": "bot-g1-sft",
        "cycle": 1,
    }
    assert p.generation == 1
    # The held-back 03:00 of day 2 starts now that nothing is active.
    assert p.start is not None
    assert p.start.cycle == 2
    apply(run, p, now=clock.now())

    # Cycle 2 forgets too much: loss 0.50 -> 0.60 is 20% > 10%: blocked, stable stays at g1.
    p = plan(run, spec, [child(2, state="succeeded", loss=0.60)], clock.now())
    blocked = p.finished[0]
    assert not blocked.promote
    assert not blocked.report.passed
    assert (p.promoted or {}).get("adapter") == "bot-g1-sft"
    cond = next(c for c in p.conditions if c["type"] == "GatesPassed")
    assert cond["status"] == "False"
    assert cond["reason"] == "GateFailed"
    assert "arith/loss 0.5 -> 0.6: forgetting 20.00% exceeds maxRegression 10.00%" in cond["message"]
    assert "stable stays at bot-g1-sft" in cond["message"]
    warning = next(e for e in p.events if e.reason == "GateFailed")
    assert warning.type == "Warning"
    assert "20.00%" in warning.message
    assert p.gate_failures == ["arith"]
    assert p.forgetting["arith"] == pytest.approx(0.2)
    entry = next(c for c in p.cycles if c["cycle"] == 2)
    assert entry["gates"] == "Failed"
    assert entry["promoted"] is False
    assert entry["gateResults"][0]["baseline"] == 0.5
    assert entry["gateResults"][0]["current"] == 0.6
    apply(run, p, now=clock.now(), with_start=False)

    # Cycle 3 (triggered by annotation) is within the gate vs g1 (not vs the blocked g2): promoted.
    run["metadata"]["annotations"] = {TRIGGER_ANNOTATION: "go-3"}
    p = plan(run, spec, [child(2, state="succeeded", loss=0.60)], clock.now())
    assert p.start is not None
    assert p.start.trigger == "trigger go-3"
    apply(run, p, now=clock.now())
    p = plan(
        run,
        spec,
        [child(2, state="succeeded", loss=0.60), child(3, state="succeeded", loss=0.52)],
        clock.now(),
    )
    assert p.finished[0].promote
    assert (p.promoted or {}).get("adapter") == "bot-g3-sft"
    cond = next(c for c in p.conditions if c["type"] == "GatesPassed")
    assert cond["status"] == "True"
    assert "forgetting 4.00% within maxRegression 10.00%" in cond["message"]
    # The same trigger value never starts a second cycle.
    assert p.start is None


def test_failed_cycle_is_recorded_and_never_promotes() -> None:
    run = run_obj()
    spec = parse_continual(run["spec"])
    assert spec is not None
    now = T0 + timedelta(hours=3, seconds=1)
    p = plan(run, spec, [], now)
    apply(run, p, now=now)
    p = plan(run, spec, [child(1, state="failed")], now)
    assert p.finished[0].succeeded is False
    assert not p.finished[0].promote
    assert p.cycles[0]["state"] == "Failed"
    assert p.promoted is None
    assert p.status_patch()["phase"] == "Waiting"
    assert any(e.reason == "CycleFailed" for e in p.events)


def test_replace_policy_stops_the_active_cycle() -> None:
    run = run_obj(concurrencyPolicy="Replace")
    spec = parse_continual(run["spec"])
    assert spec is not None
    now = T0 + timedelta(hours=3, seconds=1)
    apply(run, plan(run, spec, [], now), now=now)
    later = now + timedelta(days=1)
    p = plan(run, spec, [child(1)], later)
    assert p.stop_children == ["bot-g1"]
    assert p.start is not None
    assert p.start.cycle == 2
    assert p.cycles[0]["state"] == "Replaced"
    assert "Replace" in p.cycles[0]["message"]


def test_history_is_bounded_and_old_children_are_deleted() -> None:
    run = run_obj()
    spec = parse_continual(run["spec"])
    assert spec is not None
    gate = [{"suite": "arith", "metric": "loss", "outcome": "Passed", "current": 0.5}]
    run["status"] = {
        "cycles": [{"cycle": g, "state": "Succeeded", "gateResults": gate} for g in (1, 2, 3)],
        "aliases": [{"name": "stable", "adapter": "bot-g1-sft", "cycle": 1}],
        "watermark": {"lastCycle": 3, "baseline": {"suite/arith/loss": 0.5}},
    }
    kids = [child(g, state="succeeded", loss=0.5) for g in (1, 2, 3)]
    run["metadata"]["annotations"] = {TRIGGER_ANNOTATION: "now"}
    p = plan(run, spec, kids, T0)
    assert p.start is not None
    assert p.start.cycle == 4
    assert [c["cycle"] for c in p.cycles] == [2, 3]  # room for the new one within historyLimit 3
    assert p.delete_children == ["bot-g1"]
    patch = p.status_patch(started_entry(p.start, Selection((), ()), T0))
    assert [c["cycle"] for c in patch["cycles"]] == [2, 3, 4]
    assert patch["currentCycle"] == 4
    assert patch["phase"] == "Running"
    assert patch["watermark"]["lastCycle"] == 4


def test_baseline_survives_the_promoted_cycle_leaving_the_history() -> None:
    run = run_obj()
    spec = parse_continual(run["spec"])
    assert spec is not None
    run["status"] = {
        "cycles": [{"cycle": 7, "state": "Running"}],
        "aliases": [{"name": "stable", "adapter": "bot-g1-sft", "cycle": 1}],
        "watermark": {"lastCycle": 7, "baseline": {"suite/arith/loss": 0.5}},
    }
    p = plan(run, spec, [child(7, state="succeeded", loss=0.7)], T0)
    result = p.finished[0].report.results[0]
    assert result.baseline == 0.5
    assert result.forgetting == pytest.approx(0.4)
    assert not p.finished[0].promote


def test_adopts_a_child_whose_status_entry_was_lost() -> None:
    run = run_obj()
    spec = parse_continual(run["spec"])
    assert spec is not None
    p = plan(run, spec, [child(1)], T0)
    assert [c["cycle"] for c in p.cycles] == [1]
    assert p.cycles[0]["state"] == "Running"
    assert p.book["lastCycle"] == 1
    assert p.start is None


def test_render_child_injects_new_data_replay_and_continuation() -> None:
    run = run_obj()
    spec = parse_continual(run["spec"])
    assert spec is not None
    run["metadata"]["annotations"] = {TRIGGER_ANNOTATION: "x"}
    p = plan(run, spec, [], T0)
    assert p.start is not None
    sel = select_new_objects(
        spec.new_data,  # type: ignore[arg-type]
        [ObjectInfo("s3://data/in/b.jsonl", "e2", T0, 5), ObjectInfo("s3://data/in/a.jsonl", "e1", T0, 5)],
        Watermark(),
    )
    buffer = ReplayBuffer([Segment(1, "new", "s3://data/in/old.jsonl", 10, task="arith")])
    obj = render_child(run, spec, p.start, sel, buffer=buffer, promoted_adapter="bot-g1-sft")
    assert obj["metadata"]["name"] == "bot-g1"
    assert obj["metadata"]["labels"] == {PARENT_LABEL: "bot", CYCLE_LABEL: "1"}
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    s = obj["spec"]
    assert "continual" not in s
    assert s["suspend"] is False
    by_name = {d["name"]: d for d in s["datasets"]}
    assert by_name["new-0"]["uri"] == "s3://data/in/a.jsonl"
    assert by_name["new-0"]["task"] == "t"
    assert by_name["new-0"]["format"] == "prompt-completion"
    assert by_name["replay-c1-new"]["uri"] == "s3://data/in/old.jsonl"
    assert by_name["replay-c1-new"]["task"] == "arith"
    sft = s["stages"][0]
    assert sft["data"]["train"] == ["new-0", "new-1"]
    assert sft["data"]["replay"]["ratio"] == 0.25
    assert sft["data"]["replay"]["datasets"] == ["replay-c1-new"]
    assert sft["data"]["replay"]["sampling"] == "per-task-balanced"
    assert s["stages"][1] == run["spec"]["stages"][1]
    annotations = obj["metadata"]["annotations"]
    assert annotations[PARENT_ADAPTER_ANNOTATION] == "bot-g1-sft"
    assert annotations[NEW_DATA_ANNOTATION] == "new-0,new-1"
    # The parent's spec is untouched.
    assert run["spec"]["stages"][0]["data"]["train"] == ["new"]
    entry = started_entry(p.start, sel, T0)
    assert entry["dataVersions"] == ["s3://data/in/a.jsonl@e1", "s3://data/in/b.jsonl@e2"]


def test_suspended_run_starts_nothing_and_has_no_next_time() -> None:
    run = run_obj()
    run["spec"]["suspend"] = True
    run["metadata"]["annotations"] = {TRIGGER_ANNOTATION: "x"}
    spec = parse_continual(run["spec"])
    assert spec is not None
    p = plan(run, spec, [], T0 + timedelta(hours=3, seconds=1))
    assert p.start is None
    assert p.next_schedule_time is None


def test_child_spec_and_status_patches_validate_against_the_api_models() -> None:
    from temper.api.run import PostTrainingRunSpec, PostTrainingRunStatus

    run = run_obj()
    PostTrainingRunSpec.model_validate(run["spec"])
    spec = parse_continual(run["spec"])
    assert spec is not None
    run["metadata"]["annotations"] = {TRIGGER_ANNOTATION: "x"}
    p = plan(run, spec, [], T0)
    assert p.start is not None
    sel = select_new_objects(spec.new_data, [ObjectInfo("s3://data/in/a.jsonl", "e", T0, 1)], Watermark())  # type: ignore[arg-type]
    buffer = ReplayBuffer([Segment(1, "new", "s3://data/in/old.jsonl", 10, task="arith")])
    obj = render_child(run, spec, p.start, sel, buffer=buffer, promoted_adapter="bot-g0-sft")
    PostTrainingRunSpec.model_validate(obj["spec"])
    PostTrainingRunStatus.model_validate(p.status_patch(started_entry(p.start, sel, T0)))
    apply(run, p, now=T0)
    done = plan(run, spec, [child(1, state="succeeded", loss=0.4)], T0)
    status = PostTrainingRunStatus.model_validate(done.status_patch())
    assert status.cycles[0].gate_results[0].outcome == "NoBaseline"
    assert status.aliases[0].adapter == "bot-g1-sft"
