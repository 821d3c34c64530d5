"""Export to systemd units: one `.service` per project, plus a `.timer` for
each schedule project.

An always_running project becomes a service with `Restart=`, a manual one
a service without `[Install]` (start it with `systemctl start`), and a
schedule project a service started by its timer. Every unit is named
`runvisor-NAME`, so that a project named like a system unit (`ssh`) does not
replace it.

The command runs through `/bin/sh -c`, which sets `RUNVISOR_RUN_ID` from
systemd's `$INVOCATION_ID` and reads each secret from
`$CREDENTIALS_DIRECTORY`, where `LoadCredentialEncrypted=` puts it. No
secret is written to the unit or to an environment file.
"""

from __future__ import annotations

import math

from supervisor.config import Config, ProjectConfig
from supervisor.errors import ExportError
from supervisor.export.calendar import NoExactForm, on_calendar_lines, plan_cron
from supervisor.export.common import (
    ExportedFile,
    ProjectNotes,
    command_argv,
    comment_block,
    header_lines,
    one_line,
    plain_variables,
    schedule_zone,
    seconds_text,
    secret_file_prelude,
    secret_variables,
    trigger_name,
    unique_secrets,
    untranslatable,
)
from supervisor.model import OverlapPolicy, RestartPolicy, TriggerMode

FORMAT = "systemd"
CREDENTIAL_STORE = "/etc/credstore.encrypted"

# Deaths by these signals are a clean exit for systemd, but a failure for
# runvisor's restart = "on-failure".
_CLEAN_SIGNALS = "SIGHUP SIGINT SIGTERM SIGPIPE"


def unit_name(project: ProjectConfig) -> str:
    return f"runvisor-{project.name}"


def export_project(
    config: Config, project: ProjectConfig
) -> tuple[list[ExportedFile], ProjectNotes]:
    """Return the unit files of one project and what they do not map exactly.

    Raises:
        ExportError: the project cannot be expressed as systemd units.
    """
    notes = ProjectNotes(project.name)
    timer_lines: list[str] = []
    if project.trigger == TriggerMode.SCHEDULE:
        timer_lines = _timer_section(project, notes)
    service_body = _service_sections(project, notes)

    name = unit_name(project)
    header = header_lines(FORMAT, config, project)
    files = [
        ExportedFile(
            f"{name}.service",
            _join([*header, *notes.comment_lines(), "", *service_body]),
        )
    ]
    if timer_lines:
        files.append(ExportedFile(f"{name}.timer", _join([*header, "", *timer_lines])))
    return files, notes


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


# Service


def _service_sections(project: ProjectConfig, notes: ProjectNotes) -> list[str]:
    description = f"runvisor project {project.name}"
    if project.description:
        description += f": {one_line(project.description)}"
    unit = ["[Unit]", f"Description={_specifiers(description)}"]
    service = ["[Service]", "Type=exec"]
    if "\n" in project.path:
        raise ExportError(
            f"Project {project.name}: the project folder path contains a "
            "newline, which a unit file cannot hold. Rename the folder."
        )
    service.append(f"WorkingDirectory={_specifiers(project.path)}")
    service += _exec_start(project)
    for name, value in plain_variables(project, trigger_name(project)):
        service.append(f"Environment={_word(f'{name}={value}', dollar=False)}")
    service += _credential_lines(project)

    service += [
        "KillMode=control-group",
        f"KillSignal={project.stop_signal}",
        f"TimeoutStopSec={seconds_text(project.stop_timeout)}",
    ]
    install: list[str] = []
    if project.trigger == TriggerMode.ALWAYS_RUNNING:
        unit += _start_limit(project)
        service += _restart(project, notes)
        install = ["", "[Install]", "WantedBy=multi-user.target"]
    else:
        if project.timeout is not None:
            service.append(f"RuntimeMaxSec={seconds_text(project.timeout)}")
        _overlap(project, notes)
    if project.keep_env_file:
        notes.warn(
            "keep_env_file = true has no effect: the service gets its variables "
            "from systemd and no .env.local is written."
        )
    return [*unit, "", *service, *install]


def _exec_start(project: ProjectConfig) -> list[str]:
    secrets = unique_secrets(secret_variables(project))
    script = 'export RUNVISOR_RUN_ID="$INVOCATION_ID"'
    if secrets:
        prelude = secret_file_prelude(
            secret_variables(project), "$CREDENTIALS_DIRECTORY"
        )
        script += f"; {prelude}"
    script += '; exec "$@"'
    argv = ["/bin/sh", "-c", script, unit_name(project), *command_argv(project)]
    return [
        "# /bin/sh sets RUNVISOR_RUN_ID and the secret variables, then runs the "
        "command.",
        "ExecStart=" + " ".join(_word(arg, dollar=True) for arg in argv),
    ]


