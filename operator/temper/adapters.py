"""Basic Adapter reconcile: verify the artifact against its manifest, then fill the catalog status.

Split in a pure part (:func:`verification_status`: a verify result in, status out) and a thin
I/O part (:func:`verify`), so later controllers (merge, retire, promotion) can add steps
around them without touching verification.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from temper import metrics
from temper.api.common import RECONCILING, STALLED
from temper.api.contract import Manifest, StorageConfig
from temper.builders.names import LABEL_CYCLE, LABEL_RUN, LABEL_STAGE
from temper.storage import Storage, VerifyResult

VERIFIED = "ArtifactVerified"
VERIFICATION_FAILED = "VerificationFailed"
READ_ERROR = "ReadError"  # storage unreachable: retried, not a verdict on the artifact
VERIFYING = "Verifying"  # published, not verified yet
MERGED = "Merged"
# Merge refusals no new event can lift: only a spec change (new generation) can. The others
# (a source not found or not Ready yet) may resolve themselves, so the merge keeps waiting.
PERMANENT_MERGE_BLOCKS = frozenset(
    {"BaseModelMismatch", "InvalidMerge", "UnsupportedMethod", "SourceRetired"}
)
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


def merge_blocked_for_good(adapter: dict[str, Any]) -> dict[str, Any] | None:
    """The ``Merged=False`` condition of a merge refused for good, else None."""
    conditions = (adapter.get("status") or {}).get("conditions") or []
    merged = next((c for c in conditions if c.get("type") == MERGED), None)
    if merged and merged.get("status") == "False" and merged.get("reason") in PERMANENT_MERGE_BLOCKS:
        return dict(merged)
    return None


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


def transient_failure(adapter: dict[str, Any], problems: list[str]) -> str | None:
    """The Ready reason of a failure that may fix itself (retried, never Stalled), else None."""
    reasons = {failure_reason(p) for p in problems}
    if reasons == {READ_ERROR}:
        return READ_ERROR
    merging = bool((adapter.get("spec") or {}).get("merge"))
    if merging and reasons == {"ManifestMissing"} and not merge_blocked_for_good(adapter):
        return "ManifestMissing"  # the merge Job has not published yet
    return None


def pending_status(adapter: dict[str, Any], now: datetime) -> dict[str, Any]:
    """What an Adapter reads before its first verification: kstatus InProgress, Argo Progressing.

    Without it a just-published Adapter has no conditions, which kstatus reports as Current.
    Ready stays absent until there is a verdict (waiters on Ready see only real verdicts, and
    a missing Ready is what makes the controller verify).
    """
    generation = (adapter.get("metadata") or {}).get("generation")
    base = {
        "reason": VERIFYING,
        "observedGeneration": generation,
        "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return {
        "observedGeneration": generation,
        "phase": "Pending",
        "conditions": [
            {"type": RECONCILING, "status": "True", "message": "artifact not verified yet", **base},
            {"type": STALLED, "status": "False", "message": "", **base},
        ],
    }


def kstatus_conditions(
    ready: dict[str, Any], outcome: Literal["ready", "retrying", "stalled"]
) -> list[dict[str, Any]]:
    """Ready first (callers read ``conditions[0]``), then kstatus' Reconciling and Stalled.

    Reconciling is True while verification will be retried, Stalled when it failed for good
    (checksum mismatch, missing file): only a new artifact (a spec change) can fix that.
    """

    def derived(ctype: str, on: bool) -> dict[str, Any]:
        return {
            **ready,
            "type": ctype,
            "status": "True" if on else "False",
            "message": ready["message"] if on else "",
        }

    return [ready, derived(RECONCILING, outcome == "retrying"), derived(STALLED, outcome == "stalled")]


def verification_status(adapter: dict[str, Any], result: VerifyResult, now: datetime) -> dict[str, Any]:
    meta = adapter.get("metadata") or {}
    spec = adapter.get("spec") or {}
    generation = meta.get("generation")
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    prev = {c.get("type"): c for c in (adapter.get("status") or {}).get("conditions") or []}

    def conditions(
        status: str, reason: str, message: str, outcome: Literal["ready", "retrying", "stalled"]
    ) -> list[dict[str, Any]]:
        ready = {
            "type": "Ready",
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
        }
        out = kstatus_conditions(ready, outcome)
        for cond in out:  # a condition's transition time moves only when its status does
            old = prev.get(cond["type"])
            keep = old is not None and old.get("status") == cond["status"]
            cond["lastTransitionTime"] = old.get("lastTransitionTime") if keep and old else stamp
        return out

    if not result.ok:
        problems = "; ".join(result.problems[:5])
        transient = transient_failure(adapter, result.problems)
        reason = transient or VERIFICATION_FAILED
        message = f"{spec.get('artifact', {}).get('uri', '')}: {problems}"
        blocked = merge_blocked_for_good(adapter)
        if blocked and not transient:  # nothing was published because the merge was refused
            reason, message = str(blocked.get("reason")), f"merge refused: {blocked.get('message', '')}"
        return {
            "observedGeneration": generation,
            "phase": "Pending" if transient else "Failed",
            "conditions": conditions("False", reason, message, "retrying" if transient else "stalled"),
        }
    manifest = result.manifest
    assert manifest is not None
    lineage = manifest_lineage(meta, manifest)
    method = spec.get("method") or manifest.method
    servable = manifest.servable.get("vllm", method in VLLM_METHODS)
    return {
        "observedGeneration": generation,
        "phase": "Retired" if spec.get("lifecycle") == "retired" else "Ready",
        "conditions": conditions("True", VERIFIED, f"{len(manifest.files)} files verified", "ready"),
        "artifact": {
            "sha256": result.manifest_sha256,
            "sizeBytes": result.total_size,
            "files": len(manifest.files),
            "verifiedAt": stamp,
        },
        "metrics": {k: float(v) for k, v in manifest.metrics.items() if math.isfinite(v)},
        "lineage": lineage,
        "servable": {"vllm": bool(servable)},
    }


def _run_name(raw: Any) -> str | None:
    """The producing run's name: the trainer writes {namespace, name, uid}; older manifests a name."""
    if isinstance(raw, dict):
        raw = raw.get("name")
    return str(raw) if isinstance(raw, str) and raw else None


