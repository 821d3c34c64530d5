"""Cron expressions and their fire times.

Fire times follow classic cron (Vixie cron and its descendants, such as
cronie):

- Five fields: minute, hour, day of month, month, day of week, plus the
  macros `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`
  and `@annually`. Seconds and years are not supported.
- When both day fields are restricted, a day matches if either field
  matches. When either day field starts with `*` (`*`, `*/2`), a day must
  match both, as cron's own matching code does. `L` (last day of the month),
  `15W` (weekday nearest the 15th, within the month), `5L` (last Friday) and
  `1#2` (second Monday) are supported.
- Daylight saving time: a fixed-time expression has an hour field that does
  not start with `*`. If its time falls in a skipped hour, it fires once at
  the end of the gap. If its time falls in a repeated hour, it fires only in
  the first pass. An expression whose hour field starts with `*` keeps
  real-time spacing: it fires in both passes of a repeated hour and not at
  all inside a gap.

croniter computes the matching wall-clock times without a time zone. This
module maps them to instants with the rules above, because croniter 7.0's own
zone handling fires a fixed-time job twice on the night clocks go back, and
its day-of-month OR day-of-week union drops dates once `#` or `W` is used.
Each `W`, `#` and `nL` term therefore becomes its own croniter expression,
and the fire times of all of them are merged.
"""

from __future__ import annotations

import calendar
import functools
import heapq
import itertools
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import errors

logger = logging.getLogger(__name__)

# Maximum gap between two fire times of any valid five-field expression: the
# 29th of February on a given weekday recurs after 40 years at most, in the
# Gregorian calendar. A search that finds nothing in this many years never will.
_SEARCH_YEARS = 50

ONE_MINUTE = timedelta(minutes=1)

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

_MONTH_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6}
_MONTH_NAMES |= {"jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12}
_WEEKDAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}

# Maximum number of days of each month, with February in a leap year.
_MONTH_DAYS = dict(enumerate([31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], 1))


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    # Last value that `*` and `a/step` cover. It differs from `high` only in
    # the day-of-week field, where 7 is another name for Sunday (0).
    last: int
    names: Mapping[str, int]


_MINUTE = _FieldSpec("minute", 0, 59, 59, {})
_HOUR = _FieldSpec("hour", 0, 23, 23, {})
_DAY = _FieldSpec("day-of-month", 1, 31, 31, {})
_MONTH = _FieldSpec("month", 1, 12, 12, _MONTH_NAMES)
_WEEKDAY = _FieldSpec("day-of-week", 0, 7, 6, _WEEKDAY_NAMES)


@dataclass
class _Field:
    """One parsed field. The `W`, `#` and `nL` terms each go into a croniter
    expression of their own; the rest forms the plain part."""

    wildcard: bool = False  # `*` or `?`: every value
    star_prefixed: bool = False  # starts with `*` or is `?`, as cron tests it
    values: set[int] = field(default_factory=set)
    last_day: bool = False  # `L` in the day-of-month field
    nearest_weekdays: list[int] = field(default_factory=list)  # `15W`
    nth_weekdays: list[tuple[int, int]] = field(default_factory=list)  # `1#2`
    last_weekdays: list[int] = field(default_factory=list)  # `5L`

    def plain_text(self) -> str:
        """Return the plain part in croniter syntax, or "" when it is empty.

        Values are listed one by one, because croniter 7 reads an equal range
        such as `5-5` as the whole field and wraps a descending one.
        """
        if self.wildcard:
            return "*"
        terms = [str(value) for value in sorted(self.values)]
        if self.last_day:
            terms.append("L")
        return ",".join(terms)


def _parse_value(text: str, spec: _FieldSpec) -> int:
    if text.isascii() and text.isdigit():
        value = int(text)
        if not spec.low <= value <= spec.high:
            raise errors.CronError(
                f"value {value} out of range {spec.low}-{spec.high} "
                f"in the {spec.name} field"
            )
        return value
    number = spec.names.get(text.lower())
    if number is None:
        raise errors.CronError(f"invalid value '{text}' in the {spec.name} field")
    return number


