"""Stage registry: ``@register_stage(type)`` plus lazy import of ``temper_trainer.stages.<module>``.

Only the module for the requested type is imported, so one stage's heavy or optional
dependencies never burden another's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from temper_trainer.stage import StageContext, StageOutcome

StageFn = Callable[["StageContext"], "StageOutcome"]

# stage type (contract.StageType) -> module under temper_trainer.stages
STAGE_MODULES: dict[str, str] = {
    "sft": "sft",
    "eval": "eval",
    "dpo": "dpo",
    "grpo": "grpo",
    "reward-model": "reward_model",
    "synthetic-preferences": "synthetic_preferences",
    "merge": "merge",
}

_REGISTRY: dict[str, StageFn] = {}


def register_stage(stage_type: str) -> Callable[[StageFn], StageFn]:
    if stage_type not in STAGE_MODULES:
        raise ValueError(f"unknown stage type {stage_type!r}; known: {sorted(STAGE_MODULES)}")

    def decorate(fn: StageFn) -> StageFn:
        _REGISTRY[stage_type] = fn
        return fn

    return decorate


def get_stage(stage_type: str) -> StageFn:
    if stage_type not in _REGISTRY:
        module = STAGE_MODULES.get(stage_type)
        if module is None:
            raise KeyError(f"unknown stage type {stage_type!r}; known: {sorted(STAGE_MODULES)}")
        importlib.import_module(f"{__name__}.{module}")
    if stage_type not in _REGISTRY:
        raise KeyError(
            f"module temper_trainer.stages.{STAGE_MODULES[stage_type]} registers no {stage_type!r}"
        )
    return _REGISTRY[stage_type]