def _datasets(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """Structured dataset entries; older manifests' strings (name@etag) and hf pins become entries too."""
    out: list[dict[str, Any]] = []
    for item in lineage.get("datasets") or []:
        if isinstance(item, dict) and item.get("uri"):
            keys = ("name", "uri", "version", "etag", "sha256")
            out.append({k: str(item[k]) for k in keys if item.get(k) is not None})
            out[-1].setdefault("name", out[-1]["uri"])
        elif isinstance(item, str):
            name, _, version = item.partition("@")
            out.append({"name": name, "uri": name, **({"version": version} if version else {})})
    pinned = lineage.get("dataRevisions") or {}
    if isinstance(pinned, dict):
        out += [{"name": str(uri), "uri": str(uri), "version": str(sha)} for uri, sha in pinned.items()]
    return out[:256]


def manifest_lineage(meta: dict[str, Any], manifest: Manifest) -> dict[str, Any]:
    """The Adapter's status.lineage: its labels first (the operator's own), then the manifest's."""
    labels = meta.get("labels") or {}
    raw = manifest.lineage
    parent = raw.get("parent")
    parent_uri = parent.get("manifestUri") if isinstance(parent, dict) else parent
    parent_name = parent.get("name") if isinstance(parent, dict) else None
    lineage: dict[str, Any] = {
        "run": labels.get(LABEL_RUN) or _run_name(raw.get("run")),
        "stage": labels.get(LABEL_STAGE) or raw.get("stage"),
        "datasets": _datasets(raw),
        "trainerVersion": manifest.trainer_version,
        "baseModel": manifest.base_model,
        "baseModelRevision": raw.get("baseModelRevision"),
        "parent": (meta.get("annotations") or {}).get("temper.dev/parent") or parent_name,
        "parentUri": parent_uri if isinstance(parent_uri, str) else None,
        "contractHash": raw.get("contractHash"),
    }
    cycle = labels.get(LABEL_CYCLE) or raw.get("cycle")
    if str(cycle or "").isdigit() and int(str(cycle)) >= 1:
        lineage["generation"] = int(str(cycle))
    return {k: v for k, v in lineage.items() if v is not None and v != ""}


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