def _parse_item(item: str, spec: _FieldSpec) -> set[int]:
    """Expand `*`, `a`, `a-b`, each with an optional `/step`, to its values."""
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not (step_text.isascii() and step_text.isdigit()) or int(step_text) == 0:
            raise errors.CronError(f"bad step '{item}' in the {spec.name} field")
        step = int(step_text)

    if base == "*":
        low, high = spec.low, spec.last
    elif "-" in base:
        start_text, _, end_text = base.partition("-")
        if not start_text or not end_text or "-" in end_text:
            raise errors.CronError(f"bad range '{base}' in the {spec.name} field")
        low = _parse_value(start_text, spec)
        high = _parse_value(end_text, spec)
        if low > high:
            # croniter would wrap around the end of the field; cron rejects it.
            raise errors.CronError(
                f"bad range '{base}' in the {spec.name} field "
                "(the start is after the end)"
            )
    else:
        low = _parse_value(base, spec)
        high = max(low, spec.last) if slash else low

    values = set(range(low, high + 1, step))
    if spec is _WEEKDAY and 7 in values:
        values = (values - {7}) | {0}
    return values


def _parse_field(text: str, spec: _FieldSpec) -> _Field:
    parsed = _Field(star_prefixed=text.startswith("*"), wildcard=text == "*")
    if text == "?":
        if spec not in (_DAY, _WEEKDAY):
            raise errors.CronError(f"invalid value '?' in the {spec.name} field")
        parsed.wildcard = parsed.star_prefixed = True
        return parsed

    for item in text.split(","):
        upper = item.upper()
        if not item:
            raise errors.CronError(f"empty list item in the {spec.name} field")
        elif spec is _DAY and upper == "L":
            parsed.last_day = True
        elif spec is _DAY and upper.endswith("W"):
            if upper == "LW":
                raise errors.CronError("LW is not supported in the day-of-month field")
            if not (item[:-1].isascii() and item[:-1].isdigit()):
                raise errors.CronError(
                    f"invalid value '{item}' in the {spec.name} field"
                )
            parsed.nearest_weekdays.append(_parse_value(item[:-1], spec))
        elif spec is _WEEKDAY and "#" in item:
            weekday_text, _, week_text = item.partition("#")
            weekday = _parse_value(weekday_text, spec) % 7
            if not (week_text.isascii() and week_text.isdigit()) or not (
                1 <= int(week_text) <= 5
            ):
                raise errors.CronError(
                    f"bad value '{item}' in the {spec.name} field "
                    "(the week after # must be 1-5)"
                )
            parsed.nth_weekdays.append((weekday, int(week_text)))
        elif spec is _WEEKDAY and upper.endswith("L"):
            if upper == "L":
                raise errors.CronError(
                    "L in the day-of-week field needs a weekday, "
                    "such as 5L for the last Friday"
                )
            parsed.last_weekdays.append(_parse_value(item[:-1], spec) % 7)
        else:
            parsed.values |= _parse_item(item, spec)
    return parsed


@dataclass(frozen=True)
class _Component:
    """One croniter expression. The fire times of a schedule are the union of
    those of its components."""

    expression: str
    # For a `15W` term, the day it names. croniter 7 moves a `31W` to the last
    # day of shorter months; like a plain `31`, it fires nothing in them here.
    nearest_weekday: int | None = None

    def walls_after(
        self, start: datetime, until: datetime = datetime.max
    ) -> Iterator[datetime]:
        """Yield the matching wall-clock times after the naive `start`, up to
        `until`."""
        from croniter import CroniterBadDateError, croniter

        cron = croniter(
            self.expression,
            start,
            ret_type=datetime,
            day_or=False,
            max_years_between_matches=_SEARCH_YEARS,
        )
        while True:
            try:
                wall: datetime = cron.get_next(datetime)
            except (CroniterBadDateError, OverflowError):
                return
            if wall > until:
                return
            day = self.nearest_weekday
            if day is not None and day > calendar.monthrange(wall.year, wall.month)[1]:
                continue
            yield wall

    def first_wall(self, start: datetime) -> datetime | None:
        """Return the first matching wall-clock time within the search span."""
        until = start.replace(year=start.year + _SEARCH_YEARS)
        return next(self.walls_after(start, until), None)


