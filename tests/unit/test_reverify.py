"""Ready stays true (operator/temper/reverify.py): what a re-verification of a Ready Adapter decides."""

from __future__ import annotations

import random
from typing import Any

import pytest
from temper import reverify
from temper.storage import VerifyResult

pytestmark = pytest.mark.unit

URI = "s3://temper/team-a/runs/q/g1/sft/manifest.json"


def ready_adapter(sha: str = "abc") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team-a", "name": "q-sft-g1", "generation": 1},
        "spec": {"artifact": {"uri": URI}},
        "status": {
            "observedGeneration": 1,
            "phase": "Ready",
            "conditions": [{"type": "Ready", "status": "True", "reason": "ArtifactVerified"}],
            "artifact": {"sha256": sha, "files": 2},
        },
    }


def test_unchanged_artifact_is_no_verdict() -> None:
    adapter = ready_adapter()
    assert reverify.was_ready(adapter)
    assert reverify.lost_reason(adapter, VerifyResult(True, [], 10, "abc")) is None


@pytest.mark.parametrize(
    ("problems", "reason"),
    [
        (["manifest.json: s3://x/manifest.json not found (NoSuchKey)"], "ArtifactMissing"),
        (["attempts/1/adapter_model.safetensors: missing"], "ArtifactMissing"),
        (["attempts/1/adapter_model.safetensors: sha256 mismatch (x)"], "ChecksumMismatch"),
        (["attempts/1/adapter_model.safetensors: size 3 != 4"], "ChecksumMismatch"),
        (["manifest.json: read error: EndpointConnectionError"], None),  # storage down: Ready stays
    ],
)
def test_lost_reasons(problems: list[str], reason: str | None) -> None:
    assert reverify.lost_reason(ready_adapter(), VerifyResult(False, problems)) == reason


def test_a_rewritten_manifest_that_verifies_is_still_a_change() -> None:
    assert reverify.lost_reason(ready_adapter(), VerifyResult(True, [], 10, "other")) == "ChecksumMismatch"


def test_lost_status_is_kstatus_stalled() -> None:
    result = VerifyResult(False, ["attempts/1/a.bin: missing"])
    status = reverify.lost_status(ready_adapter(), result, "ArtifactMissing", "2026-01-01T00:00:00Z")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Stalled"]["status"] == "True"
    assert conditions["Stalled"]["reason"] == "ArtifactMissing"
    assert conditions["Reconciling"]["status"] == "False"
    assert URI in conditions["Ready"]["message"]
    assert "artifact" not in status  # the last good verification's facts stay


def test_not_ready_or_stale_generation_is_not_reverified() -> None:
    adapter = ready_adapter()
    adapter["metadata"]["generation"] = 2
    assert not reverify.was_ready(adapter)


def test_touches_only_objects_in_the_folder() -> None:
    adapter = ready_adapter()
    assert reverify.touches(adapter, [URI])
    assert reverify.touches(adapter, ["s3://temper/team-a/runs/q/g1/sft/attempts/1/a.bin"])
    assert not reverify.touches(adapter, ["s3://temper/team-a/runs/q/g1/sft-other/manifest.json"])


def test_first_pass_is_spread_over_one_interval() -> None:
    delays = [reverify.first_delay(3600, random.Random(i)) for i in range(50)]
    assert all(0 <= d <= 3600 for d in delays)
    assert max(delays) - min(delays) > 1800


def test_an_adapter_without_a_recorded_digest_is_not_a_false_alarm() -> None:
    adapter = ready_adapter()
    del adapter["status"]["artifact"]
    assert reverify.lost_reason(adapter, VerifyResult(True, [], 10, "anything")) is None
