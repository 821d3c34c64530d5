"""Cron expressions translated for other schedulers.

`on_calendar_lines` turns an expression that `CronSchedule` accepts into
systemd `OnCalendar=` lines whose fire times are the same. Several lines OR
together, so the day-of-month OR day-of-week rule of cron becomes one line
per side, and each `L`, `W`, `#` and `nL` term becomes lines of its own:

- `L` is `*-*~01`, the last day of the month, and `5L` is `Fri *-*~07/1`.
- `1#2` is `Mon *-*-08..14`.
- `15W` is three lines: a weekday 15th, a Friday 14th (the 15th is a
  Saturday) and a Monday 16th (the 15th is a Sunday).

systemd and runvisor differ on the nights clocks change. For a skipped wall
time, runvisor fires a fixed-time job once at the end of the gap, while
systemd (checked with systemd 252) does not fire it that day. In a repeated
hour, runvisor fires an expression whose hour field starts with `*` in both
passes, while systemd fires only the first. The translation therefore adds
lines for those nights, derived from the zone's transitions: one at the end
of the gap in the zone, and lines in UTC for the second pass. Where a
transition cannot be written as a yearly rule (such as a last-Sunday rule
in February), the translation raises `NoExactForm` instead.

`portable_cron` writes the expression in the plain five-field dialect that
Kubernetes CronJobs (robfig/cron) and Nomad periodic jobs read, where only
`*` makes a day field unrestricted.
"""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

# The cron parser is reused so that both read an expression the
# same way. Its names are private to the package, not to this module.
from supervisor.cron import (
    _DAY,
    _HOUR,
    _MINUTE,
    _MONTH,
    _WEEKDAY,
    _Field,
    _parse_field,
    _split_fields,
)

ALL_MINUTES = frozenset(range(60))
ALL_HOURS = frozenset(range(24))
ALL_DAYS = frozenset(range(1, 32))
ALL_MONTHS = frozenset(range(1, 13))
# Cron numbering: 0 is Sunday.
ALL_WEEKDAYS = frozenset(range(7))
MONDAY_TO_FRIDAY = frozenset(range(1, 6))

_SYSTEMD_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
# Month lengths, with February at its shorter length. February is treated
# apart wherever its length matters.
_MONTH_LENGTHS = {month: calendar.monthrange(2023, month)[1] for month in ALL_MONTHS}

# Years whose clock changes define the yearly rules of a time zone. The
# rules of tzdata for later years repeat those of the last one listed.
# NOTE: a zone whose rules change after these years needs a new export.
_RULE_YEARS = range(2024, 2034)

_DAY_SECONDS = 86400


class NoExactForm(Exception):
    """The expression has no exact form in the target dialect. The message is
    the reason, as a clause that follows "because"."""


@dataclass(frozen=True)
class DayRule:
    """Days matched by one term of an expression: a weekday in `weekdays`, a
    month in `months` and a day in `days`. With `from_end`, days count back
    from the end of the month, so 1 is the last day."""

    weekdays: frozenset[int] = ALL_WEEKDAYS
    months: frozenset[int] = ALL_MONTHS
    days: frozenset[int] = ALL_DAYS
    from_end: bool = False

    def intersect(self, other: DayRule) -> DayRule | None:
        """Return the days both rules match, or None when there are none.

        Raises:
            NoExactForm: one rule counts from the end of the month and the
                other from its start, and the months have different lengths.
        """
        months = self.months & other.months
        weekdays = self.weekdays & other.weekdays
        if not months or not weekdays:
            return None
        first, second = self, other
        if first.from_end != second.from_end:
            if first.from_end:
                first, second = second, first
            if first.days == ALL_DAYS:
                days, from_end = second.days, True
            else:
                length = _fixed_length(months)
                forward = frozenset(length + 1 - day for day in second.days)
                days, from_end = first.days & forward, False
        else:
            days, from_end = first.days & second.days, first.from_end
        if not days:
            return None
        return DayRule(weekdays, months, days, from_end)


