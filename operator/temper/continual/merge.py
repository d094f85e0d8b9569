"""Merge planning: an Adapter with ``spec.merge`` becomes one merge stage run by the trainer.

Validation before any Job exists: at least two sources, each an existing Adapter that is Ready
and active, all on the same base model, all weight-based PEFT adapters (LoRA family; prompt and
prefix tuning have no weights to merge). Each failure is a condition reason with a message that
names the source(s).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from temper.api.contract import (
    AdapterRef,
    MergeSpec,
    OutputSpec,
    RunRef,
    StageContract,
    StageRef,
    StorageConfig,
)

MERGEABLE_METHODS = frozenset({"lora", "qlora", "adalora"})
MERGE_METHODS = ("linear", "ties", "dare_ties", "cat")


@dataclass(frozen=True)
class MergeBlocked:
    reason: str  # condition reason
    message: str


@dataclass(frozen=True)
class MergePlan:
    base_model: str
    method: str
    density: float | None
    sources: tuple[AdapterRef, ...]
    output_prefix: str


def _ready(adapter: Mapping[str, Any]) -> bool:
    conditions = (adapter.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def output_prefix_for(adapter: Mapping[str, Any]) -> str | None:
    """Where the merged adapter is published: the folder of its own spec.artifact.uri."""
    uri = ((adapter.get("spec") or {}).get("artifact") or {}).get("uri")
    if not isinstance(uri, str) or not uri.startswith("s3://") or not uri.endswith("/manifest.json"):
        return None
    return uri[: -len("manifest.json")]


def plan_merge(
    adapter: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any] | None]
) -> MergePlan | MergeBlocked:
    """Validate ``spec.merge`` against the observed source Adapters (name -> object or None)."""
    merge = (adapter.get("spec") or {}).get("merge") or {}
    refs = merge.get("sources") or []
    if len(refs) < 2:
        return MergeBlocked(
            "InvalidMerge", f"spec.merge.sources: a merge needs at least 2 sources, got {len(refs)}"
        )
    names = [str(r.get("name", "")) for r in refs]
    if any(not n for n in names):
        return MergeBlocked("InvalidMerge", "spec.merge.sources[].name: required")
    if len(set(names)) != len(names):
        return MergeBlocked("InvalidMerge", f"spec.merge.sources: duplicate source in {names}")
    method = merge.get("method", "linear")
    if method not in MERGE_METHODS:
        return MergeBlocked(
            "InvalidMerge", f"spec.merge.method: {method!r} is not one of {list(MERGE_METHODS)}"
        )
    density = merge.get("density")
    if density is not None and not (isinstance(density, int | float) and 0 < density <= 1):
        return MergeBlocked("InvalidMerge", f"spec.merge.density: must be in (0, 1], got {density!r}")
    if method in ("ties", "dare_ties") and density is None:
        density = 0.5
    prefix = output_prefix_for(adapter)
    if prefix is None:
        return MergeBlocked(
            "InvalidMerge",
            "spec.artifact.uri: a merged adapter needs s3://.../manifest.json as where to publish",
        )
    missing = [n for n in names if sources.get(n) is None]
    if missing:
        return MergeBlocked(
            "SourceNotFound", f"spec.merge.sources: adapter(s) not found: {', '.join(missing)}"
        )
    retired = [n for n in names if ((sources[n] or {}).get("spec") or {}).get("lifecycle") == "retired"]
    if retired:
        return MergeBlocked(
            "SourceRetired", f"spec.merge.sources: retired adapter(s) cannot be merged: {', '.join(retired)}"
        )
    not_ready = [n for n in names if not _ready(sources[n] or {})]
    if not_ready:
        return MergeBlocked(
            "SourceNotReady",
            f"spec.merge.sources: waiting for adapter(s) to be Ready: {', '.join(not_ready)}",
        )
    bases = {
        n: str((((sources[n] or {}).get("spec") or {}).get("baseModel") or {}).get("uri", "")) for n in names
    }
    own_base = (((adapter.get("spec") or {}).get("baseModel")) or {}).get("uri")
    if len(set(bases.values())) != 1 or (own_base and own_base not in bases.values()):
        detail = ", ".join(f"{n}={b or '<none>'}" for n, b in bases.items())
        if own_base:
            detail += f"; this adapter's spec.baseModel.uri={own_base}"
        return MergeBlocked(
            "BaseModelMismatch", f"spec.merge.sources: all sources must share a base model: {detail}"
        )
    methods = {n: str(((sources[n] or {}).get("spec") or {}).get("method", "lora")) for n in names}
    unmergeable = [f"{n} ({m})" for n, m in methods.items() if m not in MERGEABLE_METHODS]
    if unmergeable:
        return MergeBlocked(
            "UnsupportedMethod",
            f"spec.merge.sources: only LoRA-family adapters merge; not: {', '.join(unmergeable)}",
        )
    weights = {str(r.get("name")): float(r.get("weight", 1.0)) for r in refs}
    adapter_refs = tuple(
        AdapterRef.model_validate(
            {
                "name": n,
                "manifestUri": ((sources[n] or {}).get("spec") or {})["artifact"]["uri"],
                "weight": weights[n],
            }
        )
        for n in names
    )
    return MergePlan(next(iter(bases.values())), method, density, adapter_refs, prefix)


def merge_contract(
    plan: MergePlan,
    *,
    namespace: str,
    name: str,
    uid: str,
    storage: StorageConfig,
    attempt: int = 1,
) -> StageContract:
    """The stage contract for the merge Job (rendered into a Job by the operator's builder)."""
    return StageContract.model_validate(
        {
            "run": RunRef(namespace=namespace, name=name, uid=uid).model_dump(by_alias=True),
            "stage": StageRef(name="merge", type="merge", attempt=attempt).model_dump(by_alias=True),
            "baseModel": plan.base_model,
            "storage": storage.model_dump(by_alias=True),
            "output": OutputSpec(prefix=plan.output_prefix).model_dump(by_alias=True),
            "merge": MergeSpec.model_validate({"method": plan.method, "density": plan.density}).model_dump(
                by_alias=True, exclude_none=True
            ),
            "mergeSources": [s.model_dump(by_alias=True) for s in plan.sources],
        }
    )