def _split_fields(expression: str) -> list[str]:
    text = expression.strip()
    if not text:
        raise errors.CronError("the expression is empty")
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise errors.CronError("@reboot is not supported")
        macro = _MACROS.get(text.lower())
        if macro is None:
            raise errors.CronError(
                f"unknown macro '{text}' (use one of {', '.join(_MACROS)})"
            )
        text = macro

    fields = text.split()
    if len(fields) == 6:
        raise errors.CronError("expected 5 fields, got 6 (seconds are not supported)")
    if len(fields) == 7:
        raise errors.CronError(
            "expected 5 fields, got 7 (seconds and years are not supported)"
        )
    if len(fields) != 5:
        raise errors.CronError(f"expected 5 fields, got {len(fields)}")
    return fields


def _build_components(
    fields: list[str],
) -> tuple[list[_Component], bool, str | None]:
    """Split an expression into croniter expressions.

    Returns the components, whether day of month and day of week combine
    with OR, and the reason a component can never match (or None).
    """
    minute, hour, day, month, weekday = (
        _parse_field(text, spec)
        for text, spec in zip(
            fields, (_MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY), strict=True
        )
    )

    # Each day-of-month group: croniter text, smallest plain day, `W` day.
    day_groups: list[tuple[str, int | None, int | None]] = []
    if day.plain_text():
        smallest = None if day.wildcard or day.last_day else min(day.values)
        day_groups.append((day.plain_text(), smallest, None))
    day_groups += [(f"{d}W", d, d) for d in day.nearest_weekdays]

    weekday_groups = [weekday.plain_text()] if weekday.plain_text() else []
    weekday_groups += [f"{d}#{week}" for d, week in weekday.nth_weekdays]
    weekday_groups += [f"L{d}" for d in weekday.last_weekdays]

    days_or = not (day.star_prefixed or weekday.star_prefixed)
    if days_or:
        pairs = [(group, "*") for group in day_groups]
        pairs += [(("*", None, None), group) for group in weekday_groups]
    else:
        pairs = list(itertools.product(day_groups, weekday_groups))

    months = sorted(month.values) if not month.wildcard else list(_MONTH_DAYS)
    longest = max(_MONTH_DAYS[m] for m in months)
    components: list[_Component] = []
    impossible: str | None = None
    for (day_text, smallest_day, nearest), weekday_text in pairs:
        if smallest_day is not None and smallest_day > longest:
            month_list = ", ".join(str(m) for m in months)
            noun = "month" if len(months) == 1 else "months"
            impossible = (
                f"no possible date (day {smallest_day} never occurs in "
                f"{noun} {month_list})"
            )
            continue
        minute_hour = f"{minute.plain_text()} {hour.plain_text()}"
        expression = f"{minute_hour} {day_text} {month.plain_text()} {weekday_text}"
        components.append(_Component(expression, nearest))
    return components, days_or, impossible


def _local_zone() -> tuple[str, ZoneInfo]:
    """Return the name and zone of the local time zone: $TZ, else the target
    of /etc/localtime, else /etc/timezone, else UTC."""
    setting = os.environ.get("TZ", "").removeprefix(":")
    if setting:
        key = setting.partition("zoneinfo/")[2] if setting.startswith("/") else setting
        try:
            return key, ZoneInfo(key)
        except (ZoneInfoNotFoundError, ValueError):
            raise errors.CronError(
                f"the local time zone TZ={setting!r} is not a known IANA zone "
                "(set the timezone of the schedule)"
            ) from None

    candidates = [os.path.realpath("/etc/localtime").partition("zoneinfo/")[2]]
    try:
        with open("/etc/timezone", encoding="utf-8") as file:
            candidates.append(file.read().strip())
    except OSError:
        pass
    for key in candidates:
        if key:
            try:
                return key, ZoneInfo(key)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    logger.warning("no local time zone found: schedules without a timezone use UTC")
    return "UTC", ZoneInfo("UTC")


