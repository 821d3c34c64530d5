"""Text output of the CLI and the shell: tables, colours, events, log lines.

Colour is used only when the output stream is a terminal and `NO_COLOR` is
unset or empty (https://no-color.org). Tables fit the terminal width when
the output is a terminal; piped output is never cut, so scripts see whole
values. On a terminal, control characters in text that comes from runs
(output lines, reasons) are shown escaped, so a run cannot move the cursor
or recolour the operator's terminal.

This module imports only the standard library and the model, so that the
`status` command starts fast.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from supervisor.model import (
    CompletedEvent,
    Event,
    Health,
    HealthEvent,
    LogEvent,
    ProjectState,
    ProjectStatus,
    ReloadEvent,
    RunRecord,
    RunStatus,
    StartedEvent,
    StateEvent,
    Stream,
    TriggerMode,
)

_CODES = {
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "cyan": "36",
    "dim": "2",
    "bold": "1",
}

STATE_COLORS = {
    ProjectState.RUNNING: "green",
    ProjectState.STARTING: "yellow",
    ProjectState.BACKOFF: "yellow",
    ProjectState.STOPPING: "yellow",
    ProjectState.FATAL: "red",
    ProjectState.SCHEDULED: "cyan",
    ProjectState.STOPPED: "dim",
    ProjectState.EXITED: "dim",
}
STATUS_COLORS = {
    RunStatus.RUNNING: "green",
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "red",
    RunStatus.TIMED_OUT: "red",
    RunStatus.LOST: "red",
    RunStatus.STOPPED: "yellow",
    RunStatus.SKIPPED: "dim",
}
HEALTH_COLORS = {Health.HEALTHY: "green", Health.UNHEALTHY: "red"}
TRIGGER_LABELS = {TriggerMode.ALWAYS_RUNNING: "always"}


def color_enabled(stream: TextIO) -> bool:
    """Tell whether to colour output written to `stream`."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


# C0 controls other than tab, DEL and the C1 controls (Unicode category Cc),
# which terminals read as cursor movements, colours or other commands.
_CONTROL_ESCAPES = {
    code: f"\\x{code:02x}"
    for code in (*range(0x20), *range(0x7F, 0xA0))
    if code != ord("\t")
}


def escape_controls(text: str) -> str:
    """Replace control characters other than tab by escapes such as `\\x1b`."""
    return text.translate(_CONTROL_ESCAPES)


def output_width(stream: TextIO) -> int | None:
    """Return the terminal width to fit tables into, or None for piped output."""
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return None
    return shutil.get_terminal_size().columns


@dataclass(frozen=True)
class Style:
    color: bool = False
    escape: bool = False
    """Escape control characters of run output and reasons (`text`)."""

    def text(self, value: str) -> str:
        return escape_controls(value) if self.escape else value

    def paint(self, text: str, color: str | None) -> str:
        if not self.color or color is None or not text:
            return text
        return f"\x1b[{_CODES[color]}m{text}\x1b[0m"


@dataclass(frozen=True)
class Column:
    title: str
    align_right: bool = False
    flexible: bool = False
    """A flexible column is cut (with "…") to fit the width."""
    priority: int = 0
    """Columns of the lowest priority are dropped first when cutting the
    flexible ones is not enough."""


Cell = tuple[str, str | None]
"""Text and its colour name."""


def render_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    style: Style,
    width: int | None,
    gap: int = 2,
) -> list[str]:
    """Lay out a table. With `width`, every line fits into it."""
    if style.escape:
        rows = [[(escape_controls(text), color) for text, color in row] for row in rows]
    keep = list(range(len(columns)))
    widths = [
        max([len(columns[i].title), *(len(row[i][0]) for row in rows)])
        for i in range(len(columns))
    ]
    if width is not None:
        widths = _fit(columns, widths, keep, width, gap)

    def cell(index: int, text: str, color: str | None) -> str:
        size = widths[index]
        if len(text) > size:
            text = text[: max(size - 1, 0)] + "…"
        padded = text.rjust(size) if columns[index].align_right else text.ljust(size)
        if color is None:
            return padded
        # Colour only the text, so the padding keeps its plain width.
        body = padded.strip(" ")
        left = padded[: len(padded) - len(padded.lstrip(" "))]
        right = padded[len(left) + len(body) :]
        return left + style.paint(body, color) + right

    separator = " " * gap
    title_cells = [cell(i, columns[i].title, "bold") for i in keep]
    lines = [separator.join(title_cells).rstrip()]
    for row in rows:
        cells = [cell(i, row[i][0], row[i][1]) for i in keep]
        lines.append(separator.join(cells).rstrip())
    return lines


def _fit(
    columns: Sequence[Column], widths: list[int], keep: list[int], width: int, gap: int
) -> list[int]:
    def total() -> int:
        return sum(widths[i] for i in keep) + gap * (len(keep) - 1)

    flexible = [i for i in keep if columns[i].flexible]
    while total() > width:
        excess = total() - width
        shrinkable = [i for i in flexible if i in keep and widths[i] > 8]
        if shrinkable:
            widest = max(shrinkable, key=lambda i: widths[i])
            widths[widest] = max(8, widths[widest] - excess)
            continue
        droppable = [i for i in keep if columns[i].priority < 100]
        if not droppable:
            break
        keep.remove(min(droppable, key=lambda i: (columns[i].priority, -i)))
    return widths


# Times


