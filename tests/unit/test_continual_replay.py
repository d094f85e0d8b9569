"""Replay buffer: append, deterministic eviction, contract rendering, deterministic sampling."""

from __future__ import annotations

import pytest
from temper.api.contract import StageData
from temper.continual.replay import (
    ReplayBuffer,
    ReplayError,
    ReplaySettings,
    Segment,
    contract_replay,
    count_jsonl_examples,
    replay_seed,
)
from temper_trainer.data import load_stage_data

pytestmark = pytest.mark.unit


def seg(cycle: int, name: str, n: int, task: str | None = None) -> Segment:
    return Segment(cycle=cycle, name=name, uri=f"s3://b/{name}-{cycle}.jsonl", examples=n, task=task)


def test_append_is_idempotent_and_ordered() -> None:
    buf = ReplayBuffer()
    buf.append([seg(2, "b", 10)], None, "uniform")
    buf.append([seg(1, "a", 10)], None, "uniform")
    buf.append([seg(1, "a", 10)], None, "uniform")  # the same cycle again: no duplicate
    assert [(s.cycle, s.name) for s in buf.segments] == [(1, "a"), (2, "b")]
    assert buf.examples == 20


def test_uniform_eviction_drops_oldest_first() -> None:
    buf = ReplayBuffer()
    for cycle in range(1, 5):
        gone = buf.append([seg(cycle, "d", 40)], 100, "uniform")
    assert [s.cycle for s in buf.segments] == [3, 4]
    assert [s.cycle for s in gone] == [2]
    assert buf.evicted == 2


def test_per_task_balanced_eviction_drops_from_the_largest_task() -> None:
    buf = ReplayBuffer()
    buf.append([seg(1, "arith", 30, "arith")], None, "per-task-balanced")
    buf.append([seg(2, "sub", 30, "subtract"), seg(2, "sub2", 30, "subtract")], None, "per-task-balanced")
    gone = buf.append([seg(3, "arith2", 20, "arith")], 90, "per-task-balanced")
    # Uniform would drop cycle 1 (the only arith data from then); balanced drops a subtract segment.
    assert [(s.cycle, s.name) for s in gone] == [(2, "sub")]
    assert {s.task for s in buf.segments} == {"arith", "subtract"}


def test_the_segment_just_appended_is_never_evicted() -> None:
    buf = ReplayBuffer()
    buf.append([seg(1, "a", 10)], 50, "uniform")
    gone = buf.append([seg(2, "huge", 500)], 50, "uniform")
    assert [s.name for s in gone] == ["a"]
    assert [s.name for s in buf.segments] == ["huge"]


def test_eviction_is_deterministic_and_survives_a_round_trip() -> None:
    def build() -> ReplayBuffer:
        buf = ReplayBuffer()
        for cycle in range(1, 7):
            buf.append([seg(cycle, f"t{cycle % 3}", 10 + cycle, f"task{cycle % 3}")], 45, "per-task-balanced")
        return buf

    a, b = build(), build()
    assert a.segments == b.segments
    restored = ReplayBuffer.from_json(a.to_json())
    assert restored.segments == a.segments
    assert restored.evicted == a.evicted
    with pytest.raises(ReplayError, match=r"buffer\.json"):
        ReplayBuffer.from_json("{not json")


def test_contract_replay_and_trainer_sampling_are_deterministic() -> None:
    buf = ReplayBuffer(
        [
            Segment(1, "arith", "builtin://arith?n=40&seed=1", 40, task="arith"),
            Segment(2, "subtract", "builtin://subtract?n=40&seed=2", 40, task="subtract"),
        ]
    )
    settings = ReplaySettings(ratio=0.5, uri="s3://b/replay/", sampling="per-task-balanced", max_examples=20)
    spec = contract_replay(buf, settings, run="uid-1", cycle=3)
    assert spec.ratio == 0.5
    assert spec.sampling == "per-task-balanced"
    assert spec.max_examples == 20
    assert [d.name for d in spec.datasets] == ["replay-c1-arith", "replay-c2-subtract"]
    assert spec.seed == replay_seed("uid-1", 3) != replay_seed("uid-1", 4)
    data = StageData.model_validate(
        {
            "train": [{"name": "new", "uri": "builtin://arith?n=20&seed=9", "task": "new"}],
            "replay": spec.model_dump(by_alias=True),
        }
    )
    first = load_stage_data(data, "train", None)
    again = load_stage_data(data, "train", None)
    assert first == again
    replayed = [r for r in first if r.get("_replay")]
    assert len(replayed) == 20  # ratio 0.5 of 20 new -> 20, capped by maxExamples 20
    tasks = [r["task"] for r in replayed]
    assert tasks.count("arith") == tasks.count("subtract") == 10  # per-task balanced


def test_no_replay_when_ratio_zero_or_buffer_empty() -> None:
    assert contract_replay(ReplayBuffer(), ReplaySettings(0.3, "s3://b/r/"), run="u", cycle=1).ratio == 0
    assert contract_replay(ReplayBuffer([seg(1, "a", 1)]), ReplaySettings(), run="u", cycle=1).datasets == []


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"ratio": 1.5, "buffer": {"uri": "s3://b/r/"}}, r"replay\.ratio"),
        ({"ratio": 0.2}, r"replay\.buffer\.uri: required"),
        ({"ratio": 0.2, "buffer": {"uri": "/tmp/x"}}, r"replay\.buffer\.uri: must be an s3://"),
        ({"ratio": 0.2, "buffer": {"uri": "s3://b/", "maxExamples": 0}}, r"maxExamples"),
        ({"ratio": 0.2, "buffer": {"uri": "s3://b/", "sampling": "random"}}, r"sampling"),
    ],
)
def test_settings_validation_names_the_field(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ReplayError, match=match):
        ReplaySettings.from_dict(raw)


def test_count_jsonl_examples() -> None:
    assert count_jsonl_examples([b'{"a":1}\n{"a":2}\n']) == 2
    assert count_jsonl_examples([b'{"a":1}\n{"a"', b":2}"]) == 2  # no trailing newline
    assert count_jsonl_examples([]) == 0
