"""Pure decisions of a continual pass: finish actions, data source, replay segments, rollback status
and the Adapter.status.aliases mirror."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from temper.continual import actions
from temper.continual.cycle import FinishedCycle, Plan, StartCycle
from temper.continual.data_selection import Selection, Watermark
from temper.continual.gates import GateReport
from temper.continual.spec import parse_continual

from .test_continual_cycle import T0, run_obj

pytestmark = pytest.mark.unit

NEW = ({"name": "new", "uri": "s3://data/in/a.jsonl", "format": "prompt-completion", "task": "t"},)


def finished(cycle: int, *, succeeded: bool, promote: bool, adapter: str | None) -> FinishedCycle:
    return FinishedCycle(cycle, f"bot-g{cycle}", succeeded, adapter, GateReport(()), promote, NEW)


def test_finish_actions_keep_cycle_order_and_skip_what_is_not_asked() -> None:
    cspec = parse_continual(run_obj()["spec"])
    assert cspec is not None
    plan = Plan(
        finished=[
            finished(1, succeeded=True, promote=True, adapter="bot-g1-sft"),
            finished(2, succeeded=True, promote=False, adapter="bot-g2-sft"),  # gate failed
            finished(3, succeeded=False, promote=False, adapter=None),
        ]
    )
    assert actions.finish_actions(plan, cspec) == [
        actions.Promotion("stable", "bot-g1-sft"),
        actions.ReplayAppend(1, NEW),
        actions.ReplayAppend(2, NEW),
    ]
    spec = run_obj()["spec"]
    del spec["continual"]["promote"], spec["continual"]["replay"]
    bare = parse_continual(spec)
    assert bare is not None
    assert actions.finish_actions(plan, bare) == []


def test_child_storage_gets_a_prefix_per_cycle() -> None:
    opts = {"uri": "s3://adapters/bot/", "secretRef": {"name": "s3"}}
    assert actions.child_storage(opts, 4) == {
        "uri": "s3://adapters/bot/cycles/4/",
        "secretRef": {"name": "s3"},
    }
    assert opts["uri"] == "s3://adapters/bot/"  # the parent's options are not touched


def test_selection_source_per_new_data_kind() -> None:
    start = StartCycle(2, datetime(2026, 3, 2, 3, 0, tzinfo=UTC), "bot-g2", "schedule")
    run = run_obj()
    run["status"] = {"watermark": {"prefix": Watermark(T0, frozenset({"s3://data/in/a.jsonl"})).to_status()}}
    cspec = parse_continual(run["spec"])
    assert cspec is not None
    source = actions.selection_source(run, cspec, start)
    assert source == actions.PrefixSource("s3://data/in/", Watermark(T0, frozenset({"s3://data/in/a.jsonl"})))
    assert actions.advances_prefix_watermark(cspec)

    templated = run_obj(
        newData={"dataset": "new", "uriTemplate": "s3://data/{cycle_date:%Y-%m-%d}-{cycle}.jsonl"}
    )
    tspec = parse_continual(templated["spec"])
    assert tspec is not None
    source = actions.selection_source(templated, tspec, start)
    assert isinstance(source, actions.TemplateSource)
    assert source.uri == "s3://data/2026-03-02-2.jsonl"
    selection = source.finish(tspec, "abc")
    assert [d.uri for d in selection.datasets] == ["s3://data/2026-03-02-2.jsonl"]
    assert any("abc" in v for v in selection.versions)
    assert not actions.advances_prefix_watermark(tspec)

    unchanged = run_obj()
    del unchanged["spec"]["continual"]["newData"]
    uspec = parse_continual(unchanged["spec"])
    assert uspec is not None
    assert actions.selection_source(unchanged, uspec, start) == Selection((), ("(unchanged datasets)",))


def test_replay_segments_count_each_dataset() -> None:
    counted: list[str] = []

    def count(uri: str) -> int:
        counted.append(uri)
        return actions.builtin_examples(uri) or 7

    datasets = [*NEW, {"name": "b", "uri": "builtin://arith?n=12"}]
    segments = actions.replay_segments(3, datasets, count)
    assert [(s.cycle, s.name, s.examples, s.format, s.task) for s in segments] == [
        (3, "new", 7, "prompt-completion", "t"),
        (3, "b", 12, "prompt-completion", None),
    ]
    assert counted == ["s3://data/in/a.jsonl", "builtin://arith?n=12"]
    assert actions.builtin_examples("builtin://arith") == actions.BUILTIN_DEFAULT_EXAMPLES
    assert actions.builtin_examples("s3://x/y.jsonl") is None


def test_rolled_back_status_points_the_alias_back_and_drops_the_baseline() -> None:
    status: dict[str, Any] = {
        "cycles": [{"cycle": 1, "adapter": "bot-g1-sft"}, {"cycle": 2, "adapter": "bot-g2-sft"}],
        "aliases": [
            {"name": "stable", "adapter": "bot-g2-sft", "cycle": 2, "promotedAt": "x"},
            {"name": "canary", "adapter": "bot-g2-sft", "cycle": 2, "promotedAt": "x"},
        ],
        "watermark": {"baseline": {"arith": 1.0}, "prefix": {"time": "t"}},
    }
    before = copy.deepcopy(status)
    patch = actions.rolled_back_status(status, "stable", "bot-g1-sft", T0)
    assert patch == {
        "aliases": [
            {"name": "canary", "adapter": "bot-g2-sft", "cycle": 2, "promotedAt": "x"},
            {"name": "stable", "adapter": "bot-g1-sft", "cycle": 1, "promotedAt": "2026-03-01T00:00:00Z"},
        ],
        "watermark": {"prefix": {"time": "t"}},
    }
    assert status == before


def adapter(name: str, aliases: list[str] | None = None, namespace: str = "ml") -> dict[str, Any]:
    status = {"phase": "Ready"} | ({"aliases": aliases} if aliases is not None else {})
    return {"metadata": {"name": name, "namespace": namespace}, "status": status}


def run_with_aliases(name: str, namespace: str, *aliases: tuple[str, str]) -> dict[str, Any]:
    entries = [{"name": alias, "adapter": target, "cycle": 1} for alias, target in aliases]
    return {"metadata": {"name": name, "namespace": namespace}, "status": {"aliases": entries}}


def test_alias_mirror_lists_every_alias_per_adapter() -> None:
    runs = [
        run_with_aliases("bot", "ml", ("production", "bot-g2-sft"), ("canary", "bot-g2-sft")),
        run_with_aliases("other", "ml", ("stable", "other-g1-sft")),
        run_with_aliases("bot", "dev", ("stable", "bot-g2-sft")),  # same names, another namespace
        {"metadata": {"name": "fresh", "namespace": "ml"}},  # no status yet
    ]
    assert actions.alias_mirror(runs) == {
        ("ml", "bot-g2-sft"): ["canary", "production"],
        ("ml", "other-g1-sft"): ["stable"],
        ("dev", "bot-g2-sft"): ["stable"],
    }


def test_alias_mirror_patches_follow_promotion_and_rollback() -> None:
    adapters = [adapter("bot-g1-sft", ["stable"]), adapter("bot-g2-sft"), adapter("unrelated")]
    # Promotion moved stable to g2: g1 loses it, g2 gains it, the unrelated Adapter is not written.
    promoted = actions.alias_mirror([run_with_aliases("bot", "ml", ("stable", "bot-g2-sft"))])
    assert actions.alias_mirror_patches(adapters, promoted) == [
        (("ml", "bot-g1-sft"), []),
        (("ml", "bot-g2-sft"), ["stable"]),
    ]
    # Once written, the mirror is in sync: no writes.
    synced = [adapter("bot-g1-sft", []), adapter("bot-g2-sft", ["stable"]), adapter("unrelated")]
    assert actions.alias_mirror_patches(synced, promoted) == []
    # Rollback to g1: the alias moves back.
    rolled = actions.alias_mirror([run_with_aliases("bot", "ml", ("stable", "bot-g1-sft"))])
    assert actions.alias_mirror_patches(synced, rolled) == [
        (("ml", "bot-g1-sft"), ["stable"]),
        (("ml", "bot-g2-sft"), []),
    ]
