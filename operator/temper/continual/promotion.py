"""Aliases: a name (e.g. ``stable``) per run that points at one Adapter, with history and rollback.

The alias lives in a ConfigMap ``temper-alias-<run>-<alias>`` (labels ``temper.dev/alias``,
``temper.dev/run``) so serving systems can follow it without reading temper's CRDs:

- ``adapter``, ``manifestUri``, ``adapterUri`` (the folder holding adapter_config.json and
  adapter_model.safetensors), ``baseModel``;
- ``vllm-lora-modules.json``: one entry in vLLM's ``--lora-modules`` JSON form
  (``{"name", "path", "base_model_name"}``);
- ``vllm-load-lora-adapter.json``: the body for vLLM's ``POST /v1/load_lora_adapter``;
- ``history.json``: earlier targets, newest last, bounded.

Rollback: set ``data.adapter`` back to an earlier Adapter (``kubectl edit`` / ``patch``); the
operator validates it (exists, Ready, not retired), re-renders the other keys and records the
rollback in the history. See docs/continual.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ALIAS_LABEL = "temper.dev/alias"
RUN_LABEL = "temper.dev/run"
HISTORY_LIMIT = 20


class PromotionError(ValueError):
    """A promotion or rollback that must not happen; the message says why."""


@dataclass(frozen=True)
class AdapterTarget:
    """What an alias needs to know about an Adapter."""

    name: str
    manifest_uri: str
    base_model: str
    adapter_uri: str
    generation: int | None = None

    @classmethod
    def from_adapter(cls, adapter: Mapping[str, Any]) -> AdapterTarget:
        """From an Adapter object; refuses adapters that may not be promoted."""
        name = str(adapter.get("metadata", {}).get("name", ""))
        problem = promotion_blocker(adapter)
        if problem:
            raise PromotionError(f"adapter {name}: {problem}")
        spec = adapter.get("spec", {})
        status = adapter.get("status", {}) or {}
        manifest_uri = str((spec.get("artifact") or {}).get("uri", ""))
        lineage = status.get("lineage") or {}
        generation = lineage.get("generation") or lineage.get("cycle")
        return cls(
            name=name,
            manifest_uri=manifest_uri,
            base_model=str((spec.get("baseModel") or {}).get("uri", "")),
            adapter_uri=str((status.get("artifact") or {}).get("adapterUri") or adapter_folder(manifest_uri)),
            generation=int(generation) if isinstance(generation, int) else None,
        )


def promotion_blocker(adapter: Mapping[str, Any]) -> str | None:
    """Why this Adapter cannot be promoted, or None."""
    spec = adapter.get("spec", {}) or {}
    if spec.get("lifecycle", "active") == "retired":
        return "is retired; a retired adapter is never promoted"
    if adapter.get("metadata", {}).get("deletionTimestamp"):
        return "is being deleted"
    conditions = (adapter.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    if ready is None or ready.get("status") != "True":
        reason = "" if ready is None else f" ({ready.get('reason')}: {ready.get('message', '')})"
        return f"is not Ready{reason}"
    if not (spec.get("artifact") or {}).get("uri"):
        return "has no spec.artifact.uri"
    return None


def adapter_folder(manifest_uri: str, files: list[str] | None = None) -> str:
    """The folder serving systems load: where adapter_config.json sits (attempt folder)."""
    base = manifest_uri.rsplit("/", 1)[0]
    for rel in files or []:
        if rel.endswith("adapter_config.json"):
            sub = rel.rsplit("/", 1)[0] if "/" in rel else ""
            return f"{base}/{sub}/" if sub else f"{base}/"
    return f"{base}/"


def alias_configmap_name(run: str, alias: str) -> str:
    name = f"temper-alias-{run}-{alias}".lower()
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:242]}-{digest}"


@dataclass(frozen=True)
class HistoryEntry:
    adapter: str
    manifestUri: str
    at: str
    action: str  # promote | rollback
    generation: int | None = None


@dataclass
class AliasState:
    alias: str
    run: str
    target: AdapterTarget | None = None
    history: list[HistoryEntry] = field(default_factory=list)

    def point_at(self, target: AdapterTarget, *, now: str, action: str, limit: int = HISTORY_LIMIT) -> bool:
        """Move the alias; returns False when it already points there (idempotent)."""
        if (
            self.target is not None
            and self.target.name == target.name
            and self.target.manifest_uri == target.manifest_uri
        ):
            return False
        self.target = target
        self.history.append(HistoryEntry(target.name, target.manifest_uri, now, action, target.generation))
        del self.history[:-limit]
        return True

    def promote(self, target: AdapterTarget, *, now: str) -> bool:
        return self.point_at(target, now=now, action="promote")

    def rollback(self, target: AdapterTarget, *, now: str) -> bool:
        """Point back at an adapter the alias pointed at before."""
        if not any(h.adapter == target.name for h in self.history):
            known = sorted({h.adapter for h in self.history})
            raise PromotionError(
                f"alias {self.alias}: {target.name} was never promoted here; history has {known}"
            )
        return self.point_at(target, now=now, action="rollback")

    @property
    def previous(self) -> str | None:
        """The adapter the alias pointed at before the current one."""
        names = [h.adapter for h in self.history]
        current = self.target.name if self.target else None
        for name in reversed(names[:-1]):
            if name != current:
                return name
        return None

    # -- ConfigMap rendering --------------------------------------------------------------------
    def configmap(self, namespace: str) -> dict[str, Any]:
        data: dict[str, str] = {
            "alias": self.alias,
            "run": self.run,
            "history.json": json.dumps([asdict(h) for h in self.history], indent=1),
        }
        if self.target is not None:
            t = self.target
            lora_name = f"{self.run}-{self.alias}"
            data.update(
                {
                    "adapter": t.name,
                    "manifestUri": t.manifest_uri,
                    "adapterUri": t.adapter_uri,
                    "baseModel": t.base_model,
                    "vllm-lora-modules.json": json.dumps(
                        [{"name": lora_name, "path": t.adapter_uri, "base_model_name": t.base_model}]
                    ),
                    "vllm-load-lora-adapter.json": json.dumps(
                        {"lora_name": lora_name, "lora_path": t.adapter_uri}
                    ),
                }
            )
            if t.generation is not None:
                data["generation"] = str(t.generation)
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": alias_configmap_name(self.run, self.alias),
                "namespace": namespace,
                "labels": {
                    ALIAS_LABEL: self.alias,
                    RUN_LABEL: self.run,
                    "app.kubernetes.io/managed-by": "temper",
                },
            },
            "data": data,
        }

    @classmethod
    def from_configmap(cls, cm: Mapping[str, Any]) -> AliasState:
        data = cm.get("data") or {}
        labels = (cm.get("metadata") or {}).get("labels") or {}
        try:
            history = [HistoryEntry(**h) for h in json.loads(data.get("history.json") or "[]")]
        except (ValueError, TypeError):
            history = []  # a hand-mangled history must not wedge the alias
        state = cls(
            str(data.get("alias") or labels.get(ALIAS_LABEL, "")),
            str(data.get("run") or labels.get(RUN_LABEL, "")),
        )
        state.history = history
        if data.get("adapter") and data.get("manifestUri"):
            state.target = AdapterTarget(
                name=str(data["adapter"]),
                manifest_uri=str(data["manifestUri"]),
                base_model=str(data.get("baseModel", "")),
                adapter_uri=str(data.get("adapterUri", "")),
                generation=int(data["generation"]) if str(data.get("generation", "")).isdigit() else None,
            )
        return state

    def edited_to(self, cm: Mapping[str, Any]) -> str | None:
        """The adapter a user set ``data.adapter`` to, when it differs from the recorded target."""
        wanted = (cm.get("data") or {}).get("adapter")
        last = self.history[-1].adapter if self.history else None
        if wanted and wanted != last:
            return str(wanted)
        return None
