"""Aliases: promotion history, rollback, retired adapters never promoted, ConfigMap layout."""

from __future__ import annotations

import json
from typing import Any

import pytest
from temper.continual.promotion import (
    AdapterTarget,
    AliasState,
    PromotionError,
    adapter_folder,
    alias_configmap_name,
    promotion_blocker,
)

pytestmark = pytest.mark.unit


def adapter(name: str, *, ready: bool = True, lifecycle: str = "active", gen: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "builtin://tiny"},
            "artifact": {"uri": f"s3://ad/{name}/manifest.json"},
            "lifecycle": lifecycle,
        },
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "reason": "X", "message": "m"}
            ],
            "lineage": {"generation": gen},
        },
    }


def test_promote_history_previous_and_idempotence() -> None:
    state = AliasState("stable", "bot")
    g1, g2 = (
        AdapterTarget.from_adapter(adapter("bot-g1")),
        AdapterTarget.from_adapter(adapter("bot-g2", gen=2)),
    )
    assert state.promote(g1, now="t1")
    assert not state.promote(g1, now="t1b")  # already there: no new history entry
    assert state.promote(g2, now="t2")
    assert [h.adapter for h in state.history] == ["bot-g1", "bot-g2"]
    assert state.previous == "bot-g1"
    assert state.rollback(g1, now="t3")
    assert state.target == g1
    assert state.history[-1].action == "rollback"
    with pytest.raises(PromotionError, match="never promoted here"):
        state.rollback(AdapterTarget.from_adapter(adapter("other")), now="t4")


def test_history_is_bounded() -> None:
    state = AliasState("stable", "bot")
    for i in range(30):
        state.point_at(
            AdapterTarget(f"a{i}", f"s3://x/{i}/manifest.json", "b", "s3://x/"),
            now=str(i),
            action="promote",
            limit=5,
        )
    assert [h.adapter for h in state.history] == [f"a{i}" for i in range(25, 30)]


def test_retired_or_unready_adapters_are_never_promoted() -> None:
    with pytest.raises(PromotionError, match="retired; a retired adapter is never promoted"):
        AdapterTarget.from_adapter(adapter("old", lifecycle="retired"))
    assert "not Ready (X: m)" in (promotion_blocker(adapter("wip", ready=False)) or "")
    assert promotion_blocker({"metadata": {"name": "n"}, "spec": {}, "status": {}}) == "is not Ready"


def test_configmap_layout_for_serving_and_round_trip() -> None:
    state = AliasState("stable", "bot")
    target = AdapterTarget(
        "bot-g2", "s3://ad/bot/g2/manifest.json", "s3://models/base/", "s3://ad/bot/g2/attempts/1/", 2
    )
    state.promote(target, now="2026-01-01T00:00:00Z")
    cm = state.configmap("ml")
    assert cm["metadata"]["name"] == "temper-alias-bot-stable"
    assert cm["metadata"]["labels"]["temper.dev/alias"] == "stable"
    data = cm["data"]
    assert data["adapter"] == "bot-g2"
    assert data["adapterUri"] == "s3://ad/bot/g2/attempts/1/"
    assert json.loads(data["vllm-lora-modules.json"]) == [
        {"name": "bot-stable", "path": "s3://ad/bot/g2/attempts/1/", "base_model_name": "s3://models/base/"}
    ]
    assert json.loads(data["vllm-load-lora-adapter.json"]) == {
        "lora_name": "bot-stable",
        "lora_path": "s3://ad/bot/g2/attempts/1/",
    }
    assert all(isinstance(v, str) for v in data.values())
    again = AliasState.from_configmap(cm)
    assert again.target == target
    assert again.history == state.history
    # A user edits data.adapter to roll back: detected as an edit.
    cm["data"]["adapter"] = "bot-g1"
    assert again.edited_to(cm) == "bot-g1"
    assert again.edited_to(state.configmap("ml")) is None


def test_adapter_folder_and_long_names() -> None:
    uri = "s3://b/run/sft/manifest.json"
    assert (
        adapter_folder(uri, ["attempts/2/adapter_config.json", "attempts/2/adapter_model.safetensors"])
        == "s3://b/run/sft/attempts/2/"
    )
    assert adapter_folder(uri) == "s3://b/run/sft/"
    assert len(alias_configmap_name("r" * 200, "a" * 100)) <= 253