def format_span(seconds: float) -> str:
    """Format a duration in short form, such as "45s", "3m05s", "2h10m" or "3d4h"."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def local_time(moment: datetime, *, date: bool = True, millis: bool = False) -> str:
    """Format a time in the local time zone, such as "2026-01-05 13:00:00"."""
    local = moment.astimezone()
    text = local.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    if millis:
        text += f".{local.microsecond // 1000:03d}"
    return text


# Status


def _last_run_text(run: RunRecord | None, now: datetime) -> Cell:
    if run is None:
        return ("-", None)
    if run.status == RunStatus.RUNNING:
        return (f"#{run.id} running", STATUS_COLORS[run.status])
    ended = run.ended_at or run.started_at
    ago = format_span((now - ended).total_seconds())
    return (f"#{run.id} {run.status} {ago} ago", STATUS_COLORS.get(run.status))


def _next_text(project: ProjectStatus, now: datetime) -> str:
    if project.next_fire is None:
        return "-"
    wait = format_span((project.next_fire - now).total_seconds())
    return f"{project.next_fire.astimezone().strftime('%H:%M')} (in {wait})"


STATUS_COLUMNS = (
    Column("NAME", priority=100),
    Column("TRIGGER", priority=10),
    Column("STATE", priority=100),
    Column("HEALTH", priority=30),
    Column("PID", align_right=True, priority=40),
    Column("UPTIME", align_right=True, priority=20),
    Column("RESTARTS", align_right=True, priority=15),
    Column("LAST RUN", priority=50, flexible=True),
    Column("NEXT", priority=45),
    Column("INFO", priority=5, flexible=True),
)


def render_status(
    projects: Sequence[ProjectStatus],
    now: datetime,
    style: Style,
    width: int | None,
) -> list[str]:
    """Lay out the `status` table, one row per project."""
    rows = []
    for project in projects:
        uptime = "-"
        if project.started_at is not None and project.pid is not None:
            uptime = format_span((now - project.started_at).total_seconds())
        health = str(project.health) if project.has_probe else "-"
        rows.append(
            [
                (project.name, None),
                (TRIGGER_LABELS.get(project.trigger, str(project.trigger)), None),
                (str(project.state), STATE_COLORS.get(project.state)),
                (health, HEALTH_COLORS.get(project.health)),
                (str(project.pid) if project.pid else "-", None),
                (uptime, None),
                (str(project.restarts), None),
                _last_run_text(project.last_run, now),
                (_next_text(project, now), None),
                (project.reason or "", None),
            ]
        )
    return render_table(STATUS_COLUMNS, rows, style, width)


# History


HISTORY_COLUMNS = (
    Column("RUN", align_right=True, priority=100),
    Column("PROJECT", priority=90),
    Column("TRIGGER", priority=20),
    Column("STATUS", priority=100),
    Column("STARTED", priority=80),
    Column("TOOK", align_right=True, priority=30),
    Column("EXIT", align_right=True, priority=40),
    Column("REASON", priority=10, flexible=True),
)


def render_history(
    runs: Sequence[RunRecord], style: Style, width: int | None
) -> list[str]:
    rows = []
    for run in runs:
        took = "-"
        if run.ended_at is not None:
            took = format_span((run.ended_at - run.started_at).total_seconds())
        if run.signal is not None:
            code = f"sig {run.signal}"
        elif run.exit_code is not None:
            code = str(run.exit_code)
        else:
            code = "-"
        rows.append(
            [
                (str(run.id), None),
                (run.project, None),
                (str(run.trigger), None),
                (str(run.status), STATUS_COLORS.get(run.status)),
                (local_time(run.started_at), None),
                (took, None),
                (code, None),
                (run.reason, None),
            ]
        )
    return render_table(HISTORY_COLUMNS, rows, style, width)


# Events and log lines


def format_log_line(
    at: datetime, stream: Stream, text: str, style: Style, prefix: str = ""
) -> str:
    """Format a log line: local time with milliseconds, stream, text."""
    stamp = style.paint(local_time(at, millis=True), "dim")
    label = style.paint(f"{stream:<3}", "red" if stream == Stream.ERR else "dim")
    return f"{prefix}{stamp} {label} {style.text(text)}"


def format_event(event: Event, style: Style) -> str:
    """Format an event as one line that starts with its local time and kind."""
    stamp = style.paint(local_time(event.at, date=False), "dim")
    kind = event.__struct_config__.tag
    head = f"{stamp} {kind:<9}"
    reason = style.text(getattr(event, "reason", ""))
    match event:
        case StartedEvent():
            body = (
                f"{event.project} run {event.run_id} started "
                f"({event.trigger}), pid {event.pid}"
            )
        case CompletedEvent():
            status = style.paint(str(event.status), STATUS_COLORS.get(event.status))
            body = f"{event.project} run {event.run_id} {status}"
            if reason:
                body += f": {reason}"
        case LogEvent():
            text = style.text(event.text)
            body = f"{event.project} run {event.run_id} {event.stream}: {text}"
        case StateEvent():
            new = style.paint(str(event.new), STATE_COLORS.get(event.new))
            body = f"{event.project} {event.old} -> {new}"
            if reason:
                body += f": {reason}"
        case HealthEvent():
            new = style.paint(str(event.new), HEALTH_COLORS.get(event.new))
            body = f"{event.project} {event.old} -> {new}"
            if reason:
                body += f": {reason}"
        case ReloadEvent():
            body = style.text(describe_reload_event(event))
    return f"{head} {body}"


def describe_reload_event(event: ReloadEvent) -> str:
    if not event.ok:
        first = event.error.splitlines()[0] if event.error else "invalid config"
        return f"failed, the previous config stays active: {first}"
    parts = [
        f"{label} {', '.join(names)}"
        for label, names in (
            ("added", event.added),
            ("removed", event.removed),
            ("changed", event.changed),
        )
        if names
    ]
    return "applied: " + ("; ".join(parts) if parts else "nothing changed")


def now_utc() -> datetime:
    return datetime.now(UTC)
