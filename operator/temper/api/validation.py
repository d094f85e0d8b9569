"""Validating whole manifests the way the apiserver does, with errors that name the field.

``parse_manifest`` picks the kind; ``error_messages`` renders pydantic errors as
``spec.stages[1].peft: bits: ...``; ``check_update`` mirrors the CRDs' transition rules
(``self == oldSelf``), which pydantic cannot see because they compare old and new.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from temper.api.adapter import Adapter, AdapterSpec
from temper.api.run import PostTrainingRun, PostTrainingRunSpec

RUN_IMMUTABLE = ("baseModel", "storage", "stages")
ADAPTER_IMMUTABLE = ("baseModel", "artifact", "method", "merge")
_RELATIVE_FIELD = re.compile(
    r"^([A-Za-z][A-Za-z0-9]*(?:\[\d*\])?(?:\.[A-Za-z][A-Za-z0-9]*(?:\[\d*\])?)*): (.*)$", re.S
)
KINDS: dict[str, type[PostTrainingRun] | type[Adapter]] = {
    "PostTrainingRun": PostTrainingRun,
    "Adapter": Adapter,
}


def parse_manifest(obj: dict[str, Any]) -> PostTrainingRun | Adapter:
    """Validate a PostTrainingRun or Adapter manifest; raises ``pydantic.ValidationError``."""
    kind = obj.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind].model_validate(obj)


def error_messages(exc: ValidationError) -> list[str]:
    """One ``<field path>: <message>`` line per error, paths in Kubernetes style (``a.b[0].c``)."""
    lines = []
    for error in exc.errors():
        path = ""
        for part in error["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = error["msg"].removeprefix("Value error, ")
        # Our validators start their messages with the field relative to the model they check.
        relative = _RELATIVE_FIELD.match(message)
        if relative and path:
            path, message = f"{path}.{relative[1]}", relative[2]
        lines.append(f"{path}: {message}" if path else message)
    return lines


def check_update(kind: str, old_spec: dict[str, Any], new_spec: dict[str, Any]) -> list[str]:
    """Violations (each naming the field) of updating ``old_spec`` to ``new_spec``; empty if allowed.

    Specs are compared after validation, so defaults (which the apiserver fills in too) never
    count as a change.
    """
    model: type[PostTrainingRunSpec] | type[AdapterSpec]
    fields: tuple[str, ...]
    if kind == "PostTrainingRun":
        model, fields = PostTrainingRunSpec, RUN_IMMUTABLE
    elif kind == "Adapter":
        model, fields = AdapterSpec, ADAPTER_IMMUTABLE
    else:
        raise ValueError(f"kind: unknown kind {kind!r}")
    old = model.model_validate(old_spec).model_dump(by_alias=True, exclude_none=True)
    new = model.model_validate(new_spec).model_dump(by_alias=True, exclude_none=True)
    problems = [f"spec.{name} is immutable" for name in fields if old.get(name) != new.get(name)]
    if kind == "Adapter" and old.get("lifecycle") == "retired" and new.get("lifecycle") == "active":
        problems.append("spec.lifecycle: a retired adapter cannot become active again")
    return problems
