"""Cron schedules with time zones, DST, missed schedules and concurrency policies; a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from temper.continual.schedule import CronSchedule, DueDecision, FakeClock, ScheduleError, decide

pytestmark = pytest.mark.unit


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


HOURLY = CronSchedule.parse("0 * * * *")
CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def decide_at(
    now: datetime, last_scheduled: datetime | None, sched: CronSchedule = HOURLY, **options: Any
) -> DueDecision:
    """decide() for a run created on 2026-01-01, with no active cycle unless ``options`` say so."""
    options.setdefault("active_cycles", 0)
    return decide(sched, now=now, last_scheduled=last_scheduled, created=CREATED, **options)


def fires(expr: str, start: datetime, n: int, tz: str = "UTC") -> list[datetime]:
    sched = CronSchedule.parse(expr, tz)
    out, cursor = [], start
    for _ in range(n):
        nxt = sched.next_after(cursor)
        assert nxt is not None
        out.append(nxt)
        cursor = nxt
    return out


def test_every_fifteen_minutes_and_lists_ranges_steps() -> None:
    assert fires("*/15 * * * *", utc(2026, 1, 1, 0, 7), 3) == [
        utc(2026, 1, 1, 0, 15),
        utc(2026, 1, 1, 0, 30),
        utc(2026, 1, 1, 0, 45),
    ]
    assert fires("5,10 8-9 * * *", utc(2026, 1, 1), 5) == [
        utc(2026, 1, 1, 8, 5),
        utc(2026, 1, 1, 8, 10),
        utc(2026, 1, 1, 9, 5),
        utc(2026, 1, 1, 9, 10),
        utc(2026, 1, 2, 8, 5),
    ]
    assert fires("0 1-10/4 * * *", utc(2026, 1, 1), 3) == [utc(2026, 1, 1, h) for h in (1, 5, 9)]
    assert fires("10/20 0 * * *", utc(2026, 1, 1), 3) == [utc(2026, 1, 1, 0, m) for m in (10, 30, 50)]


def test_names_macros_and_sunday_as_seven() -> None:
    # 2026-01-04 is a Sunday.
    assert fires("0 3 * * sun", utc(2026, 1, 1), 1) == [utc(2026, 1, 4, 3)]
    assert fires("0 3 * * 7", utc(2026, 1, 1), 1) == [utc(2026, 1, 4, 3)]
    assert fires("0 0 1 feb-mar *", utc(2026, 1, 15), 2) == [utc(2026, 2, 1), utc(2026, 3, 1)]
    assert fires("@daily", utc(2026, 1, 1, 12), 1) == [utc(2026, 1, 2)]
    assert fires("@hourly", utc(2026, 1, 1, 12, 30), 1) == [utc(2026, 1, 1, 13)]
    assert fires("@weekly", utc(2026, 1, 1), 1) == [utc(2026, 1, 4)]
    assert fires("@monthly", utc(2026, 1, 1, 0, 1), 1) == [utc(2026, 2, 1)]
    assert fires("@yearly", utc(2026, 1, 1, 0, 1), 1) == [utc(2027, 1, 1)]


def test_day_of_month_or_day_of_week_when_both_restricted() -> None:
    # Vixie cron: the 13th OR any Friday. Jan 2026: Fri 2nd, 9th, 13th (Tue), 16th.
    days = [d.day for d in fires("0 0 13 * fri", utc(2026, 1, 1), 4)]
    assert days == [2, 9, 13, 16]


def test_leap_day_and_never_firing_schedule() -> None:
    assert fires("0 0 29 2 *", utc(2026, 3, 1), 1) == [utc(2028, 2, 29)]
    assert CronSchedule.parse("0 0 30 2 *").next_after(utc(2026, 1, 1)) is None


def test_time_zone_wall_clock() -> None:
    # 03:00 in Berlin is 02:00 UTC in winter, 01:00 UTC in summer.
    assert fires("0 3 * * *", utc(2026, 1, 10), 1, "Europe/Berlin") == [utc(2026, 1, 10, 2)]
    assert fires("0 3 * * *", utc(2026, 7, 10), 1, "Europe/Berlin") == [utc(2026, 7, 10, 1)]


def test_dst_spring_forward_gap_fires_once_at_gap_end() -> None:
    # New York 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC). 02:30 does not exist.
    got = fires("30 2 * * *", utc(2026, 3, 7, 12), 2, "America/New_York")
    assert got == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]
    # Every 15 minutes of the skipped hour collapse into one fire at the gap's end.
    gap = fires("*/15 2 * * *", utc(2026, 3, 8, 5), 2, "America/New_York")
    assert gap == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6)]


def test_dst_fall_back_fires_once_at_first_occurrence() -> None:
    # New York 2026-11-01: 01:30 happens twice (05:30 and 06:30 UTC); fire only at 05:30.
    got = fires("30 1 * * *", utc(2026, 10, 31, 12), 2, "America/New_York")
    assert got == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    hourly = fires("0 * * * *", utc(2026, 11, 1, 4, 30), 4, "America/New_York")
    # 01:00 EDT (05:00Z), 02:00 EST (07:00Z): the repeated 01:00 EST (06:00Z) is not a new wall time.
    assert hourly[:2] == [utc(2026, 11, 1, 5), utc(2026, 11, 1, 7)]


@pytest.mark.parametrize(
    ("expr", "tz", "field"),
    [
        ("* * * *", "UTC", "needs 5 fields"),
        ("61 * * * *", "UTC", "minute: 61 is outside 0-59"),
        ("* 24 * * *", "UTC", "hour: 24"),
        ("* * 0 * *", "UTC", "day-of-month: 0"),
        ("* * * 13 *", "UTC", "month: 13"),
        ("* * * * 8", "UTC", "day-of-week: 8"),
        ("*/0 * * * *", "UTC", "step"),
        ("5-1 * * * *", "UTC", "runs backwards"),
        ("* * * foo *", "UTC", "month: 'foo'"),
        ("@sometimes", "UTC", "unknown macro"),
        ("* * * * *", "Mars/Olympus", "timeZone: unknown time zone"),
        ("TZ=UTC * * * * *", "UTC", "timeZone"),
    ],
)
def test_invalid_schedules_name_the_field(expr: str, tz: str, field: str) -> None:
    with pytest.raises(ScheduleError, match=field.replace("(", r"\(")):
        CronSchedule.parse(expr, tz)


def test_decide_not_due_then_due_with_fake_clock() -> None:
    sched = CronSchedule.parse("0 3 * * *", "UTC")
    clock = FakeClock(utc(2026, 1, 1, 1))
    created = clock.now()
    d = decide(sched, now=clock.now(), last_scheduled=None, created=created, active_cycles=0)
    assert d.start is None
    assert d.reason == "NotDue"
    assert d.next_time == utc(2026, 1, 1, 3)
    clock.advance(timedelta(hours=2, seconds=5))
    d = decide(sched, now=clock.now(), last_scheduled=None, created=created, active_cycles=0)
    assert d.start == utc(2026, 1, 1, 3)
    assert d.missed == 0
    assert d.next_time == utc(2026, 1, 2, 3)
    # Once consumed, the same time never starts again.
    d = decide(sched, now=clock.now(), last_scheduled=d.start, created=created, active_cycles=0)
    assert d.start is None


def test_missed_schedules_without_deadline_start_only_the_latest() -> None:
    d = decide_at(utc(2026, 1, 1, 5, 10), utc(2026, 1, 1, 1))
    assert d.start == utc(2026, 1, 1, 5)
    assert d.missed == 3  # 02:00, 03:00, 04:00 dropped


def test_starting_deadline_drops_a_stale_schedule() -> None:
    sched = CronSchedule.parse("0 3 * * *")
    now = utc(2026, 1, 1, 3, 10)  # operator was down 10 minutes past the due time
    d = decide_at(now, None, sched, starting_deadline_seconds=300)
    assert d.start is None
    assert d.reason == "MissedDeadline"
    assert d.missed == 1
    ok = decide_at(now, None, sched, starting_deadline_seconds=900)
    assert ok.start == utc(2026, 1, 1, 3)


def test_concurrency_policies() -> None:
    sched = CronSchedule.parse("0 * * * *")
    args: dict[str, Any] = {
        "now": utc(2026, 1, 1, 2, 1),
        "last_scheduled": utc(2026, 1, 1, 1),
        "created": utc(2026, 1, 1),
    }
    forbid = decide(sched, **args, active_cycles=1, policy="Forbid")
    assert forbid.start is None
    assert forbid.waiting == utc(2026, 1, 1, 2)
    assert forbid.reason == "ForbidConcurrent"
    allow = decide(sched, **args, active_cycles=1, policy="Allow")
    assert allow.start == utc(2026, 1, 1, 2)
    assert not allow.stop_active
    replace = decide(sched, **args, active_cycles=1, policy="Replace")
    assert replace.start == utc(2026, 1, 1, 2)
    assert replace.stop_active
    # Forbid then the active cycle ends within the deadline: the held-back time starts.
    later = decide_at(
        utc(2026, 1, 1, 2, 4), utc(2026, 1, 1, 1), policy="Forbid", starting_deadline_seconds=600
    )
    assert later.start == utc(2026, 1, 1, 2)
    with pytest.raises(ScheduleError, match="concurrencyPolicy"):
        decide(sched, **args, active_cycles=0, policy="Sometimes")  # type: ignore[arg-type]


def test_suspended_starts_nothing() -> None:
    d = decide_at(utc(2026, 1, 1, 2, 1), utc(2026, 1, 1, 1), suspended=True)
    assert d.start is None
    assert d.reason == "Suspended"


def test_next_after_accepts_other_time_zones_and_rejects_naive() -> None:
    sched = CronSchedule.parse("0 12 * * *", "Asia/Tokyo")
    tokyo_morning = datetime(2026, 6, 1, 9, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    assert sched.next_after(tokyo_morning) == utc(2026, 6, 1, 3)
    with pytest.raises(ValueError, match="timezone-aware"):
        sched.next_after(datetime(2026, 1, 1))