def _fixed_length(months: Iterable[int]) -> int:
    lengths = {_MONTH_LENGTHS[month] for month in months}
    if 2 in months or len(lengths) != 1:
        raise NoExactForm(
            "it counts days from both ends of months whose lengths differ"
        )
    return lengths.pop()


@dataclass(frozen=True)
class CronPlan:
    """An expression as the union of day rules, each at every combination of
    `hours` and `minutes`."""

    minutes: frozenset[int]
    hours: frozenset[int]
    rules: tuple[DayRule, ...]
    # True when the hour field starts with `*`: such an expression keeps
    # real-time spacing across clock changes.
    real_time_spacing: bool


def plan_cron(expression: str) -> CronPlan:
    """Parse an expression that `CronSchedule` accepts into day rules.

    Raises:
        NoExactForm: a `W` term near the end of February, whose answer
            depends on leap years.
    """
    fields = _split_fields(expression)
    minute, hour, day, month, weekday = _parse_fields(fields)
    months = frozenset(month.values) or ALL_MONTHS

    day_terms: list[DayRule] = []
    if day.values or day.wildcard:
        day_terms.append(DayRule(days=frozenset(day.values) or ALL_DAYS))
    if day.last_day:
        day_terms.append(DayRule(days=frozenset({1}), from_end=True))
    for nearest in day.nearest_weekdays:
        day_terms += _nearest_weekday_rules(nearest, months)

    weekday_terms: list[DayRule] = []
    if weekday.values or weekday.wildcard:
        weekday_terms.append(
            DayRule(weekdays=frozenset(weekday.values) or ALL_WEEKDAYS)
        )
    for number, week in weekday.nth_weekdays:
        days = frozenset(range(7 * week - 6, 7 * week + 1))
        weekday_terms.append(DayRule(weekdays=frozenset({number}), days=days))
    for number in weekday.last_weekdays:
        days = frozenset(range(1, 8))
        weekday_terms.append(DayRule(frozenset({number}), days=days, from_end=True))

    # Cron ORs the two day fields when both are restricted, and ANDs them
    # when either starts with `*`, as the scheduler does.
    # The months come first, so that days counted from the end of a month
    # meet days counted from its start only in months of one length.
    in_months = DayRule(months=months)
    candidates: list[DayRule | None] = []
    if day.star_prefixed or weekday.star_prefixed:
        for day_term in day_terms:
            day_rule = in_months.intersect(day_term)
            for weekday_term in weekday_terms:
                both = None if day_rule is None else day_rule.intersect(weekday_term)
                candidates.append(both)
    else:
        candidates = [in_months.intersect(term) for term in day_terms + weekday_terms]

    rules: list[DayRule] = []
    for rule in candidates:
        if rule is not None and _can_occur(rule) and rule not in rules:
            rules.append(rule)
    return CronPlan(
        minutes=frozenset(minute.values),
        hours=frozenset(hour.values),
        rules=tuple(rules),
        real_time_spacing=fields[1].startswith("*"),
    )


def _parse_fields(fields: list[str]) -> tuple[_Field, _Field, _Field, _Field, _Field]:
    minute, hour, day, month, weekday = (
        _parse_field(text, spec)
        for text, spec in zip(
            fields, (_MINUTE, _HOUR, _DAY, _MONTH, _WEEKDAY), strict=True
        )
    )
    return minute, hour, day, month, weekday


def _can_occur(rule: DayRule) -> bool:
    if rule.from_end:
        return True
    longest = max(29 if month == 2 else _MONTH_LENGTHS[month] for month in rule.months)
    return min(rule.days) <= longest


