"""Adapters' kstatus conditions: Ready first, then Reconciling and Stalled with observedGeneration.

Each state is also judged by a small model of kstatus' rules for custom resources (the order
documented in docs/gitops.md), so the conditions are checked for what Flux will conclude.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from temper.adapters import (
    needs_verification,
    pending_status,
    retry_verification,
    verification_status,
)
from temper.api.contract import Manifest, ManifestFile
from temper.storage import VerifyResult

from tests.unit.test_argocd_health import HealthCheck

pytestmark = pytest.mark.unit
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
LATER = datetime(2026, 11, 26, 12, 5, tzinfo=UTC)
MANIFEST = Manifest(
    files=[ManifestFile(path="attempts/1/a.safetensors", sha256="0" * 64, size=10)],
    base_model="builtin://tiny",
    method="lora",
    stage_type="sft",
    trainer_version="0.1",
    created_at="now",
)
MISSING = "manifest.json: cannot read s3://b/out/manifest.json: NoSuchKey"


def _adapter(generation: int = 3, merge: bool = False, **status: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"artifact": {"uri": "s3://b/out/manifest.json"}, "method": "lora"}
    if merge:
        spec["merge"] = {"sources": [{"name": "a"}, {"name": "b"}], "method": "linear"}
    return {
        "metadata": {"name": "ad", "namespace": "ns", "generation": generation},
        "spec": spec,
        "status": status,
    }


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def kstatus(adapter: dict[str, Any], status: dict[str, Any]) -> str:
    """kstatus for a custom resource: stale observedGeneration, then Reconciling, Stalled, else Current."""
    if status.get("observedGeneration") != adapter["metadata"]["generation"]:
        return "InProgress"
    by_type = {c["type"]: c for c in status.get("conditions") or []}
    if by_type.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if by_type.get("Stalled", {}).get("status") == "True":
        return "Failed"
    return "Current"


def test_pending_adapter_is_reconciling_and_gets_verified() -> None:
    adapter = _adapter()
    status = pending_status(adapter, NOW)
    assert status["phase"] == "Pending"
    assert _conditions(status) == {"Reconciling": ("True", "Verifying"), "Stalled": ("False", "Verifying")}
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert kstatus(adapter, status) == "InProgress"
    # Generation already observed, yet no verdict (no Ready): the controller must not skip it.
    assert needs_verification(_adapter(**status))


def test_verified_adapter_is_current_and_keeps_transition_times() -> None:
    pending = _adapter(**pending_status(_adapter(), NOW))
    status = verification_status(pending, VerifyResult(True, [], 10, "f" * 64, MANIFEST), LATER)
    assert _conditions(status)["Ready"] == ("True", "ArtifactVerified")
    assert (_conditions(status)["Reconciling"][0], _conditions(status)["Stalled"][0]) == ("False", "False")
    assert kstatus(pending, status) == "Current"
    times = {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}
    # Ready appeared and Reconciling flipped; Stalled stayed False since the pending status.
    assert times == {
        "Ready": "2026-11-26T12:05:00Z",
        "Reconciling": "2026-11-26T12:05:00Z",
        "Stalled": "2026-11-26T12:00:00Z",
    }
    assert not needs_verification(_adapter(**status))


@pytest.mark.parametrize(
    "problem",
    [
        "attempts/1/a.safetensors: sha256 mismatch (expected 000…, got 111…)",
        "attempts/1/a.safetensors: missing",
        MISSING,
    ],
)
def test_corrupt_or_missing_artifact_is_stalled(problem: str) -> None:
    adapter = _adapter()
    status = verification_status(adapter, VerifyResult(False, [problem]), NOW)
    assert status["phase"] == "Failed"
    assert _conditions(status) == {
        "Ready": ("False", "VerificationFailed"),
        "Reconciling": ("False", "VerificationFailed"),
        "Stalled": ("True", "VerificationFailed"),
    }
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert problem.split(":", maxsplit=1)[0] in stalled["message"]
    assert kstatus(adapter, status) == "Failed"
    assert not retry_verification(adapter, "VerificationFailed")


def test_unreachable_storage_is_reconciling_not_stalled() -> None:
    adapter = _adapter()
    problem = "manifest.json: cannot read s3://b/k: EndpointConnectionError"
    status = verification_status(adapter, VerifyResult(False, [problem]), NOW)
    assert _conditions(status)["Reconciling"] == ("True", "ReadError")
    assert _conditions(status)["Stalled"][0] == "False"
    assert kstatus(adapter, status) == "InProgress"


def test_merge_in_progress_is_reconciling_and_a_refused_merge_is_stalled() -> None:
    merging = _adapter(
        merge=True,
        conditions=[
            {"type": "Merged", "status": "False", "reason": "Merging", "message": "merge Job ad-merge"}
        ],
    )
    status = verification_status(merging, VerifyResult(False, [MISSING]), NOW)
    assert status["phase"] == "Pending"
    assert kstatus(merging, status) == "InProgress"
    assert retry_verification(merging, status["conditions"][0]["reason"])

    # A source that is not Ready yet may become Ready: still waiting, not stalled.
    waiting = _adapter(
        merge=True,
        conditions=[{"type": "Merged", "status": "False", "reason": "SourceNotReady", "message": "a"}],
    )
    assert kstatus(waiting, verification_status(waiting, VerifyResult(False, [MISSING]), NOW)) == "InProgress"

    refused = _adapter(
        merge=True,
        conditions=[
            {"type": "Merged", "status": "False", "reason": "BaseModelMismatch", "message": "a and b differ"}
        ],
    )
    status = verification_status(refused, VerifyResult(False, [MISSING]), NOW)
    assert status["phase"] == "Failed"
    assert _conditions(status)["Stalled"] == ("True", "BaseModelMismatch")
    assert "merge refused: a and b differ" in status["conditions"][0]["message"]
    assert kstatus(refused, status) == "Failed"
    assert not retry_verification(refused, status["conditions"][0]["reason"])


def test_a_new_generation_is_in_progress_until_observed() -> None:
    verified = verification_status(_adapter(), VerifyResult(True, [], 10, "f" * 64, MANIFEST), NOW)
    bumped = _adapter(generation=4, **verified)
    assert kstatus(bumped, verified) == "InProgress"
    assert needs_verification(bumped)


def test_argo_cd_health_agrees_with_kstatus_on_every_status_the_operator_writes() -> None:
    health = HealthCheck("Adapter")
    argo_for = {"InProgress": "Progressing", "Failed": "Degraded", "Current": "Healthy"}
    refused = [{"type": "Merged", "status": "False", "reason": "InvalidMerge", "message": "no sources"}]
    cases = [
        (_adapter(), pending_status(_adapter(), NOW)),
        (_adapter(), verification_status(_adapter(), VerifyResult(True, [], 10, "f" * 64, MANIFEST), NOW)),
        (_adapter(), verification_status(_adapter(), VerifyResult(False, ["a: sha256 mismatch"]), NOW)),
        (_adapter(), verification_status(_adapter(), VerifyResult(False, ["manifest.json: EOFError"]), NOW)),
        (
            _adapter(merge=True),
            verification_status(_adapter(merge=True), VerifyResult(False, [MISSING]), NOW),
        ),
        (
            _adapter(merge=True, conditions=refused),
            verification_status(
                _adapter(merge=True, conditions=refused), VerifyResult(False, [MISSING]), NOW
            ),
        ),
    ]
    seen = set()
    for adapter, status in cases:
        expected = argo_for[kstatus(adapter, status)]
        got, message = health({**adapter, "status": status})
        assert got == expected, (status, message)
        seen.add(got)
    assert seen == {"Progressing", "Degraded", "Healthy"}