class CronSchedule:
    """A validated cron expression in a time zone, and its fire times.

    Raises errors.CronError with a short reason when the expression or the
    time zone is invalid, or when the expression can never fire.
    """

    def __init__(self, expression: str, timezone: str | None = None) -> None:
        self.expression = expression
        if timezone is None:
            self.timezone_name, self.tzinfo = _local_zone()
        else:
            try:
                self.tzinfo = ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                raise errors.CronError(f"unknown time zone {timezone!r}") from None
            self.timezone_name = timezone

        self._fields = _split_fields(expression)
        # The DST rules of the module docstring: times with a fixed hour fire
        # once, times with a `*`-prefixed hour follow real time.
        self._real_time_spacing = self._fields[1].startswith("*")
        components, self._days_or, impossible = _build_components(self._fields)
        # Imported here: a daemon without scheduled projects never loads it.
        from croniter import CroniterError, croniter

        for component in components:
            try:
                croniter.expand(component.expression)
            except CroniterError as exc:  # pragma: no cover - parsing checks first
                raise errors.CronError(f"unsupported expression ({exc})") from None

        # A bounded search, because croniter accepts dates that never occur
        # (`0 0 31 2 *`) and only fails while iterating.
        reference = datetime(2000, 1, 1)
        self._components = [c for c in components if c.first_wall(reference)]
        if not self._components:
            raise errors.CronError(impossible or "it never fires")

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, {self.timezone_name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CronSchedule):
            return NotImplemented
        return (self.expression, self.timezone_name) == (
            other.expression,
            other.timezone_name,
        )

    def __hash__(self) -> int:
        return hash((self.expression, self.timezone_name))

    def next_after(self, instant: datetime) -> datetime:
        """Return the first fire time strictly after the aware `instant`, in the
        schedule's zone.

        Two results in the same zone compare by wall time, ignoring which pass
        of a repeated hour they are in, so compare them in UTC.
        """
        for fire_time in self._fire_times(instant):
            return fire_time.astimezone(self.tzinfo)
        raise errors.CronError(f"it never fires after {instant.isoformat()}")

    def next_times(self, instant: datetime, count: int) -> list[datetime]:
        """Return the first `count` fire times strictly after `instant`, in the
        schedule's zone, strictly increasing in UTC."""
        fire_times = itertools.islice(self._fire_times(instant), count)
        return [fire_time.astimezone(self.tzinfo) for fire_time in fire_times]

    def latest_between(self, start: datetime, end: datetime) -> datetime | None:
        """Return the latest fire time in (start, end], in the schedule's zone,
        or None when there is none."""
        latest = self._latest_between(to_utc(start), to_utc(end))
        return None if latest is None else latest.astimezone(self.tzinfo)

    def describe(self) -> str:
        """Return the expression in English words, such as "At 02:30"."""
        # Imported here: only `next` and the shell describe expressions, and
        # the daemon saves the module's memory.
        from cron_descriptor import (
            ExpressionDescriptor,
            FormatError,
            MissingFieldError,
        )

        try:
            descriptor = ExpressionDescriptor(
                " ".join(self._fields),
                use_24hour_time_format=True,
                day_of_week_start_index_zero=True,
            )
            text: str = descriptor.get_description()
        except (FormatError, MissingFieldError):  # pragma: no cover - validated
            return self.expression
        if self._days_or:
            text += " (on days that match the day of month or the day of week)"
        return text

    def _latest_between(self, start: datetime, end: datetime) -> datetime | None:
        # Probe windows that double back from `end`, so a dense schedule is
        # scanned over a short span and a sparse one with a few probes.
        window = ONE_MINUTE
        while start < end:
            probe = max(start, end - window)
            fire_times = self._fire_times(probe)
            latest = next(fire_times, None)
            if latest is None:
                return None
            if latest <= end:
                for fire_time in fire_times:
                    if fire_time > end:
                        break
                    latest = fire_time
                return latest
            if probe == start:
                return None
            window *= 2
        return None

    def _fire_times(self, instant: datetime) -> Iterator[datetime]:
        """Yield the fire times strictly after `instant` as UTC datetimes,
        strictly increasing."""
        after = to_utc(instant)
        # A fire time in the second pass of a repeated hour has an earlier wall
        # time than `instant` may have, so start that much earlier.
        start = after.astimezone(self.tzinfo).replace(tzinfo=None)
        start -= self._fold_lookback(after) + ONE_MINUTE

        walls = heapq.merge(*(c.walls_after(start) for c in self._components))
        pending: list[datetime] = []
        last = after
        previous_wall = None
        for wall in walls:
            if wall == previous_wall:
                continue
            previous_wall = wall
            earliest, instants = self._resolve(wall)
            for candidate in instants:
                heapq.heappush(pending, candidate)
            # `earliest` never decreases from one wall time to the next, so
            # nothing still to come can be earlier than it.
            while pending and pending[0] <= earliest:
                candidate = heapq.heappop(pending)
                if candidate > last:
                    last = candidate
                    yield candidate
        for candidate in sorted(pending):  # pragma: no cover - year 9999
            if candidate > last:
                last = candidate
                yield candidate

    def _fold_lookback(self, after: datetime) -> timedelta:
        """Return how far the wall clock goes back in the 26 hours after `after`."""
        offset = after.astimezone(self.tzinfo).utcoffset()
        assert offset is not None
        lowest = offset
        for hours in range(1, 27):
            later = (after + timedelta(hours=hours)).astimezone(self.tzinfo)
            later_offset = later.utcoffset()
            assert later_offset is not None
            lowest = min(lowest, later_offset)
        return offset - lowest

    def _resolve(self, wall: datetime) -> tuple[datetime, tuple[datetime, ...]]:
        """Map a matching wall-clock time to its fire instants in UTC.

        Returns the earliest instant of the wall time (the end of the gap for a
        skipped time) and the instants that fire.
        """
        first = wall.replace(tzinfo=self.tzinfo, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.tzinfo, fold=1).astimezone(UTC)
        if first == second:
            return first, (first,)

        earlier, later = sorted((first, second))
        if earlier.astimezone(self.tzinfo).replace(tzinfo=None) == wall:
            # A repeated wall time, such as 02:30 on the night clocks go back.
            if self._real_time_spacing:
                return earlier, (earlier, later)
            return earlier, (earlier,)

        # A skipped wall time, such as 02:30 on the night clocks go forward.
        gap_end = self._transition_between(earlier, later)
        if self._real_time_spacing:
            return gap_end, ()
        return gap_end, (gap_end,)

    def _transition_between(self, earlier: datetime, later: datetime) -> datetime:
        """Find the first second with the UTC offset that `later` has."""
        low, high = math.floor(earlier.timestamp()), math.ceil(later.timestamp())
        offset = datetime.fromtimestamp(low, self.tzinfo).utcoffset()
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, self.tzinfo).utcoffset() == offset:
                low = middle
            else:
                high = middle
        return datetime.fromtimestamp(high, UTC)


@functools.lru_cache(maxsize=256)
def next_fire(schedule: CronSchedule, after: datetime) -> datetime | None:
    """Return the first fire time of `schedule` after `after`, in UTC.

    Cached, because at a minute boundary every schedule with the same
    expression and zone needs the same one, and a search costs about a
    millisecond.
    """
    return next(schedule._fire_times(after), None)


def to_utc(instant: datetime) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(
            f"{instant.isoformat()} has no time zone. Pass an aware datetime."
        )
    return instant.astimezone(UTC)