def _nearest_weekday_rules(day: int, months: frozenset[int]) -> list[DayRule]:
    """Rules for `dW`: the weekday nearest the day, within its month."""
    if 2 in months and day in (28, 29):
        raise NoExactForm(
            f"'{day}W' in February depends on whether the year is a leap year"
        )
    existing = frozenset(m for m in months if day <= _MONTH_LENGTHS[m])
    shorter = frozenset(m for m in existing if day < _MONTH_LENGTHS[m])
    ending = existing - shorter
    rules = [DayRule(MONDAY_TO_FRIDAY, existing, frozenset({day}))]
    # A Saturday moves to the Friday before, or to Monday the 3rd for the 1st.
    if day == 1:
        rules.append(DayRule(frozenset({1}), existing, frozenset({3})))
    else:
        rules.append(DayRule(frozenset({5}), existing, frozenset({day - 1})))
    # A Sunday moves to the Monday after, or to the Friday before when it is
    # the last day of its month.
    if shorter:
        rules.append(DayRule(frozenset({1}), shorter, frozenset({day + 1})))
    if ending:
        rules.append(DayRule(frozenset({5}), ending, frozenset({day - 2})))
    return [rule for rule in rules if rule.months]


# OnCalendar= lines


def on_calendar_lines(expression: str, zone_name: str) -> list[str]:
    """Return `OnCalendar=` values that fire when `CronSchedule` does.

    Raises:
        NoExactForm: no set of lines fires at the same times.
    """
    plan = plan_cron(expression)
    lines = [
        _calendar_line(rule, plan.hours, plan.minutes, zone_name) for rule in plan.rules
    ]
    for extra in _clock_change_lines(plan, zone_name):
        if extra not in lines:
            lines.append(extra)
    return lines


def _calendar_line(
    rule: DayRule,
    hours: frozenset[int],
    minutes: frozenset[int],
    zone_name: str,
    seconds: int = 0,
) -> str:
    weekdays = _weekday_text(rule.weekdays)
    months = _number_text(rule.months, ALL_MONTHS)
    if rule.from_end:
        days = "~" + ",".join(f"{day:02d}" for day in sorted(rule.days))
        if rule.days == frozenset(range(1, 8)):
            days = "~07/1"
        day_part = f"*-{months}{days}"
    else:
        day_part = f"*-{months}-{_number_text(rule.days, ALL_DAYS)}"
    time_part = (
        f"{_number_text(hours, ALL_HOURS)}:{_number_text(minutes, ALL_MINUTES)}"
        f":{seconds:02d}"
    )
    prefix = f"{weekdays} " if weekdays else ""
    return f"{prefix}{day_part} {time_part} {zone_name}"


def _number_text(values: frozenset[int], full: frozenset[int]) -> str:
    """Format values as systemd does: `*`, `a/step` up to the field's end,
    `a..b` runs and lists, each number with two digits."""
    if values == full:
        return "*"
    ordered = sorted(values)
    if len(ordered) >= 3:
        step = ordered[1] - ordered[0]
        stepped = set(range(ordered[0], max(full) + 1, step))
        if step > 1 and stepped == values:
            return f"{ordered[0]:02d}/{step}"
    parts = []
    for low, high in _runs(ordered):
        if high - low >= 2:
            parts.append(f"{low:02d}..{high:02d}")
        else:
            parts += [f"{value:02d}" for value in range(low, high + 1)]
    return ",".join(parts)


def _weekday_text(weekdays: frozenset[int]) -> str:
    if weekdays == ALL_WEEKDAYS:
        return ""
    # systemd weeks start on Monday, and its ranges do not wrap around.
    ordered = sorted((number - 1) % 7 for number in weekdays)
    parts = []
    for low, high in _runs(ordered):
        names = [_SYSTEMD_WEEKDAYS[(index + 1) % 7] for index in range(low, high + 1)]
        parts += [f"{names[0]}..{names[-1]}"] if len(names) >= 3 else names
    return ",".join(parts)


