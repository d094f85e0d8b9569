"""Ready stays true: what a re-verification of a Ready Adapter means (pure).

A Ready Adapter is verified again at an interval and after a retention action that touched its
folder: one GET of the manifest and one HEAD per file (the store's SHA-256, else the ETag seen at
publish), never a LIST. If the files vanished or changed, Ready goes False and Stalled True with
reason ``ArtifactMissing`` or ``ChecksumMismatch``; a storage outage is no verdict (Ready stays).
"""

from __future__ import annotations

import random
from typing import Any

from temper import adapters as adapter_ctl
from temper.storage import VerifyResult

ARTIFACT_MISSING = "ArtifactMissing"
CHECKSUM_MISMATCH = "ChecksumMismatch"
MISSING_REASONS = frozenset({"ManifestMissing", "FileMissing"})


def was_ready(adapter: dict[str, Any]) -> bool:
    """Ready=True for the current generation: a verdict a re-verification may overturn."""
    status = adapter.get("status") or {}
    if status.get("observedGeneration") != (adapter.get("metadata") or {}).get("generation"):
        return False
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return ready.get("status") == "True"


def unchanged(adapter: dict[str, Any], result: VerifyResult) -> bool:
    """Every file is there and the manifest's bytes are the ones verified before."""
    verified = ((adapter.get("status") or {}).get("artifact") or {}).get("sha256")
    return result.ok and (verified is None or result.manifest_sha256 == verified)


def lost_reason(adapter: dict[str, Any], result: VerifyResult) -> str | None:
    """ArtifactMissing, ChecksumMismatch, or None when the result is no verdict (storage down)."""
    if unchanged(adapter, result):
        return None
    if result.ok:  # every file verifies, but against a manifest rewritten since
        return CHECKSUM_MISMATCH
    reasons = {adapter_ctl.failure_reason(p) for p in result.problems}
    if reasons == {adapter_ctl.READ_ERROR}:
        return None
    return ARTIFACT_MISSING if reasons <= MISSING_REASONS else CHECKSUM_MISMATCH


def lost_status(adapter: dict[str, Any], result: VerifyResult, reason: str, stamp: str) -> dict[str, Any]:
    """Ready=False, Stalled=True with ``reason``; the artifact facts of the last good verification stay."""
    generation = (adapter.get("metadata") or {}).get("generation")
    uri = ((adapter.get("spec") or {}).get("artifact") or {}).get("uri", "")
    problems = "; ".join(result.problems[:5]) or "manifest.json changed since it was verified"
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": reason,
        "message": f"{uri}: {problems}",
        "observedGeneration": generation,
        "lastTransitionTime": stamp,
    }
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": adapter_ctl.kstatus_conditions(ready, "stalled"),
    }


def first_delay(interval: float, rng: random.Random | None = None) -> float:
    """After a start, spread the first re-verifications over one interval (no thundering herd)."""
    return (rng or random).uniform(0.0, interval)


def touches(adapter: dict[str, Any], deleted: list[str]) -> bool:
    """Did a retention action delete an object inside this Adapter's folder?"""
    uri = str(((adapter.get("spec") or {}).get("artifact") or {}).get("uri") or "")
    if not uri.endswith("manifest.json"):
        return False
    folder = uri[: -len("manifest.json")]
    return any(d.startswith(folder) for d in deleted)
