"""The pure planner: the run's spec and its observed children in, desired actions and status out."""

from __future__ import annotations

from temper.planner.observed import Observed, ObservedAdapter, ObservedJob, format_time, parse_time
from temper.planner.plan import Event, Plan, RunningAttempt, StageTransition, backoff_seconds, plan

__all__ = [
    "Event",
    "Observed",
    "ObservedAdapter",
    "ObservedJob",
    "Plan",
    "RunningAttempt",
    "StageTransition",
    "backoff_seconds",
    "format_time",
    "parse_time",
    "plan",
]
