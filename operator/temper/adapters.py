"""Basic Adapter reconcile: verify the artifact against its manifest, then fill the catalog status.

Split in a pure part (:func:`verification_status`: a verify result in, status out) and a thin
I/O part (:func:`verify`), so later controllers (merge, retire, promotion) can add steps
around them without touching verification.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from temper import metrics
from temper.api.contract import StorageConfig
from temper.builders.names import LABEL_CYCLE, LABEL_RUN, LABEL_STAGE
from temper.storage import Storage, VerifyResult

VERIFIED = "ArtifactVerified"
VERIFICATION_FAILED = "VerificationFailed"
READ_ERROR = "ReadError"  # storage unreachable: retried, not a verdict on the artifact
VLLM_METHODS = ("lora", "qlora", "adalora")


def needs_verification(adapter: dict[str, Any]) -> bool:
    """Verify once per generation; a transient read error is retried."""
    status = adapter.get("status") or {}
    if (adapter.get("spec") or {}).get("merge") and not (adapter.get("spec") or {}).get("artifact"):
        return False
    if status.get("observedGeneration") != (adapter.get("metadata") or {}).get("generation"):
        return True
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    return ready is None or retry_verification(adapter, str(ready.get("reason") or ""))


def retry_verification(adapter: dict[str, Any], reason: str) -> bool:
    """Verdicts that may change without a spec change: storage was unreachable, or a merged
    Adapter's manifest is not there *yet* because its merge Job has not published."""
    merging = bool((adapter.get("spec") or {}).get("merge"))
    return reason == READ_ERROR or (merging and reason == "ManifestMissing")


def failure_reason(problem: str) -> str:
    """A bounded reason vocabulary for the verification-failure metric."""
    text = problem.lower()
    if "manifest.json" in text and ("not found" in text or "nosuchkey" in text or "404" in text):
        return "ManifestMissing"
    if "not a valid manifest" in text:
        return "ManifestInvalid"
    if "missing" in text:
        return "FileMissing"
    if "size" in text:
        return "SizeMismatch"
    if "sha256" in text:
        return "Sha256Mismatch"
    return READ_ERROR


def storage_config(artifact: dict[str, Any], default_endpoint: str | None) -> StorageConfig:
    return StorageConfig(
        endpoint_url=artifact.get("endpointUrl") or default_endpoint,
        region=artifact.get("region") or "us-east-1",
        addressing_style=artifact.get("addressingStyle") or "path",
    )


def verification_status(adapter: dict[str, Any], result: VerifyResult, now: datetime) -> dict[str, Any]:
    meta = adapter.get("metadata") or {}
    spec = adapter.get("spec") or {}
    labels = meta.get("labels") or {}
    generation = meta.get("generation")
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    prev = {c.get("type"): c for c in (adapter.get("status") or {}).get("conditions") or []}

    def condition(status: str, reason: str, message: str) -> dict[str, Any]:
        old = prev.get("Ready")
        keep = old is not None and old.get("status") == status
        return {
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": old.get("lastTransitionTime") if keep and old else stamp,
        }

    if not result.ok:
        problems = "; ".join(result.problems[:5])
        reason = (
            READ_ERROR
            if all(failure_reason(p) == READ_ERROR for p in result.problems)
            else VERIFICATION_FAILED
        )
        return {
            "observedGeneration": generation,
            "phase": "Pending" if reason == READ_ERROR else "Failed",
            "conditions": [
                condition("False", reason, f"{spec.get('artifact', {}).get('uri', '')}: {problems}")
            ],
        }
    manifest = result.manifest
    assert manifest is not None
    lineage: dict[str, Any] = {
        "run": labels.get(LABEL_RUN) or manifest.lineage.get("run"),
        "stage": labels.get(LABEL_STAGE) or manifest.lineage.get("stage"),
        "datasets": [str(d) for d in manifest.lineage.get("datasets", [])][:1000],
        "trainerVersion": manifest.trainer_version,
    }
    cycle = labels.get(LABEL_CYCLE)
    if cycle and cycle.isdigit():
        lineage["generation"] = int(cycle)
    parent = (meta.get("annotations") or {}).get("temper.dev/parent") or manifest.lineage.get("parent")
    if parent:
        lineage["parent"] = str(parent)
    method = spec.get("method") or manifest.method
    servable = manifest.servable.get("vllm", method in VLLM_METHODS)
    return {
        "observedGeneration": generation,
        "phase": "Retired" if spec.get("lifecycle") == "retired" else "Ready",
        "conditions": [condition("True", VERIFIED, f"{len(manifest.files)} files verified")],
        "artifact": {
            "sha256": result.manifest_sha256,
            "sizeBytes": result.total_size,
            "files": len(manifest.files),
            "verifiedAt": stamp,
        },
        "evals": {k: float(v) for k, v in manifest.metrics.items()},
        "lineage": {k: v for k, v in lineage.items() if v is not None},
        "servable": {"vllm": bool(servable)},
    }


def verify(adapter: dict[str, Any], storage: Storage) -> VerifyResult:
    """Blocking: read the manifest and hash every file (run it in a worker thread)."""
    uri = ((adapter.get("spec") or {}).get("artifact") or {}).get("uri", "")
    try:
        result = storage.verify_manifest(uri)
    except Exception as exc:  # storage errors become a condition, never a crash loop
        result = VerifyResult(False, [f"manifest.json: read error: {type(exc).__name__}"])
    for problem in result.problems:
        metrics.VERIFICATION_FAILURES.labels(failure_reason(problem)).inc()
    return result


def now() -> datetime:
    return datetime.now(UTC)
