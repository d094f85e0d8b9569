"""Pure pieces around the planner: status diffing, Adapter verification status, metric tallies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import Gauge
from temper.adapters import failure_reason, needs_verification, verification_status
from temper.api.adapter import AdapterStatus
from temper.api.contract import Manifest, ManifestFile
from temper.kube import status_changed
from temper.metrics import StateTally
from temper.storage import VerifyResult

pytestmark = pytest.mark.unit
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_status_diff_ignores_json_number_and_empty_differences() -> None:
    stored = {"phase": "Running", "stages": [{"name": "sft", "attempts": 1, "percent": 14}], "other": "x"}
    desired = {
        "phase": "Running",
        "stages": [{"name": "sft", "attempts": 1, "percent": 14.0, "metrics": {}}],
        "progress": None,
    }
    assert not status_changed(desired, stored)
    assert status_changed({"phase": "Failed"}, stored)
    assert status_changed({"stages": [{"name": "sft", "attempts": 2}]}, stored)
    assert status_changed({"phase": "Running"}, None)


def _adapter(**status: object) -> dict[str, object]:
    return {
        "metadata": {
            "name": "r1-sft-g1",
            "generation": 1,
            "labels": {"temper.dev/run": "r1", "temper.dev/stage": "sft", "temper.dev/cycle": "2"},
            "annotations": {"temper.dev/parent": "r1-base-g2"},
        },
        "spec": {"artifact": {"uri": "s3://b/r1/g2/sft/manifest.json"}, "method": "prefix-tuning"},
        "status": status,
    }


def test_verified_adapter_status_carries_catalog_facts() -> None:
    manifest = Manifest(
        files=[ManifestFile(path="attempts/1/a.safetensors", sha256="0" * 64, size=10)],
        base_model="builtin://tiny",
        method="prefix-tuning",
        stage_type="sft",
        trainer_version="0.1",
        created_at="now",
        metrics={"eval/loss": 0.5},
        lineage={"datasets": ["tickets@e1"]},
    )
    status = verification_status(_adapter(), VerifyResult(True, [], 10, "f" * 64, manifest), NOW)
    assert status["conditions"][0] | {} == {
        "type": "Ready",
        "status": "True",
        "reason": "ArtifactVerified",
        "message": "1 files verified",
        "observedGeneration": 1,
        "lastTransitionTime": "2026-11-26T12:00:00Z",
    }
    assert status["artifact"] == {
        "sha256": "f" * 64,
        "sizeBytes": 10,
        "files": 1,
        "verifiedAt": "2026-11-26T12:00:00Z",
    }
    assert status["lineage"] == {
        "run": "r1",
        "stage": "sft",
        "generation": 2,
        "parent": "r1-base-g2",
        "datasets": [{"name": "tickets", "uri": "tickets", "version": "e1"}],  # an older manifest's string
        "trainerVersion": "0.1",
        "baseModel": "builtin://tiny",  # with baseModelRevision too, for an hf:// base
    }
    assert status["metrics"] == {"eval/loss": 0.5}
    assert "evals" not in status  # eval stages write those; verification never touches them
    assert status["servable"] == {"vllm": False}  # prefix tuning is not servable on vLLM


def test_hand_registered_adapter_gets_structured_lineage_from_a_trainer_manifest() -> None:
    """No labels, no run behind it: the manifest's run object becomes a name, never a null or a dict."""
    manifest = Manifest(
        files=[ManifestFile(path="attempts/1/a.safetensors", sha256="0" * 64, size=10)],
        base_model="builtin://tiny",
        method="lora",
        stage_type="sft",
        trainer_version="0.1",
        created_at="now",
        lineage={
            "run": {"namespace": "ml", "name": "elsewhere", "uid": "u1"},
            "cycle": 1,
            "stage": "sft",
            "parent": {"name": "elsewhere-base-g1", "manifestUri": "s3://b/base/manifest.json"},
            "datasets": [{"name": "arith", "uri": "builtin://arith?n=8", "version": "v", "sha256": "ab"}],
            "contractHash": "c" * 64,
        },
    )
    adapter = {"metadata": {"name": "mine", "generation": 1}, "spec": {"artifact": {"uri": "s3://b/m.json"}}}
    status = verification_status(adapter, VerifyResult(True, [], 10, "f" * 64, manifest), NOW)
    AdapterStatus.model_validate(status)
    assert status["phase"] == "Ready"
    assert status["lineage"] == {
        "run": "elsewhere",
        "stage": "sft",
        "generation": 1,
        "parent": "elsewhere-base-g1",
        "parentUri": "s3://b/base/manifest.json",
        "datasets": [{"name": "arith", "uri": "builtin://arith?n=8", "version": "v", "sha256": "ab"}],
        "trainerVersion": "0.1",
        "baseModel": "builtin://tiny",
        "contractHash": "c" * 64,
    }


