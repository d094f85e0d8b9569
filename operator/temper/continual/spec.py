"""``spec.continual`` as the continual planner reads it, validated with field-naming errors.

It reads the raw (camelCase) object kopf hands over so the planner does not depend on how the
API models spell their Python attributes; ``temper.api`` stays the schema (CRD/CEL) source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from temper.continual.data_selection import NewDataSpec, SelectionError
from temper.continual.gates import Gate, GateError
from temper.continual.replay import ReplayError, ReplaySettings
from temper.continual.schedule import CONCURRENCY_POLICIES, ConcurrencyPolicy, CronSchedule, ScheduleError

DEFAULT_HISTORY_LIMIT = 10
WHERE = "spec.continual"


class ContinualSpecError(ValueError):
    """Invalid spec.continual; the message names the field."""


@dataclass(frozen=True)
class PromoteSpec:
    alias: str
    require_gates: bool = True


@dataclass(frozen=True)
class ContinualSpec:
    schedule: CronSchedule
    concurrency_policy: ConcurrencyPolicy
    starting_deadline_seconds: int | None
    new_data: NewDataSpec | None
    replay: ReplaySettings
    gates: tuple[Gate, ...]
    promote: PromoteSpec | None
    history_limit: int


def eval_suite_gates(stages: Sequence[Mapping[str, Any]]) -> list[Gate]:
    """Gates declared on eval stages: every suite with a maxRegression."""
    gates: list[Gate] = []
    for i, stage in enumerate(stages):
        if stage.get("type") != "eval":
            continue
        for j, suite in enumerate(stage.get("suites") or []):
            if suite.get("maxRegression") is None:
                continue
            try:
                gates.append(
                    Gate.from_dict({**suite, "suite": suite.get("name")}, f"spec.stages[{i}].suites[{j}]")
                )
            except GateError as exc:
                raise ContinualSpecError(str(exc)) from None
    return gates


def parse_continual(spec: Mapping[str, Any]) -> ContinualSpec | None:
    """The run's continual settings, or None for a one-shot run."""
    raw = spec.get("continual")
    if not raw:
        return None
    try:
        schedule = CronSchedule.parse(str(raw.get("schedule") or ""), raw.get("timeZone") or "UTC")
    except ScheduleError as exc:
        raise ContinualSpecError(f"{WHERE}.{exc}") from None
    policy = raw.get("concurrencyPolicy", "Forbid")
    if policy not in CONCURRENCY_POLICIES:
        raise ContinualSpecError(
            f"{WHERE}.concurrencyPolicy: {policy!r} is not one of {list(CONCURRENCY_POLICIES)}"
        )
    deadline = raw.get("startingDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or isinstance(deadline, bool) or deadline < 0):
        raise ContinualSpecError(
            f"{WHERE}.startingDeadlineSeconds: must be an integer >= 0, got {deadline!r}"
        )
    history = raw.get("historyLimit", DEFAULT_HISTORY_LIMIT)
    if not isinstance(history, int) or isinstance(history, bool) or history < 1:
        raise ContinualSpecError(f"{WHERE}.historyLimit: must be an integer >= 1, got {history!r}")
    try:
        new_data = NewDataSpec.from_dict(raw["newData"], f"{WHERE}.newData") if raw.get("newData") else None
        replay = ReplaySettings.from_dict(raw.get("replay"), f"{WHERE}.replay")
        gates = [Gate.from_dict(g, f"{WHERE}.gates[{i}]") for i, g in enumerate(raw.get("gates") or [])]
    except (SelectionError, ReplayError, GateError) as exc:
        raise ContinualSpecError(str(exc)) from None
    stages = spec.get("stages") or []
    if new_data is not None:
        names = {d.get("name") for d in spec.get("datasets") or []}
        if new_data.dataset not in names:
            known = sorted(n for n in names if n)
            raise ContinualSpecError(
                f"{WHERE}.newData.dataset: {new_data.dataset!r} is not in spec.datasets ({known})"
            )
    declared = {(g.suite, g.metric) for g in gates}
    gates += [g for g in eval_suite_gates(stages) if (g.suite, g.metric) not in declared]
    if gates and not any(s.get("type") == "eval" for s in stages):
        raise ContinualSpecError(
            f"{WHERE}.gates: gates need an eval stage in spec.stages to produce suite results"
        )
    promote_raw = raw.get("promote")
    promote = None
    if promote_raw:
        alias = promote_raw.get("alias")
        if not isinstance(alias, str) or not alias:
            raise ContinualSpecError(f"{WHERE}.promote.alias: required")
        promote = PromoteSpec(alias, bool(promote_raw.get("requireGates", True)))
    return ContinualSpec(schedule, policy, deadline, new_data, replay, tuple(gates), promote, history)
