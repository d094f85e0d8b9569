"""Cron schedules with a time zone, missed-schedule handling and concurrency policies.

Semantics follow Kubernetes CronJob where it has them:

- 5-field cron (minute hour day-of-month month day-of-week) with ``*``, ranges ``a-b``, steps
  ``*/n``, ``a-b/n`` and ``a/n``, lists, month/day names (``jan``, ``mon``), ``7`` = Sunday, and
  the macros ``@yearly @annually @monthly @weekly @daily @midnight @hourly``.
- When both day-of-month and day-of-week are restricted, a day matches if *either* does (Vixie cron).
- Times are wall-clock times in ``timeZone``. Across DST: a wall time that does not exist
  (spring forward) fires at the end of the gap, once; a wall time that occurs twice (fall back)
  fires once, at its first occurrence.
- ``startingDeadlineSeconds``: a due time older than that when the controller sees it is missed
  (recorded, never started). Without it, the latest due time always starts.
- ``concurrencyPolicy``: Allow starts beside an active cycle; Forbid waits (the due time starts
  once the active cycle ends, if still within the deadline); Replace stops the active one first.

Tests drive a :class:`FakeClock`; nothing here sleeps.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ConcurrencyPolicy = Literal["Allow", "Forbid", "Replace"]
CONCURRENCY_POLICIES: tuple[ConcurrencyPolicy, ...] = ("Allow", "Forbid", "Replace")

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = {name: i for i, name in enumerate(calendar.month_abbr) if name}
_MONTH_NAMES = {k.lower(): v for k, v in _MONTHS.items()}
_DOW_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# (name, min, max, names)
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, _MONTH_NAMES),
    ("day-of-week", 0, 7, _DOW_NAMES),
)
# A schedule that never fires (e.g. "0 0 30 2 *") must not loop forever: 8 years covers
# every leap-year/weekday combination.
_SEARCH_DAYS = 366 * 8


class ScheduleError(ValueError):
    """An invalid schedule; the message names the field."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass
class FakeClock:
    """A clock tests move by hand."""

    current: datetime

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> datetime:
        self.current = self.current + delta
        return self.current

    def set(self, when: datetime) -> None:
        self.current = when