def test_failed_verification_names_the_file_and_reason() -> None:
    result = VerifyResult(False, ["attempts/1/a.safetensors: sha256 mismatch (expected 000…, got 111…)"])
    status = verification_status(_adapter(), result, NOW)
    cond = status["conditions"][0]
    assert (cond["status"], cond["reason"], status["phase"]) == ("False", "VerificationFailed", "Failed")
    assert "attempts/1/a.safetensors: sha256 mismatch" in cond["message"]
    assert failure_reason(result.problems[0]) == "Sha256Mismatch"
    assert failure_reason("manifest.json: cannot read s3://b/k: NoSuchKey") == "ManifestMissing"
    assert failure_reason("manifest.json: cannot read s3://b/k: EndpointConnectionError") == "ReadError"


def test_known_label_values_are_exported_at_zero_before_any_event() -> None:
    """Pre-created series let increase()/histogram_quantile() see the first event (a panel shows
    0, not "No data"); the vocabulary they come from is the one failure_reason speaks."""
    from prometheus_client import REGISTRY
    from temper import metrics

    problems = [
        "manifest.json: cannot read s3://b/k: NoSuchKey",
        "manifest.json: not a valid manifest",
        "attempts/1/a.safetensors: missing",
        "attempts/1/a.safetensors: size 3 != 4",
        "attempts/1/a.safetensors: sha256 mismatch",
        "manifest.json: cannot read s3://b/k: EndpointConnectionError",
    ]
    assert sorted(failure_reason(p) for p in problems) == sorted(metrics.VERIFICATION_REASONS)
    for reason in metrics.VERIFICATION_REASONS:
        sample = REGISTRY.get_sample_value("temper_adapter_verification_failures_total", {"reason": reason})
        assert sample is not None, reason
    for stage_type in ("sft", "dpo", "eval", "merge"):
        assert REGISTRY.get_sample_value("temper_stage_retries_total", {"stage_type": stage_type}) is not None
        for result in ("Succeeded", "Failed"):
            labels = {"stage_type": stage_type, "result": result, "le": "+Inf"}
            assert REGISTRY.get_sample_value("temper_stage_duration_seconds_bucket", labels) is not None


def test_verification_runs_once_per_generation_and_retries_read_errors() -> None:
    assert needs_verification(_adapter())
    verified = {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "ArtifactVerified"}],
    }
    assert not needs_verification(_adapter(**verified))
    unreadable = {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "False", "reason": "ReadError"}],
    }
    assert needs_verification(_adapter(**unreadable))


def test_state_tally_moves_objects_between_states() -> None:
    gauge = Gauge("test_tally_runs", "test", ["state"])
    tally = StateTally(gauge, ("Running", "Succeeded"))
    tally.set(("ns", "a"), "Running")
    tally.set(("ns", "b"), "Running")
    tally.set(("ns", "a"), "Succeeded")
    assert gauge.labels("Running")._value.get() == 1
    assert gauge.labels("Succeeded")._value.get() == 1
    tally.drop(("ns", "b"))
    assert gauge.labels("Running")._value.get() == 0
