"""Tests of cron fire times, time zones, and the schedule loop.

The schedule loop runs on trio's autojump clock with a `TrioWallClock`, so
hours of schedule pass in milliseconds and every wall-clock step is exact.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from supervisor import cron, errors
from supervisor.model import RunTrigger
from supervisor.scheduler import (
    CronSchedule,
    SystemClock,
    TrioWallClock,
    run_schedule,
)


def listing(expression: str, timezone: str, after: str, count: int) -> list[str]:
    schedule = CronSchedule(expression, timezone)
    instant = datetime.fromisoformat(after)
    return [t.isoformat() for t in schedule.next_times(instant, count)]


def dates(expression: str, after: str, count: int) -> list[str]:
    """List the next fire dates of a UTC schedule as YYYY-MM-DD."""
    return [t[:10] for t in listing(expression, "UTC", after, count)]


def year_of_fire_times(
    expression: str, timezone: str, year: int, count: int
) -> list[datetime]:
    """List the fire times in a local calendar year, checking that there are
    exactly `count`."""
    zone = ZoneInfo(timezone)
    start = datetime(year, 1, 1, tzinfo=zone)
    end = datetime(year + 1, 1, 1, tzinfo=zone).astimezone(UTC)
    schedule = CronSchedule(expression, timezone)

    fire_times = schedule.next_times(start - timedelta(seconds=1), count + 1)

    assert fire_times[0].astimezone(UTC) >= start.astimezone(UTC)
    assert fire_times[-2].astimezone(UTC) < end
    assert fire_times[-1].astimezone(UTC) >= end
    return fire_times[:-1]


# -- time zones and daylight saving time ----------------------------------


@pytest.mark.parametrize(
    ("expression", "timezone", "after", "expected"),
    [
        pytest.param(
            "0 20 * * *",
            "Europe/Paris",
            "2022-10-30T00:00+02:00",
            [
                "2022-10-30T20:00+01:00",
                "2022-10-31T20:00+01:00",
                "2022-11-01T20:00+01:00",
            ],
            id="daily-evening-keeps-its-hour",
        ),
        pytest.param(
            "0 8 * * 1",
            "Europe/Amsterdam",
            "2017-10-16T09:00+02:00",
            [
                "2017-10-23T08:00+02:00",
                "2017-10-30T08:00+01:00",
                "2017-11-06T08:00+01:00",
            ],
            id="weekly-gains-no-extra-run",
        ),
        pytest.param(
            "30 2 * * *",
            "Europe/Paris",
            "2022-10-29T12:00+02:00",
            ["2022-10-30T02:30+02:00", "2022-10-31T02:30+01:00"],
            id="fixed-time-in-repeated-hour-fires-once",
        ),
        pytest.param(
            "*/30 * * * *",
            "Europe/Paris",
            "2022-10-30T01:45+02:00",
            [
                "2022-10-30T02:00+02:00",
                "2022-10-30T02:30+02:00",
                "2022-10-30T02:00+01:00",
                "2022-10-30T02:30+01:00",
                "2022-10-30T03:00+01:00",
            ],
            id="interval-keeps-real-time-spacing",
        ),
    ],
)
def test_fall_back(
    expression: str, timezone: str, after: str, expected: list[str]
) -> None:
    count = len(expected)
    want = [datetime.fromisoformat(text).isoformat() for text in expected]
    assert listing(expression, timezone, after, count) == want


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        pytest.param(
            "30 2 * * *",
            "2022-03-26T12:00+01:00",
            ["2022-03-27T03:00+02:00", "2022-03-28T02:30+02:00"],
            id="fixed-time-in-gap-fires-at-its-end",
        ),
        pytest.param(
            "0 2,3 * * *",
            "2022-03-27T00:00+01:00",
            ["2022-03-27T03:00+02:00", "2022-03-28T02:00+02:00"],
            id="gap-time-and-gap-end-fire-once",
        ),
        pytest.param(
            "* 2 * * *",
            "2022-03-27T00:00+01:00",
            ["2022-03-27T03:00+02:00", "2022-03-28T02:00+02:00"],
            id="every-minute-of-skipped-hour-fires-once",
        ),
        pytest.param(
            "*/30 * * * *",
            "2022-03-27T01:00+01:00",
            [
                "2022-03-27T01:30+01:00",
                "2022-03-27T03:00+02:00",
                "2022-03-27T03:30+02:00",
            ],
            id="interval-skips-the-gap",
        ),
        pytest.param(
            "15 * * * *",
            "2022-03-27T01:00+01:00",
            ["2022-03-27T01:15+01:00", "2022-03-27T03:15+02:00"],
            id="hourly-skips-the-gap",
        ),
    ],
)
def test_spring_forward(expression: str, after: str, expected: list[str]) -> None:
    want = [datetime.fromisoformat(text).isoformat() for text in expected]
    assert listing(expression, "Europe/Paris", after, len(expected)) == want


def test_fixed_hour_fires_only_in_first_pass() -> None:
    fire_times = CronSchedule("* 2 * * *", "Europe/Paris").next_times(
        datetime.fromisoformat("2022-10-30T00:00+02:00"), 61
    )

    offsets = {t.utcoffset() for t in fire_times[:60]}
    assert offsets == {timedelta(hours=2)}
    assert fire_times[60].isoformat() == "2022-10-31T02:00:00+01:00"


def test_half_hour_shift_of_lord_howe() -> None:
    # Lord Howe Island moves its clocks by 30 minutes: back from 02:00 to
    # 01:30, and forward from 02:00 to 02:30.
    repeated = listing("45 1 * * *", "Australia/Lord_Howe", "2022-04-02T12:00Z", 2)
    skipped = listing("15 2 * * *", "Australia/Lord_Howe", "2022-10-01T12:00Z", 2)

    assert repeated == ["2022-04-03T01:45:00+11:00", "2022-04-04T01:45:00+10:30"]
    assert skipped == ["2022-10-02T02:30:00+11:00", "2022-10-03T02:15:00+11:00"]


def test_skipped_day_of_samoa() -> None:
    # Samoa skipped 30 December 2011 when it moved across the date line.
    fire_times = listing("0 12 * * *", "Pacific/Apia", "2011-12-29T00:00-10:00", 3)

    assert fire_times == [
        "2011-12-29T12:00:00-10:00",
        "2011-12-31T00:00:00+14:00",
        "2011-12-31T12:00:00+14:00",
    ]


@pytest.mark.parametrize(
    ("expression", "timezone", "count"),
    [
        ("*/30 * * * *", "Europe/Paris", 365 * 24 * 2),
        ("15 * * * *", "America/New_York", 365 * 24),
        ("30 2 * * *", "Europe/Paris", 365),
        # 363 ordinary days of 60, the spring day of 1, the autumn day of 60.
        ("* 2 * * *", "Europe/Paris", 363 * 60 + 1 + 60),
        ("45 1 * * *", "Australia/Lord_Howe", 365),
        ("*/15 * * * *", "Australia/Lord_Howe", 365 * 24 * 4),
        ("0 8 * * 1-5", "America/New_York", 260),
        # Santiago skipped midnight on 11 September 2022.
        ("0 0 * * *", "America/Santiago", 365),
    ],
)
def test_year_listing_strictly_increasing(
    expression: str, timezone: str, count: int
) -> None:
    fire_times = year_of_fire_times(expression, timezone, 2022, count)
    utc_times = [t.astimezone(UTC) for t in fire_times]

    assert all(a < b for a, b in itertools.pairwise(utc_times))
    assert all(t.tzinfo == ZoneInfo(timezone) for t in fire_times)


@pytest.mark.parametrize(
    ("expression", "after"),
    [
        ("*/30 * * * *", "2022-10-30T01:45+02:00"),
        ("*/20 * * * *", "2022-03-27T00:45+01:00"),
        ("30 2 * * *", "2022-10-29T12:00+02:00"),
        ("0 2,3 * * *", "2022-03-26T12:00+01:00"),
    ],
)
def test_next_after_agrees_with_listing(expression: str, after: str) -> None:
    schedule = CronSchedule(expression, "Europe/Paris")
    fire_times = schedule.next_times(datetime.fromisoformat(after), 12)

    for previous, following in itertools.pairwise(fire_times):
        assert schedule.next_after(previous).isoformat() == following.isoformat()
        # Arithmetic on datetimes of one zone ignores the UTC offset, so use UTC.
        start, end = previous.astimezone(UTC), following.astimezone(UTC)
        inside = start + (end - start) / 2
        assert schedule.next_after(inside).isoformat() == following.isoformat()


@settings(max_examples=150, deadline=None, database=None)
@given(
    expression=st.sampled_from(
        ["*/30 * * * *", "30 2 * * *", "0 1-3 * * *", "* 2 * * 0", "0 0 L * *"]
    ),
    instant=st.datetimes(
        min_value=datetime(2022, 1, 1), max_value=datetime(2023, 12, 31)
    ),
)
def test_next_after_skips_no_fire_time(expression: str, instant: datetime) -> None:
    schedule = CronSchedule(expression, "Europe/Paris")
    after = instant.replace(tzinfo=UTC)

    following = schedule.next_after(after).astimezone(UTC)

    assert following > after
    just_before = following - timedelta(microseconds=1)
    assert schedule.latest_between(after, just_before) is None
    latest = schedule.latest_between(after, following)
    assert latest is not None
    assert latest.astimezone(UTC) == following


def test_next_after_is_strictly_after() -> None:
    schedule = CronSchedule("0 * * * *", "UTC")

    following = schedule.next_after(datetime(2024, 1, 1, 5, tzinfo=UTC))

    assert following == datetime(2024, 1, 1, 6, tzinfo=UTC)


def test_result_is_in_schedule_zone() -> None:
    schedule = CronSchedule("0 9 * * *", "Asia/Tokyo")

    following = schedule.next_after(datetime(2023, 12, 31, 23, tzinfo=UTC))

    assert following.isoformat() == "2024-01-01T09:00:00+09:00"
    assert following.tzinfo == ZoneInfo("Asia/Tokyo")


def test_naive_instant_is_rejected() -> None:
    schedule = CronSchedule("0 * * * *", "UTC")

    with pytest.raises(ValueError, match="no time zone"):
        schedule.next_after(datetime(2024, 1, 1))


def test_latest_between() -> None:
    schedule = CronSchedule("0 9 * * *", "UTC")
    start = datetime(2024, 1, 1, tzinfo=UTC)

    latest = schedule.latest_between(start, datetime(2024, 3, 5, 8, tzinfo=UTC))
    at_end = schedule.latest_between(start, datetime(2024, 3, 5, 9, tzinfo=UTC))
    none = schedule.latest_between(start, datetime(2024, 1, 1, 8, tzinfo=UTC))

    assert latest == datetime(2024, 3, 4, 9, tzinfo=UTC)
    assert at_end == datetime(2024, 3, 5, 9, tzinfo=UTC)
    assert none is None


def test_timezone_none_uses_tz_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")

    schedule = CronSchedule("30 2 * * *")

    assert schedule.timezone_name == "Europe/Paris"
    assert schedule.tzinfo == ZoneInfo("Europe/Paris")


def test_timezone_none_rejects_unknown_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Mars/Olympus_Mons")

    with pytest.raises(errors.CronError, match="Mars/Olympus_Mons"):
        CronSchedule("30 2 * * *")


def test_timezone_none_without_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TZ", raising=False)

    schedule = CronSchedule("30 2 * * *")

    assert schedule.tzinfo == ZoneInfo(schedule.timezone_name)


def test_unknown_timezone_is_rejected() -> None:
    with pytest.raises(errors.CronError) as caught:
        CronSchedule("0 * * * *", "Europe/Atlantis")

    assert str(caught.value) == "unknown time zone 'Europe/Atlantis'"


# -- day of month, day of week and the extensions --------------------------


def test_hash_weekday_ors_with_day_of_month() -> None:
    assert dates("0 0 8-9 * 0#2", "2021-01-01T00:00Z", 9) == [
        "2021-01-08",
        "2021-01-09",
        "2021-01-10",
        "2021-02-08",
        "2021-02-09",
        "2021-02-14",
        "2021-03-08",
        "2021-03-09",
        "2021-03-14",
    ]


def test_day_list_ors_with_weekday() -> None:
    fire_times = listing("30 4 1,15 * 5", "UTC", "2024-03-01T00:00Z", 7)

    assert fire_times == [
        f"2024-{day}T04:30:00+00:00"
        for day in ["03-01", "03-08", "03-15", "03-22", "03-29", "04-01", "04-05"]
    ]


def test_last_day_of_month_skips_no_month() -> None:
    assert dates("0 0 L * *", "2015-09-30T00:00Z", 5) == [
        "2015-10-31",
        "2015-11-30",
        "2015-12-31",
        "2016-01-31",
        "2016-02-29",
    ]


def test_nearest_weekday() -> None:
    # 15 June 2024 is a Saturday, so the nearest weekday is Friday the 14th.
    assert dates("0 0 15W * *", "2024-05-20T00:00Z", 3) == [
        "2024-06-14",
        "2024-07-15",
        "2024-08-15",
    ]


def test_nearest_weekday_stays_in_month() -> None:
    # 1 June 2024 is a Saturday: the nearest weekday of the month is Monday
    # the 3rd. The 31st is skipped in months without one; 31 March 2024 is a
    # Sunday, so it moves back to Friday the 29th.
    first = dates("0 0 1W * *", "2024-05-31T00:00Z", 1)
    last = dates("0 0 31W * *", "2024-01-01T00:00Z", 4)

    assert first == ["2024-06-03"]
    assert last == ["2024-01-31", "2024-03-29", "2024-05-31", "2024-07-31"]


def test_nearest_weekday_ors_with_weekday() -> None:
    assert dates("0 0 15W * 1", "2024-06-01T00:00Z", 4) == [
        "2024-06-03",
        "2024-06-10",
        "2024-06-14",
        "2024-06-17",
    ]


def test_day_range_ors_with_weekday() -> None:
    fire_dates = dates("0 0 1-7 * 1", "2023-12-31T00:00Z", 300)
    days = (date(2024, 1, 1) + timedelta(days=n) for n in range(3 * 366))
    expected = [day for day in days if day.day <= 7 or day.weekday() == 0]

    assert fire_dates == [day.isoformat() for day in expected[:300]]


def test_star_step_day_ands_with_weekday() -> None:
    # Cron combines the day fields with AND when either starts with `*`:
    # here Mondays that fall on an odd day of the month.
    assert dates("0 0 */2 * 1", "2024-01-01T00:00Z", 4) == [
        "2024-01-15",
        "2024-01-29",
        "2024-02-05",
        "2024-02-19",
    ]


def test_star_day_fields_restrict_nothing() -> None:
    mondays = dates("0 0 * * 1", "2024-01-01T00:00Z", 2)
    days = dates("0 0 1,15 * *", "2024-01-01T00:00Z", 2)
    question = dates("0 0 ? * MON", "2024-01-01T00:00Z", 2)

    assert mondays == ["2024-01-08", "2024-01-15"]
    assert days == ["2024-01-15", "2024-02-01"]
    assert question == mondays


def test_last_weekday_of_month() -> None:
    assert dates("0 0 * * 5L", "2024-01-01T00:00Z", 3) == [
        "2024-01-26",
        "2024-02-23",
        "2024-03-29",
    ]


def test_sunday_is_zero_or_seven() -> None:
    as_zero = dates("0 0 * * 0", "2024-01-01T00:00Z", 3)

    assert dates("0 0 * * 7", "2024-01-01T00:00Z", 3) == as_zero
    assert dates("0 0 * * 7#2", "2024-01-01T00:00Z", 1) == ["2024-01-14"]
    assert dates("0 0 * * 5-7", "2024-01-01T00:00Z", 3) == [
        "2024-01-05",
        "2024-01-06",
        "2024-01-07",
    ]


def test_names_and_steps() -> None:
    assert dates("0 0 1 JAN-MAR/2 *", "2024-01-01T00:00Z", 3) == [
        "2024-03-01",
        "2025-01-01",
        "2025-03-01",
    ]
    assert listing("10/20 5-5 * * *", "UTC", "2024-01-01T00:00Z", 3) == [
        "2024-01-01T05:10:00+00:00",
        "2024-01-01T05:30:00+00:00",
        "2024-01-01T05:50:00+00:00",
    ]


# -- macros -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("macro", "expression"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_macro_matches_its_expression(macro: str, expression: str) -> None:
    after = "2022-10-29T12:00+02:00"

    expected = listing(expression, "Europe/Paris", after, 5)

    assert listing(macro, "Europe/Paris", after, 5) == expected


def test_hourly_macro_fires_in_both_passes() -> None:
    fire_times = listing("@hourly", "Europe/Paris", "2022-10-30T01:30+02:00", 3)

    assert fire_times == [
        "2022-10-30T02:00:00+02:00",
        "2022-10-30T02:00:00+01:00",
        "2022-10-30T03:00:00+01:00",
    ]


# -- rejected expressions ---------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0 0 31 2 *", "no possible date (day 31 never occurs in month 2)"),
        ("0 0 30 2 *", "no possible date (day 30 never occurs in month 2)"),
        ("0 0 31 4,6 *", "no possible date (day 31 never occurs in months 4, 6)"),
        ("0 0 31W 2 *", "no possible date (day 31 never occurs in month 2)"),
        ("*/5 * * * * *", "expected 5 fields, got 6 (seconds are not supported)"),
        (
            "0 0 1 1 * 2030 *",
            "expected 5 fields, got 7 (seconds and years are not supported)",
        ),
        ("0 0 * *", "expected 5 fields, got 4"),
        ("", "the expression is empty"),
        ("61 * * * *", "value 61 out of range 0-59 in the minute field"),
        ("0 24 * * *", "value 24 out of range 0-23 in the hour field"),
        ("0 0 0 * *", "value 0 out of range 1-31 in the day-of-month field"),
        ("0 0 1 13 *", "value 13 out of range 1-12 in the month field"),
        ("0 0 * * 8", "value 8 out of range 0-7 in the day-of-week field"),
        ("55-61 * * * *", "value 61 out of range 0-59 in the minute field"),
        ("0 0 * * MON-", "bad range 'MON-' in the day-of-week field"),
        (
            "0 22-2 * * *",
            "bad range '22-2' in the hour field (the start is after the end)",
        ),
        ("*/0 * * * *", "bad step '*/0' in the minute field"),
        ("0 0 * * MONDAY", "invalid value 'MONDAY' in the day-of-week field"),
        ("H * * * *", "invalid value 'H' in the minute field"),
        ("? * * * *", "invalid value '?' in the minute field"),
        ("0,,5 * * * *", "empty list item in the minute field"),
        ("0 0 LW * *", "LW is not supported in the day-of-month field"),
        ("0 0 W * *", "invalid value 'W' in the day-of-month field"),
        (
            "0 0 * * 1#6",
            "bad value '1#6' in the day-of-week field (the week after # must be 1-5)",
        ),
        ("0 0 * * 1W", "invalid value '1W' in the day-of-week field"),
        ("0 0 L-2 * *", "invalid value 'L' in the day-of-month field"),
        ("@reboot", "@reboot is not supported"),
        (
            "@every_day",
            "unknown macro '@every_day' (use one of @hourly, @daily, @midnight, "
            "@weekly, @monthly, @yearly, @annually)",
        ),
        # Every 8th day from the 1st never falls in the fifth week.
        ("0 0 */8 * 1#5", "it never fires"),
    ],
)
def test_invalid_expression_is_rejected(expression: str, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(errors.CronError) as caught:
        CronSchedule(expression, "UTC")
    elapsed = time.perf_counter() - started

    assert str(caught.value) == reason
    assert elapsed < 0.1


def test_impossible_day_keeps_weekday_half() -> None:
    # Cron's OR rule keeps the weekday half when the day half never occurs.
    assert dates("0 0 31 2 1", "2024-01-01T00:00Z", 2) == ["2024-02-05", "2024-02-12"]


def test_rare_date_is_valid() -> None:
    # The 29th of February on a Sunday: 2004, 2032, then 2060.
    started = time.perf_counter()
    schedule = CronSchedule("0 0 29 2 */7", "UTC")
    elapsed = time.perf_counter() - started

    fire_times = schedule.next_times(datetime(2004, 3, 1, tzinfo=UTC), 2)
    assert [t.date().isoformat() for t in fire_times] == ["2032-02-29", "2060-02-29"]
    assert elapsed < 0.1


def test_describe() -> None:
    assert CronSchedule("30 2 * * *", "UTC").describe() == "At 02:30"
    assert CronSchedule("@hourly", "UTC").describe() == "Every hour"
    assert "day of month or the day of week" in (
        CronSchedule("0 0 8-9 * 0#2", "UTC").describe()
    )


def test_equality_by_expression_and_zone() -> None:
    paris = CronSchedule("0 * * * *", "Europe/Paris")

    assert paris == CronSchedule("0 * * * *", "Europe/Paris")
    assert paris != CronSchedule("0 * * * *", "UTC")
    assert len({paris, CronSchedule("0 * * * *", "Europe/Paris")}) == 1


# -- clocks -----------------------------------------------------------------


def test_system_clock_is_utc() -> None:
    before = datetime.now(UTC)
    now = SystemClock().now()

    assert now.tzinfo is UTC
    assert now - before < timedelta(seconds=5)


async def test_trio_wall_clock_follows_and_jumps(
    autojump_clock: MockClock,
) -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    clock = TrioWallClock(base)

    await trio.sleep(90)
    after_sleep = clock.now()
    clock.jump(-3600)
    after_jump = clock.now()

    assert after_sleep == base + timedelta(seconds=90)
    assert after_jump == base + timedelta(seconds=90 - 3600)


# -- the schedule loop ------------------------------------------------------

BASE = datetime(2024, 1, 1, 0, 0, 30, tzinfo=UTC)


class Recorder:
    """A fire target that records each fire with the wall time it came at."""

    def __init__(self, clock: TrioWallClock) -> None:
        self.clock = clock
        self.fires: list[tuple[datetime, RunTrigger, datetime]] = []

    def fire(self, fire_time: datetime, trigger: RunTrigger) -> None:
        self.fires.append((fire_time, trigger, self.clock.now()))

    @property
    def fire_times(self) -> list[datetime]:
        return [fire_time for fire_time, _, _ in self.fires]

    @property
    def triggers(self) -> list[RunTrigger]:
        return [trigger for _, trigger, _ in self.fires]


def at(hour: int, minute: int = 0, day: int = 1) -> datetime:
    return datetime(2024, 1, day, hour, minute, tzinfo=UTC)


async def test_fires_each_minute_on_the_boundary(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)
    announced: list[datetime | None] = []

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_schedule(
                CronSchedule("* * * * *", "UTC"),
                target,
                clock,
                last_fire=None,
                catch_up=False,
                on_next=announced.append,
                task_status=task_status,
            )
        )
        await trio.sleep(5 * 60)
        nursery.cancel_scope.cancel()

    assert target.fire_times == [at(0, minute) for minute in range(1, 6)]
    assert target.triggers == [RunTrigger.SCHEDULE] * 5
    for fire_time, _, fired_at in target.fires:
        assert abs(fired_at - fire_time) < timedelta(milliseconds=1)
    assert announced == [at(0, minute) for minute in range(1, 7)]


async def test_fire_times_are_utc(autojump_clock: MockClock) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)

    with trio.move_on_after(80):
        await run_schedule(
            CronSchedule("* * * * *", "Asia/Tokyo"),
            target,
            clock,
            last_fire=None,
            catch_up=False,
        )

    assert target.fire_times == [at(0, 1)]
    assert target.fire_times[0].tzinfo is UTC


async def test_long_run_does_not_move_fire_times(
    autojump_clock: MockClock,
) -> None:
    # A stand-in for the runner with overlap "skip": a run lasts 150 s, and a
    # fire time that comes while it runs is skipped. Runs must start only on
    # minute boundaries, never when the previous run ends.
    clock = TrioWallClock(BASE)
    starts: list[datetime] = []
    skipped: list[datetime] = []

    async with trio.open_nursery() as nursery:
        running = False

        async def run() -> None:
            nonlocal running
            await trio.sleep(150)
            running = False

        class SkippingTarget:
            def fire(self, fire_time: datetime, trigger: RunTrigger) -> None:
                nonlocal running
                if running:
                    skipped.append(fire_time)
                    return
                running = True
                starts.append(clock.now())
                nursery.start_soon(run)

        nursery.start_soon(
            lambda: run_schedule(
                CronSchedule("* * * * *", "UTC"),
                SkippingTarget(),
                clock,
                last_fire=None,
                catch_up=False,
            )
        )
        # Observe 6.5 minutes from the first fire time, 00:01.
        await trio.sleep(30 + 6.5 * 60)
        nursery.cancel_scope.cancel()

    first = at(0, 1)
    offsets = [(start - first).total_seconds() for start in starts]
    assert offsets == pytest.approx([0, 180, 360], abs=0.001)
    assert skipped == [first + timedelta(seconds=s) for s in (60, 120, 240, 300)]


async def test_catch_up_fires_latest_missed_once(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(at(3, 30))
    target = Recorder(clock)

    with trio.move_on_after(31 * 60):
        await run_schedule(
            CronSchedule("0 * * * *", "UTC"),
            target,
            clock,
            last_fire=at(0),
            catch_up=True,
        )

    assert target.fire_times == [at(3), at(4)]
    assert target.triggers == [RunTrigger.CATCH_UP, RunTrigger.SCHEDULE]
    assert target.fires[0][2] == at(3, 30)


async def test_no_catch_up_when_disabled(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(at(3, 30))
    target = Recorder(clock)

    with trio.move_on_after(31 * 60):
        await run_schedule(
            CronSchedule("0 * * * *", "UTC"),
            target,
            clock,
            last_fire=at(0),
            catch_up=False,
        )

    assert target.fire_times == [at(4)]
    assert target.triggers == [RunTrigger.SCHEDULE]


async def test_no_catch_up_after_recent_fire(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(at(3, 30))
    target = Recorder(clock)

    with trio.move_on_after(31 * 60):
        await run_schedule(
            CronSchedule("0 * * * *", "UTC"),
            target,
            clock,
            last_fire=at(3),
            catch_up=True,
        )

    assert target.fire_times == [at(4)]


async def test_last_fire_in_future_is_not_repeated(
    autojump_clock: MockClock,
) -> None:
    # The clock was set back while the daemon was down.
    clock = TrioWallClock(at(3, 30))
    target = Recorder(clock)

    with trio.move_on_after(3 * 3600):
        await run_schedule(
            CronSchedule("0 * * * *", "UTC"),
            target,
            clock,
            last_fire=at(5),
            catch_up=True,
        )

    assert target.fire_times == [at(6)]


@pytest.mark.parametrize(
    ("hours", "fire_time", "trigger"),
    [
        (2, at(2), RunTrigger.CATCH_UP),
        (1, at(1), RunTrigger.SCHEDULE),
    ],
)
async def test_forward_jump_fires_once(
    autojump_clock: MockClock,
    hours: int,
    fire_time: datetime,
    trigger: RunTrigger,
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_schedule(
                CronSchedule("0 * * * *", "UTC"),
                target,
                clock,
                last_fire=None,
                catch_up=False,
            )
        )
        await trio.sleep(610)
        clock.jump(hours * 3600)
        await trio.sleep(61)
        fires_after_jump = list(target.fires)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()

    assert [(f, t) for f, t, _ in fires_after_jump] == [(fire_time, trigger)]
    delay = fires_after_jump[0][2] - (BASE + timedelta(seconds=610, hours=hours))
    assert timedelta(0) <= delay <= timedelta(seconds=60)
    assert target.fire_times == [fire_time, fire_time + timedelta(hours=1)]
    assert target.triggers[1] == RunTrigger.SCHEDULE


async def test_backward_jump_fires_nothing_twice(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_schedule(
                CronSchedule("*/15 * * * *", "UTC"),
                target,
                clock,
                last_fire=None,
                catch_up=False,
            )
        )
        await trio.sleep(20 * 60)
        clock.jump(-3600)
        await trio.sleep(2 * 3600)
        nursery.cancel_scope.cancel()

    # The wall clock went from 00:20:30 back to 23:20:30 and ends at 01:20:30.
    assert target.fire_times == [at(0, 15), at(0, 30), at(0, 45), at(1), at(1, 15)]
    assert target.triggers == [RunTrigger.SCHEDULE] * 5
    for fire_time, _, fired_at in target.fires:
        assert abs(fired_at - fire_time) < timedelta(milliseconds=1)


async def test_jitter_delays_within_bounds(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)
    expected_rng = random.Random(1234)

    with trio.move_on_after(5 * 60 + 30):
        await run_schedule(
            CronSchedule("* * * * *", "UTC"),
            target,
            clock,
            last_fire=None,
            catch_up=False,
            jitter=20.0,
            rng=random.Random(1234),
        )

    delays = [
        (fired_at - fire_time).total_seconds()
        for fire_time, _, fired_at in target.fires
    ]
    assert target.fire_times == [at(0, minute) for minute in range(1, 6)]
    assert all(0 <= delay <= 20 for delay in delays)
    expected = [expected_rng.uniform(0, 20) for _ in delays]
    assert delays == pytest.approx(expected, abs=0.001)


async def test_jitter_wait_announces_delayed_start(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)
    delay = random.Random(99).uniform(0, 600)
    # Each announced next fire time, with the wall time it was announced at.
    announced: list[tuple[datetime | None, datetime]] = []

    with trio.move_on_after(3600 + 600):
        await run_schedule(
            CronSchedule("0 * * * *", "UTC"),
            target,
            clock,
            last_fire=None,
            catch_up=False,
            jitter=600.0,
            rng=random.Random(99),
            on_next=lambda when: announced.append((when, clock.now())),
        )

    [(fire_time, _, fired_at)] = target.fires
    assert fire_time == at(1)
    assert [when for when, _ in announced] == [
        at(1),
        pytest.approx(at(1) + timedelta(seconds=delay), abs=timedelta(seconds=0.01)),
        at(2),
    ]
    jitter_end, announced_at = announced[1]
    assert announced_at == pytest.approx(at(1), abs=timedelta(seconds=0.01))
    assert jitter_end == pytest.approx(fired_at, abs=timedelta(seconds=0.01))


async def test_negative_jitter_is_rejected() -> None:
    clock = SystemClock()
    target = Recorder(TrioWallClock(BASE))

    with pytest.raises(ValueError, match="jitter"):
        await run_schedule(
            CronSchedule("* * * * *", "UTC"),
            target,
            clock,
            last_fire=None,
            catch_up=False,
            jitter=-1.0,
        )


async def test_cancellation_ends_cleanly(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)
    announced: list[datetime | None] = []

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_schedule(
                CronSchedule("* * * * *", "UTC"),
                target,
                clock,
                last_fire=None,
                catch_up=False,
                on_next=announced.append,
                task_status=task_status,
            )
        )
        announced_at_start = list(announced)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    await trio.sleep(600)

    assert announced_at_start == [at(0, 1)]
    assert announced == [at(0, 1)]
    assert target.fires == []


async def test_schedule_loop_across_fall_back(
    autojump_clock: MockClock,
) -> None:
    clock = TrioWallClock(datetime.fromisoformat("2022-10-30T00:00+02:00"))
    target = Recorder(clock)

    with trio.move_on_after(2 * 86400):
        await run_schedule(
            CronSchedule("30 2 * * *", "Europe/Paris"),
            target,
            clock,
            last_fire=None,
            catch_up=False,
        )

    assert [t.isoformat() for t in target.fire_times] == [
        "2022-10-30T00:30:00+00:00",
        "2022-10-31T01:30:00+00:00",
    ]


async def test_fired_schedules_share_next_fire_search(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At a busy minute boundary, every schedule needs its next fire time
    # right after firing. Schedules with the same expression and zone must
    # get it from one search, not one search each.
    cron.next_fire.cache_clear()
    searches = 0
    search = CronSchedule._fire_times

    def counted(self: CronSchedule, instant: datetime) -> Iterator[datetime]:
        nonlocal searches
        searches += 1
        return search(self, instant)

    monkeypatch.setattr(CronSchedule, "_fire_times", counted)
    clock = TrioWallClock(BASE)

    class SlowStart(Recorder):
        def fire(self, fire_time: datetime, trigger: RunTrigger) -> None:
            super().fire(fire_time, trigger)
            # Each start takes a millisecond, so the schedules that wake
            # after it read a later wall time.
            autojump_clock.jump(0.001)

    targets = [SlowStart(clock) for _ in range(50)]

    with trio.move_on_after(3 * 60):
        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(
                    partial(
                        run_schedule,
                        CronSchedule("* * * * *", "Europe/Paris"),
                        target,
                        clock,
                        last_fire=None,
                        catch_up=False,
                    )
                )

    for target in targets:
        assert target.fire_times == [at(0, minute) for minute in (1, 2, 3)]
    # One search at start-up and one after each of the three boundaries.
    assert searches == 4


async def prepared_fires(
    start: datetime, seconds: float, prestart: float
) -> tuple[Recorder, list[tuple[datetime, datetime]]]:
    """Run a `* * * * *` schedule from `start` for `seconds`; return its
    fires and each prepare with the wall time it came at."""
    clock = TrioWallClock(start)
    target = Recorder(clock)
    prepared: list[tuple[datetime, datetime]] = []
    with trio.move_on_after(seconds):
        await run_schedule(
            CronSchedule("* * * * *", "UTC"),
            target,
            clock,
            last_fire=None,
            catch_up=False,
            prepare=lambda fire_time: prepared.append((fire_time, clock.now())),
            prestart=prestart,
        )
    return target, prepared


async def test_prepare_comes_prestart_seconds_before_each_fire(
    autojump_clock: MockClock,
) -> None:
    target, prepared = await prepared_fires(BASE, 3 * 60, prestart=2.5)

    assert [fire_time for fire_time, _ in prepared] == target.fire_times
    assert target.fire_times == [at(0, 1), at(0, 2), at(0, 3)]
    for fire_time, prepared_at in prepared:
        lead = fire_time - prepared_at
        assert abs(lead - timedelta(seconds=2.5)) < timedelta(milliseconds=1)


async def test_prepare_at_once_when_fire_is_near(
    autojump_clock: MockClock,
) -> None:
    # Started 1 s before a boundary, with a prestart of 10 s.
    start = BASE.replace(second=59)
    target, prepared = await prepared_fires(start, 30, prestart=10.0)

    assert prepared == [(at(0, 1), start)]
    assert target.fire_times == [at(0, 1)]


@pytest.mark.parametrize(
    ("jitter", "prestart", "catch_up"),
    [(30.0, 2.0, False), (0.0, 0.0, False), (0.0, 2.0, True)],
)
async def test_prepare_skipped_for_jitter_or_catch_up(
    autojump_clock: MockClock, jitter: float, prestart: float, catch_up: bool
) -> None:
    clock = TrioWallClock(BASE)
    target = Recorder(clock)
    prepared: list[datetime] = []

    # Until 00:01:57: the 00:01 fire comes (jitter delays it 30 s at most),
    # and the 00:02 fire is not prepared yet.
    with trio.move_on_after(87):
        await run_schedule(
            CronSchedule("* * * * *", "UTC"),
            target,
            clock,
            # With catch_up, the fire time missed at 00:00 fires at once.
            last_fire=at(0, 0) - timedelta(minutes=5) if catch_up else None,
            catch_up=catch_up,
            jitter=jitter,
            prepare=prepared.append,
            prestart=prestart,
        )

    if catch_up:
        assert target.triggers == [RunTrigger.CATCH_UP, RunTrigger.SCHEDULE]
        # Only the regular fire at 00:01 was prepared, not the catch-up.
        assert prepared == [at(0, 1)]
    else:
        assert prepared == []
        assert target.fire_times == [at(0, 1)]


async def test_negative_prestart_is_rejected() -> None:
    clock = TrioWallClock(BASE)
    with pytest.raises(ValueError, match="prestart"):
        await run_schedule(
            CronSchedule("* * * * *", "UTC"),
            Recorder(clock),
            clock,
            last_fire=None,
            catch_up=False,
            prestart=-1.0,
        )