def _credential_lines(project: ProjectConfig) -> list[str]:
    secrets = unique_secrets(secret_variables(project))
    if not secrets:
        return []
    lines = comment_block(
        "Secrets: each LoadCredentialEncrypted= line reads one encrypted "
        f"secret from {CREDENTIAL_STORE}, and ExecStart= exports it to the "
        "run. Store each one once, as root, by typing the value after:"
    )
    for secret in secrets:
        lines.append(
            f"#   systemd-creds encrypt --name={secret.key} - "
            f"{CREDENTIAL_STORE}/{secret.key}"
        )
    lines += comment_block(
        "On a test machine, a drop-in with SetCredential=NAME:VALUE works "
        "without encryption, but keeps the value in plain text."
    )
    for secret in secret_variables(project):
        lines.append(f"# {secret.variable} comes from the {secret.origin}.")
    lines += [
        f"LoadCredentialEncrypted={secret.key}:{CREDENTIAL_STORE}/{secret.key}"
        for secret in secrets
    ]
    return lines


def _start_limit(project: ProjectConfig) -> list[str]:
    return [
        "# runvisor allows restart_limit restarts in restart_window; systemd",
        "# counts starts, the first one included, hence restart_limit + 1.",
        f"StartLimitIntervalSec={seconds_text(project.restart_window)}",
        f"StartLimitBurst={project.restart_limit + 1}",
    ]


def _restart(project: ProjectConfig, notes: ProjectNotes) -> list[str]:
    lines = []
    codes = [code for code in project.success_exit_codes if code != 0]
    if project.restart == RestartPolicy.NEVER:
        lines.append("Restart=no")
    elif project.restart == RestartPolicy.ALWAYS:
        lines.append("Restart=always")
    else:
        lines.append("Restart=on-failure")
        forced = [] if 0 in project.success_exit_codes else ["0"]
        lines.append(f"RestartForceExitStatus={' '.join([*forced, _CLEAN_SIGNALS])}")
    if codes:
        lines.append(f"SuccessExitStatus={' '.join(str(code) for code in codes)}")

    backoff = project.backoff
    lines.append(f"RestartSec={seconds_text(backoff.initial)}")
    if backoff.factor > 1 and backoff.max > backoff.initial:
        steps_exact = math.log(backoff.max / backoff.initial, backoff.factor)
        steps = max(1, math.ceil(steps_exact - 1e-9))
        lines += [
            "# RestartSteps= and RestartMaxDelaySec= need systemd 254 or newer;",
            "# older versions wait RestartSec= before every restart.",
            f"RestartSteps={steps}",
            f"RestartMaxDelaySec={seconds_text(backoff.max)}",
        ]
        if abs(steps - steps_exact) > 1e-9:
            notes.warn(
                f"systemd grows the restart delay from RestartSec= to "
                f"RestartMaxDelaySec= in {steps} equal steps on a log scale, "
                f"which differs from backoff.factor = {backoff.factor:g} because "
                f"max / initial is not a power of the factor."
            )
    notes.warn(
        "systemd does not return the restart delay to RestartSec= after a run "
        f"stays up for backoff.reset_after = {seconds_text(backoff.reset_after)}."
    )
    notes.warn(
        f"max_retries = {project.max_retries} failed starts (runs shorter than "
        f"start_seconds = {seconds_text(project.start_seconds)}) has no systemd "
        "equivalent; only StartLimitBurst= stops a crashing service."
    )
    if project.health is not None:
        health = project.health
        probe = (
            f"exec {health.exec!r}"
            if health.exec
            else f"http {health.http}"
            if health.http
            else f"tcp {health.tcp}"
        )
        notes.warn(
            f"systemd has no health probes, so the {probe} probe is not exported "
            "and the service restarts only when it exits."
        )
    return lines


def _overlap(project: ProjectConfig, notes: ProjectNotes) -> None:
    if project.overlap == OverlapPolicy.SKIP:
        return
    notes.warn(
        f'overlap = "{project.overlap}" has no systemd equivalent: a start '
        'while the service still runs does nothing, as with "skip", and no '
        "skipped run is recorded."
    )


# Timer


def _timer_section(project: ProjectConfig, notes: ProjectNotes) -> list[str]:
    assert project.cron is not None
    zone = schedule_zone(project, notes)
    try:
        calendars = on_calendar_lines(project.cron, zone)
    except NoExactForm as error:
        raise untranslatable(project, "systemd OnCalendar=", error) from None

    lines = [
        "[Unit]",
        f"Description=runvisor schedule of {_specifiers(project.name)}: "
        f"{_specifiers(project.cron)}",
        "",
        "[Timer]",
        f"# cron {project.cron!r} in {zone}.",
    ]
    if len(calendars) > len(plan_cron(project.cron).rules):
        lines += [
            "# The last lines fire on the days clocks change, where runvisor",
            "# fires at times that the first lines alone would not.",
        ]
    lines += [f"OnCalendar={_specifiers(spec)}" for spec in calendars]
    lines += [
        "# Fire on the second, as cron does, not within systemd's default minute.",
        "AccuracySec=1s",
        f"Persistent={'true' if project.catch_up else 'false'}",
    ]
    if project.jitter > 0:
        lines.append(f"RandomizedDelaySec={seconds_text(project.jitter)}")
    lines += ["", "[Install]", "WantedBy=timers.target"]
    return lines


# Quoting


def _specifiers(text: str) -> str:
    return text.replace("%", "%%")


def _word(text: str, *, dollar: bool) -> str:
    """Quote one word for ExecStart= (`dollar`, where `$` expands) or
    Environment=, with C escapes for what a unit file line cannot hold."""
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        elif char == "%":
            out.append("%%")
        elif char == "$" and dollar:
            out.append("$$")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