def _parse_value(token: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names.get(token.lower())
    if value is None:
        if not token.isdigit():
            raise ScheduleError(f"{name}: {token!r} is not a number or a known name")
        value = int(token)
    if not low <= value <= high:
        raise ScheduleError(f"{name}: {value} is outside {low}-{high}")
    return value


def _parse_field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ScheduleError(f"{name}: empty list item in {text!r}")
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ScheduleError(f"{name}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base in ("*", "?"):
            start, end = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start, end = _parse_value(a, name, low, high, names), _parse_value(b, name, low, high, names)
            if start > end:
                raise ScheduleError(f"{name}: range {base!r} runs backwards")
        else:
            start = _parse_value(base, name, low, high, names)
            end = high if step_text else start  # "5/15" means 5,20,35,50
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    time_zone: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    day_restricted: bool
    weekday_restricted: bool
    tz: ZoneInfo = field(compare=False)

    @classmethod
    def parse(cls, expression: str, time_zone: str | None = "UTC") -> CronSchedule:
        tz_name = time_zone or "UTC"
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"timeZone: unknown time zone {tz_name!r}") from None
        text = expression.strip()
        if text.lower().startswith("tz=") or text.lower().startswith("cron_tz="):
            raise ScheduleError("schedule: put the time zone in timeZone, not in the schedule")
        text = _MACROS.get(text.lower(), text)
        if text.startswith("@"):
            raise ScheduleError(f"schedule: unknown macro {expression!r}; known: {sorted(_MACROS)}")
        parts = text.split()
        if len(parts) != 5:
            raise ScheduleError(
                f"schedule: {expression!r} needs 5 fields (minute hour day month weekday), got {len(parts)}"
            )
        parsed = [
            _parse_field(part, f"schedule {name}", low, high, names)
            for part, (name, low, high, names) in zip(parts, _FIELDS, strict=True)
        ]
        weekdays = frozenset(d % 7 for d in parsed[4])
        return cls(
            expression=expression,
            time_zone=tz_name,
            minutes=parsed[0],
            hours=parsed[1],
            days=parsed[2],
            months=parsed[3],
            weekdays=weekdays,
            day_restricted=not parts[2].startswith("*"),
            weekday_restricted=not parts[4].startswith("*"),
            tz=tz,
        )

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.weekday() + 1) % 7 in self.weekdays
        if self.day_restricted and self.weekday_restricted:
            return dom or dow
        return dom and dow

    def _instant(self, naive: datetime) -> datetime:
        """The UTC instant of a local wall time; gaps map to the gap's end, folds to the first."""
        local = naive.replace(tzinfo=self.tz, fold=0)
        utc = local.astimezone(UTC)
        if utc.astimezone(self.tz).replace(tzinfo=None) == naive:
            return utc
        # Nonexistent wall time: the first existing minute after it is the end of the gap.
        probe = naive
        for _ in range(24 * 60):
            probe += timedelta(minutes=1)
            candidate = probe.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
            if candidate.astimezone(self.tz).replace(tzinfo=None) == probe:
                return candidate
        return utc

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire time strictly after ``after`` (UTC), or None if it never fires."""
        if after.tzinfo is None:
            raise ValueError("next_after needs a timezone-aware datetime")
        # Start a few hours early in wall-clock terms: DST can map earlier wall times later.
        local = after.astimezone(self.tz).replace(tzinfo=None) - timedelta(hours=3)
        day = local.date()
        for _ in range(_SEARCH_DAYS):
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        naive = datetime(day.year, day.month, day.day, hour, minute)
                        if naive < local.replace(second=0, microsecond=0):
                            continue
                        instant = self._instant(naive)
                        if instant > after:
                            return instant
            day += timedelta(days=1)
        return None

    def times_between(self, start: datetime, end: datetime, limit: int = 1000) -> list[datetime]:
        """Fire times in (start, end], at most ``limit`` (the earliest ones)."""
        times: list[datetime] = []
        cursor = start
        while len(times) < limit:
            nxt = self.next_after(cursor)
            if nxt is None or nxt > end:
                break
            times.append(nxt)
            cursor = nxt
        return times


@dataclass(frozen=True)
class DueDecision:
    """What the schedule wants now.

    ``start``: the scheduled time to start a cycle for (None: nothing to start now).
    ``stop_active``: Replace policy: stop the active cycle(s) first.
    ``missed``: due times dropped (past the deadline, or superseded by a later one).
    ``waiting``: a due time held back by Forbid.
    ``next_time``: the next fire time after now, for status.nextScheduleTime and requeueing.
    """

    start: datetime | None
    stop_active: bool
    missed: int
    waiting: datetime | None
    next_time: datetime | None
    reason: str


def decide(
    schedule: CronSchedule,
    *,
    now: datetime,
    last_scheduled: datetime | None,
    created: datetime,
    active_cycles: int,
    policy: ConcurrencyPolicy = "Forbid",
    starting_deadline_seconds: int | None = None,
    suspended: bool = False,
) -> DueDecision:
    """Decide whether a cycle starts now, like the CronJob controller does for a Job."""
    if policy not in CONCURRENCY_POLICIES:
        raise ScheduleError(f"concurrencyPolicy: {policy!r} is not one of {list(CONCURRENCY_POLICIES)}")
    next_time = schedule.next_after(now)
    base = last_scheduled or created
    earliest = base
    if starting_deadline_seconds is not None:
        # Times older than the deadline can never start: count them, don't start them.
        earliest = max(base, now - timedelta(seconds=starting_deadline_seconds + 1))
    due = schedule.times_between(earliest, now, limit=100_000)
    older_missed = len(schedule.times_between(base, earliest, limit=1000)) if earliest > base else 0
    if not due:
        return DueDecision(
            None, False, older_missed, None, next_time, "NotDue" if not older_missed else "MissedDeadline"
        )
    latest = due[-1]
    missed = older_missed + len(due) - 1
    if starting_deadline_seconds is not None and (now - latest).total_seconds() > starting_deadline_seconds:
        return DueDecision(None, False, missed + 1, None, next_time, "MissedDeadline")
    if suspended:
        return DueDecision(None, False, missed, None, next_time, "Suspended")
    if active_cycles and policy == "Forbid":
        return DueDecision(None, False, missed, latest, next_time, "ForbidConcurrent")
    return DueDecision(latest, bool(active_cycles) and policy == "Replace", missed, None, next_time, "Due")
