"""systemd export checked by systemd itself.

`systemd-analyze verify` loads the generated units. Its debug log prints
the parsed `Environment:` and `Command Line:` of a service, which checks
the quoting. `systemd-analyze calendar` lists the fire times of each
`OnCalendar=` line, which must equal those of runvisor's `CronSchedule`.
scripts/system-deps.sh installs Debian's systemd package for this.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.cron import CronSchedule
from supervisor.export import export_config
from supervisor.export.calendar import NoExactForm, clock_changes, on_calendar_lines
from tests.test_export import make_every_setting_folder

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing: run scripts/system-deps.sh as root",
)


@pytest.fixture(autouse=True)
def utc_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "TZ": "UTC", "SYSTEMD_COLORS": "0"},
        timeout=120,
    )


def systemd_version() -> int:
    output = analyze("--version").stdout
    match = re.match(r"systemd (\d+)", output)
    assert match, output
    return int(match[1])


def write_units(tmp_path: Path) -> Path:
    config = load_config(make_every_setting_folder(tmp_path / "projects"))
    units = tmp_path / "units"
    units.mkdir()
    for file in export_config(config, "systemd").files:
        (units / file.name).write_text(file.text)
    return units


def test_units_pass_systemd_verify(tmp_path: Path) -> None:
    units = write_units(tmp_path)

    done = analyze("verify", "--man=no", *sorted(str(p) for p in units.iterdir()))

    problems = done.stderr.splitlines()
    if systemd_version() < 254:
        # These keys exist from systemd 254 on; older versions ignore them.
        problems = [
            line
            for line in problems
            if not re.search(r"Unknown key '?(RestartSteps|RestartMaxDelaySec)", line)
        ]
    assert done.returncode == 0, done.stderr
    assert problems == []


def parsed_service(unit: Path) -> tuple[list[str], list[str]]:
    """Return the environment entries and the command of a service as
    systemd's verify parses them."""
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "SYSTEMD_LOG_LEVEL": "debug"},
        timeout=60,
    )
    dump = done.stdout + done.stderr
    environment = re.findall(r"^\t\tEnvironment: (.*(?:\n(?!\t).*)*)$", dump, re.M)
    commands = re.findall(r"^\t\t\tCommand Line: (.*)$", dump, re.M)
    assert len(commands) == 1, dump
    return environment, shlex.split(commands[0])


def expand_dollars(word: str) -> str:
    """Undo the `\\$` of the dump's shell quoting, then apply the `$$`
    expansion that systemd does when it runs ExecStart=."""
    return word.replace("\\$", "$").replace("$$", "$")


def test_service_keeps_values_byte_for_byte(tmp_path: Path) -> None:
    units = write_units(tmp_path)
    root = tmp_path / "projects"

    environment, argv = parsed_service(units / "runvisor-report.service")

    assert environment == [
        "RUNVISOR_PROJECT=report",
        "RUNVISOR_TRIGGER=schedule",
        "LOG_LEVEL=debug",
        "MULTI=line one\nline two",
        'QUOTED=it\'s "quoted" $HOME ${HOME} %h \\ back',
    ]
    command = [expand_dollars(word) for word in argv]
    assert command[:2] == ["/bin/sh", "-c"]
    assert command[3:] == [
        "runvisor-report",
        f"{root}/report folder/run.sh",
        "--title",
        "two words",
        "100%",
    ]


def test_service_shell_exports_secret_files(tmp_path: Path) -> None:
    units = write_units(tmp_path)
    _, argv = parsed_service(units / "runvisor-report.service")
    script = expand_dollars(argv[2])
    secrets = tmp_path / "credentials"
    secrets.mkdir()
    (secrets / "my-notion").write_text("it's $HOME `x`\n\n")
    (secrets / "report.API_SECRET").write_text("plain")

    done = subprocess.run(
        ["/bin/sh", "-c", script, "runvisor-report", "env", "-0"],
        capture_output=True,
        env={"CREDENTIALS_DIRECTORY": str(secrets), "INVOCATION_ID": "abc123"},
        timeout=10,
    )

    assert done.returncode == 0, done.stderr
    variables = dict(
        entry.split(b"=", 1) for entry in done.stdout.split(b"\0") if entry
    )
    assert variables[b"NOTION_KEY"] == b"it's $HOME `x`\n\n"
    assert variables[b"API_SECRET"] == b"plain"
    assert variables[b"RUNVISOR_RUN_ID"] == b"abc123"


def test_service_shell_fails_without_secret_file(tmp_path: Path) -> None:
    units = write_units(tmp_path)
    _, argv = parsed_service(units / "runvisor-report.service")
    script = expand_dollars(argv[2])

    done = subprocess.run(
        ["/bin/sh", "-c", script, "runvisor-report", "true"],
        capture_output=True,
        env={"CREDENTIALS_DIRECTORY": str(tmp_path / "missing")},
        timeout=10,
    )

    assert done.returncode == 1


