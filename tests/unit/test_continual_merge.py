"""Merge planning: source validation with clear reasons, and the merge stage contract."""

from __future__ import annotations

from typing import Any

import pytest
from temper.api.contract import StageContract, StorageConfig
from temper.continual.merge import MergeBlocked, MergePlan, merge_contract, plan_merge

pytestmark = pytest.mark.unit


def source(
    name: str,
    *,
    base: str = "builtin://tiny",
    ready: bool = True,
    method: str = "lora",
    lifecycle: str = "active",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": base},
            "artifact": {"uri": f"s3://ad/{name}/manifest.json"},
            "method": method,
            "lifecycle": lifecycle,
        },
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def merged(sources: list[dict[str, Any]], **merge: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "mix"},
        "spec": {"artifact": {"uri": "s3://ad/mix/manifest.json"}, "merge": {"sources": sources, **merge}},
    }


def test_valid_merge_plans_and_renders_a_contract() -> None:
    srcs = {"a": source("a"), "b": source("b")}
    result = plan_merge(
        merged([{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}], method="ties"), srcs
    )
    assert isinstance(result, MergePlan)
    assert result.density == 0.5
    assert result.method == "ties"
    assert result.base_model == "builtin://tiny"
    assert [(s.name, s.manifest_uri, s.weight) for s in result.sources] == [
        ("a", "s3://ad/a/manifest.json", 0.7),
        ("b", "s3://ad/b/manifest.json", 0.3),
    ]
    contract = merge_contract(result, namespace="ml", name="mix", uid="u", storage=StorageConfig())
    again = StageContract.from_env(contract.to_env())
    assert again.stage.type == "merge"
    assert again.output.prefix == "s3://ad/mix/"
    assert again.merge is not None
    assert again.merge.method == "ties"
    assert len(again.merge_sources) == 2


@pytest.mark.parametrize(
    ("sources", "observed", "extra", "reason", "text"),
    [
        ([{"name": "a"}], {"a": source("a")}, {}, "InvalidMerge", "at least 2 sources, got 1"),
        ([{"name": "a"}, {"name": "a"}], {"a": source("a")}, {}, "InvalidMerge", "duplicate source"),
        (
            [{"name": "a"}, {"name": "b"}],
            {"a": source("a"), "b": source("b")},
            {"method": "avg"},
            "InvalidMerge",
            "spec.merge.method",
        ),
        (
            [{"name": "a"}, {"name": "b"}],
            {"a": source("a"), "b": source("b")},
            {"density": 1.5},
            "InvalidMerge",
            "density",
        ),
        ([{"name": "a"}, {"name": "gone"}], {"a": source("a")}, {}, "SourceNotFound", "not found: gone"),
        (
            [{"name": "a"}, {"name": "b"}],
            {"a": source("a"), "b": source("b", ready=False)},
            {},
            "SourceNotReady",
            "Ready: b",
        ),
        (
            [{"name": "a"}, {"name": "b"}],
            {"a": source("a"), "b": source("b", lifecycle="retired")},
            {},
            "SourceRetired",
            "retired adapter(s) cannot be merged: b",
        ),
        (
            [{"name": "a"}, {"name": "b"}],
            {"a": source("a"), "b": source("b", base="s3://m/other/")},
            {},
            "BaseModelMismatch",
            "share a base model: a=builtin://tiny, b=s3://m/other/",
        ),
        (
            [{"name": "a"}, {"name": "b"}],
            {"a": source("a"), "b": source("b", method="prompt-tuning")},
            {},
            "UnsupportedMethod",
            "b (prompt-tuning)",
        ),
    ],
)
def test_invalid_merges_give_a_clear_reason(
    sources: list[dict[str, Any]], observed: dict[str, Any], extra: dict[str, Any], reason: str, text: str
) -> None:
    result = plan_merge(merged(sources, **extra), observed)
    assert isinstance(result, MergeBlocked)
    assert result.reason == reason
    assert text in result.message


def test_merge_needs_a_destination() -> None:
    adapter = merged([{"name": "a"}, {"name": "b"}])
    adapter["spec"]["artifact"] = {}
    result = plan_merge(adapter, {"a": source("a"), "b": source("b")})
    assert isinstance(result, MergeBlocked)
    assert "spec.artifact.uri" in result.message