def _runs(ordered: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for value in ordered:
        if runs and runs[-1][1] == value - 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


# Clock changes


@dataclass(frozen=True)
class ClockChange:
    """A yearly clock change of a zone.

    On the days of `rule`, the wall times in [start, end) seconds after
    local midnight are skipped (`skipped`) or happen twice. `offset_after`
    is the UTC offset in seconds once the change is done.
    """

    rule: DayRule
    start: int
    end: int
    skipped: bool
    offset_after: int

    def describe(self) -> str:
        """Return the change in words, such as "02:00-03:00 is skipped on the
        last Sunday of March"."""
        weekday = calendar.day_name[(min(self.rule.weekdays) - 1) % 7]
        month = calendar.month_name[min(self.rule.months)]
        first = min(self.rule.days)
        position = (
            "last"
            if first + 6 == _MONTH_LENGTHS[min(self.rule.months)]
            else ("first", "second", "third", "fourth")[(first - 1) // 7]
        )
        what = "skipped" if self.skipped else "repeated"
        return (
            f"{_clock_text(self.start)}-{_clock_text(self.end)} is {what} on the "
            f"{position} {weekday} of {month}"
        )


def clock_changes(zone_name: str) -> list[ClockChange]:
    """Return the yearly clock changes of a zone, or [] for a zone without any.

    Raises:
        NoExactForm: the zone changes its clocks on dates that no yearly
            weekday rule describes.
    """
    return list(_clock_changes(zone_name))


@functools.lru_cache(maxsize=64)
def _clock_changes(zone_name: str) -> tuple[ClockChange, ...]:
    zone = ZoneInfo(zone_name)
    found: dict[tuple[bool, int, int, int, int, int], list[date]] = {}
    for instant, before, after in _transitions(zone):
        skipped = after > before
        local_start = instant + timedelta(seconds=min(before, after))
        start = local_start.hour * 3600 + local_start.minute * 60 + local_start.second
        end = start + abs(after - before)
        local_day = local_start.date()
        key = (skipped, local_day.month, local_day.weekday(), start, end, after)
        found.setdefault(key, []).append(local_day)

    changes = []
    for (skipped, month, _, start, end, after), days in sorted(found.items()):
        if len(days) != len(_RULE_YEARS):
            raise NoExactForm(
                f"the clock changes of {zone_name} do not follow a yearly rule"
            )
        if end > _DAY_SECONDS or month == 2:
            raise NoExactForm(
                f"a clock change of {zone_name} crosses midnight or falls in February"
            )
        changes.append(
            ClockChange(
                rule=DayRule(
                    weekdays=frozenset({(days[0].weekday() + 1) % 7}),
                    months=frozenset({month}),
                    days=_week_window(days, zone_name),
                ),
                start=start,
                end=end,
                skipped=skipped,
                offset_after=after,
            )
        )
    return tuple(changes)


def _transitions(zone: ZoneInfo) -> list[tuple[datetime, int, int]]:
    """Return (UTC instant, offset before, offset after) of each offset change
    in `_RULE_YEARS`, offsets in seconds."""
    changes = []
    day = datetime(_RULE_YEARS.start, 1, 1, tzinfo=UTC)
    end = datetime(_RULE_YEARS.stop, 1, 1, tzinfo=UTC)
    offset = _offset(zone, day)
    while day < end:
        following = day + timedelta(days=1)
        following_offset = _offset(zone, following)
        if following_offset != offset:
            low, high = day, following
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if _offset(zone, middle) == offset:
                    low = middle
                else:
                    high = middle
            changes.append((high, offset, following_offset))
        day, offset = following, following_offset
    return changes


def _offset(zone: ZoneInfo, instant: datetime) -> int:
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


def _week_window(days: list[date], zone_name: str) -> frozenset[int]:
    """Return the days of the month of the week that holds every date."""
    length = _MONTH_LENGTHS[days[0].month]
    weeks = {(day.day - 1) // 7 for day in days}
    if len(weeks) == 1:
        first = 7 * weeks.pop() + 1
        return frozenset(range(first, first + 7))
    if all(day.day > length - 7 for day in days):
        return frozenset(range(length - 6, length + 1))
    raise NoExactForm(
        f"the clock changes of {zone_name} do not fall on a fixed weekday of a "
        "fixed week"
    )


def _clock_change_lines(plan: CronPlan, zone_name: str) -> list[str]:
    """Return the lines that make systemd fire as runvisor does on the days
    clocks change."""
    try:
        changes = clock_changes(zone_name)
    except NoExactForm:
        # An irregular zone still translates when no clock change touches
        # the expression.
        if _touched_by_clock_change(plan, zone_name):
            raise
        return []

    lines: list[str] = []
    for change in changes:
        walls = _walls_between(plan, change.start, change.end)
        if not walls:
            continue
        days = [rule.intersect(change.rule) for rule in plan.rules]
        matched = [rule for rule in days if rule is not None]
        if not matched:
            continue
        if change.skipped and not plan.real_time_spacing:
            # runvisor fires once at the end of the gap.
            hours = frozenset({change.end // 3600})
            minutes = frozenset({change.end % 3600 // 60})
            lines += [
                _calendar_line(rule, hours, minutes, zone_name, change.end % 60)
                for rule in matched
            ]
        elif not change.skipped and plan.real_time_spacing:
            # runvisor also fires in the second pass of the repeated hour.
            lines += _second_pass_lines(matched, walls, change)
    return lines


def _touched_by_clock_change(plan: CronPlan, zone_name: str) -> bool:
    """Return whether a fire time of the plan falls in a skipped or repeated
    span of the zone in `_RULE_YEARS`."""
    for instant, before, after in _transitions(ZoneInfo(zone_name)):
        local_start = instant + timedelta(seconds=min(before, after))
        start = local_start.hour * 3600 + local_start.minute * 60
        walls = _walls_between(plan, start, start + abs(after - before))
        day = local_start.date()
        if walls and any(_matches_date(rule, day) for rule in plan.rules):
            return True
    return False


def _matches_date(rule: DayRule, day: date) -> bool:
    length = calendar.monthrange(day.year, day.month)[1]
    number = length + 1 - day.day if rule.from_end else day.day
    return (
        (day.weekday() + 1) % 7 in rule.weekdays
        and day.month in rule.months
        and number in rule.days
    )


def _walls_between(plan: CronPlan, start: int, end: int) -> list[int]:
    return sorted(
        hour * 3600 + minute * 60
        for hour in plan.hours
        for minute in plan.minutes
        if start <= hour * 3600 + minute * 60 < end
    )


def _second_pass_lines(
    rules: list[DayRule], walls: list[int], change: ClockChange
) -> list[str]:
    by_day_shift: dict[int, dict[int, set[int]]] = {}
    for wall in walls:
        shift, utc_seconds = divmod(wall - change.offset_after, _DAY_SECONDS)
        hours = by_day_shift.setdefault(shift, {})
        hours.setdefault(utc_seconds // 3600, set()).add(utc_seconds % 3600 // 60)

    lines = []
    for shift, hours in sorted(by_day_shift.items()):
        for rule in rules:
            for shifted in _shift_days(rule, shift):
                for hour, minutes in sorted(hours.items()):
                    lines.append(
                        _calendar_line(
                            shifted, frozenset({hour}), frozenset(minutes), "UTC"
                        )
                    )
    return lines


def _shift_days(rule: DayRule, shift: int) -> list[DayRule]:
    """Move the days of a rule of one month by `shift` days, into the month
    before or after where they cross its start or end."""
    if shift == 0:
        return [rule]
    (month,) = rule.months
    weekdays = frozenset((weekday + shift) % 7 for weekday in rule.weekdays)
    previous, following = (month - 2) % 12 + 1, month % 12 + 1
    length = _MONTH_LENGTHS[month]
    by_month: dict[int, set[int]] = {}
    for day in rule.days:
        moved = day + shift
        if moved < 1:
            target, moved = previous, moved + _MONTH_LENGTHS[previous]
        elif moved > length:
            target, moved = following, moved - length
        else:
            target = month
        if rule.from_end or (2 in (month, target) and target != month):
            raise NoExactForm(
                "the second pass of a repeated hour falls on another UTC date "
                "in a month of varying length"
            )
        by_month.setdefault(target, set()).add(moved)
    return [
        DayRule(weekdays, frozenset({target}), frozenset(days))
        for target, days in sorted(by_month.items())
    ]


def _clock_text(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}"


# The five-field dialect of Kubernetes and Nomad


def portable_cron(expression: str) -> str:
    """Write the expression with explicit values, `*` only for unrestricted
    fields, so that robfig/cron (Kubernetes) and cronexpr (Nomad) fire at the
    same wall-clock times as `CronSchedule`.

    Raises:
        NoExactForm: the expression uses `L`, `W`, `#` or `nL`, or restricts
            both day fields while one starts with `*`.
    """
    fields = _split_fields(expression)
    minute, hour, day, month, weekday = _parse_fields(fields)
    if day.last_day or day.nearest_weekdays:
        raise NoExactForm("it uses L or W in the day-of-month field")
    if weekday.nth_weekdays or weekday.last_weekdays:
        raise NoExactForm("it uses # or L in the day-of-week field")

    days = frozenset(day.values) or ALL_DAYS
    weekdays = frozenset(weekday.values) or ALL_WEEKDAYS
    if not (day.star_prefixed or weekday.star_prefixed):
        # Either field matching every day makes the OR match every day.
        if days == ALL_DAYS or weekdays == ALL_WEEKDAYS:
            days_text = weekdays_text = "*"
        else:
            days_text = _cron_text(days, ALL_DAYS, star=False)
            weekdays_text = _cron_text(weekdays, ALL_WEEKDAYS, star=False)
    elif days == ALL_DAYS or weekdays == ALL_WEEKDAYS:
        days_text = _cron_text(days, ALL_DAYS, star=True)
        weekdays_text = _cron_text(weekdays, ALL_WEEKDAYS, star=True)
    else:
        raise NoExactForm(
            f"it restricts both day fields ({fields[2]!r} and {fields[4]!r}) and "
            "one starts with '*', which classic cron reads as AND but these "
            "schedulers read as OR"
        )
    return " ".join(
        (
            _cron_text(frozenset(minute.values), ALL_MINUTES, star=True),
            _cron_text(frozenset(hour.values), ALL_HOURS, star=True),
            days_text,
            _cron_text(frozenset(month.values) or ALL_MONTHS, ALL_MONTHS, star=True),
            weekdays_text,
        )
    )


def _cron_text(values: frozenset[int], full: frozenset[int], *, star: bool) -> str:
    if star and values == full:
        return "*"
    ordered = sorted(values)
    if star and len(ordered) >= 2:
        step = ordered[1] - ordered[0]
        if (
            ordered[0] == min(full)
            and set(range(min(full), max(full) + 1, step)) == values
        ):
            return f"*/{step}"
    if len(ordered) >= 3:
        step = ordered[1] - ordered[0]
        if step > 1 and set(range(ordered[0], ordered[-1] + 1, step)) == values:
            return f"{ordered[0]}-{ordered[-1]}/{step}"
    parts = []
    for low, high in _runs(ordered):
        if high - low >= 2:
            parts.append(f"{low}-{high}")
        else:
            parts += [str(value) for value in range(low, high + 1)]
    return ",".join(parts)


def clock_change_effects(expression: str, zone_name: str) -> list[str]:
    """Describe the clock changes of the zone at which runvisor fires the
    expression differently from a scheduler that only reads wall-clock
    fields, or [] when there are none."""
    plan = plan_cron(expression)
    effects = []
    for change in clock_changes(zone_name):
        if not _walls_between(plan, change.start, change.end):
            continue
        if not any(_meets(rule, change.rule) for rule in plan.rules):
            continue
        if change.skipped and not plan.real_time_spacing:
            effects.append(
                f"{change.describe()}, where runvisor fires once at "
                f"{_clock_text(change.end)}"
            )
        elif not change.skipped and plan.real_time_spacing:
            effects.append(f"{change.describe()}, where runvisor fires in both passes")
    return effects


def _meets(rule: DayRule, other: DayRule) -> bool:
    """Return whether two rules share a day, or may share one when their
    intersection has no exact form."""
    try:
        return rule.intersect(other) is not None
    except NoExactForm:
        return True