# Fire times

_ELAPSE = re.compile(r"(?:Next elapse|Iter\. #\d+): \w{3} (\S+ \S+) UTC")


def systemd_fire_times(lines: list[str], base: datetime, count: int) -> list[datetime]:
    """Return the union of the next `count` fire times of each line."""
    times: set[datetime] = set()
    for line in lines:
        done = analyze(
            "calendar",
            f"--iterations={count}",
            f"--base-time=@{int(base.timestamp())}",
            line,
        )
        assert done.returncode == 0, done.stderr
        times |= {
            datetime.fromisoformat(text).replace(tzinfo=UTC)
            for text in _ELAPSE.findall(done.stdout)
        }
    return sorted(times)


def assert_same_fire_times(
    expression: str, zone: str, base: datetime, span: timedelta
) -> None:
    end = base + span
    expected = [
        time.astimezone(UTC)
        for time in CronSchedule(expression, zone).next_times(base, 5000)
        if time < end
    ]
    assert len(expected) < 5000, "the span is too long for this expression"
    lines = on_calendar_lines(expression, zone)

    got = systemd_fire_times(lines, base, len(expected) + 1)

    assert [time for time in got if time < end] == expected, lines


# Expressions that fire at most daily are compared over a year. The rest
# are compared over four days around each clock change of their zone,
# because systemd-analyze takes seconds per thousand iterations.
YEAR_CASES = [
    ("0 0 8-9 * 0#2", "UTC"),
    ("30 4 1,15 * 5", "UTC"),
    ("0 0 L * *", "UTC"),
    ("0 0 15W * *", "UTC"),
    ("0 0 1W * *", "UTC"),
    ("0 0 31W * *", "UTC"),
    ("0 0 30W 1-6 *", "UTC"),
    ("0 0 1-7 * 1", "UTC"),
    ("0 0 */2 * 1", "UTC"),
    ("15 1 * * 5L", "UTC"),
    ("0 12 L,15 * 1#1,3L", "UTC"),
    ("0 0 * * 1-5/2", "UTC"),
    ("0 6,18 1-10/3 jan,jun-aug *", "UTC"),
    ("@daily", "UTC"),
    ("@weekly", "Asia/Tokyo"),
    ("@monthly", "UTC"),
    ("@yearly", "UTC"),
    ("30 2 * * *", "Europe/Paris"),
    ("0,30 2 * * *", "Europe/Paris"),
    ("0 20 * * *", "Europe/Paris"),
    ("0 8 * * 1", "Europe/Amsterdam"),
    ("30 2 * * 0", "America/New_York"),
    ("30 1 * * *", "America/New_York"),
    ("15 2 * 3 0", "Australia/Sydney"),
    ("30 0 * * *", "America/Havana"),
    ("45 1 * * *", "Europe/Dublin"),
    ("0 12 * * *", "America/Santiago"),
]

DENSE_CASES = [
    ("*/30 * * * *", "Europe/Paris"),
    ("*/15 * * * *", "America/New_York"),
    ("@hourly", "Australia/Sydney"),
    ("*/20 0-3 * * *", "America/Havana"),
    ("5 * * * 0", "Europe/London"),
    ("*/10 * * * *", "Asia/Kolkata"),
    # The second pass of this zone's repeated half hour is on the UTC day
    # before, across the end of March.
    ("*/5 * * * *", "Australia/Lord_Howe"),
]


@pytest.mark.parametrize(("expression", "zone"), YEAR_CASES)
def test_on_calendar_fires_as_cron_for_a_year(expression: str, zone: str) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)

    assert_same_fire_times(expression, zone, base, timedelta(days=366))


@pytest.mark.parametrize(("expression", "zone"), DENSE_CASES)
def test_on_calendar_fires_as_cron_at_clock_changes(expression: str, zone: str) -> None:
    starts = [datetime(2025, 1, 1, tzinfo=UTC)]
    for change in clock_changes(zone):
        month = min(change.rule.months)
        first_day = min(change.rule.days)
        starts.append(datetime(2025, month, first_day, tzinfo=UTC) - timedelta(days=1))

    for base in starts:
        assert_same_fire_times(expression, zone, base, timedelta(days=9))


REFUSED_CASES = [
    ("0 0 */2 * 5L", "UTC", "counts days from both ends of months"),
    ("0 0 28W * *", "UTC", "'28W' in February depends on whether the year"),
    ("*/5 * * * *", "America/Santiago", "do not fall on a fixed weekday"),
]


@pytest.mark.parametrize(("expression", "zone", "reason"), REFUSED_CASES)
def test_on_calendar_rejects_expression(
    expression: str, zone: str, reason: str
) -> None:
    CronSchedule(expression, zone)

    with pytest.raises(NoExactForm, match=re.escape(reason)):
        on_calendar_lines(expression, zone)
