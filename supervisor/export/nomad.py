"""Export to Nomad jobs in HCL: a service job for always_running, a
periodic batch job for schedule and a parameterized batch job for manual
(run it with `nomad job dispatch NAME`).

Tasks use the `raw_exec` driver, so the project folder must exist at the
same path on the Nomad clients. The command runs through `/bin/sh -c`,
which enters the folder, reads each secret from `$NOMAD_SECRETS_DIR` (where
a template renders it from a Nomad Variable) and applies `timeout`.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Sequence
from urllib.parse import urlsplit

from supervisor.config import Config, HealthConfig, ProjectConfig
from supervisor.export.calendar import NoExactForm, clock_change_effects, portable_cron
from supervisor.export.common import (
    ExportedFile,
    ExportOptions,
    ProjectNotes,
    command_argv,
    comment_block,
    header_lines,
    plain_variables,
    schedule_zone,
    seconds_text,
    secret_file_prelude,
    secret_variables,
    trigger_name,
    unique_secrets,
    untranslatable,
)
from supervisor.model import OnUnhealthy, OverlapPolicy, RestartPolicy, TriggerMode

FORMAT = "nomad"
# Nomad clients cap kill_timeout at their max_kill_timeout, 30s by default.
_DEFAULT_MAX_KILL_TIMEOUT = 30.0


class _Interpolated(str):
    """A string whose `${...}` Nomad interpolates at run time."""


Value = str | int | bool | list[str]


class _Block:
    """An HCL block: attributes, then nested blocks, written in that order."""

    def __init__(self, kind: str, *labels: str) -> None:
        self.kind = kind
        self.labels = labels
        self.attributes: list[tuple[str, Value]] = []
        self.blocks: list[_Block] = []
        self.comments: list[str] = []

    def set(self, name: str, value: Value) -> _Block:
        self.attributes.append((name, value))
        return self

    def add(self, block: _Block) -> _Block:
        self.blocks.append(block)
        return block

    def lines(self, indent: int = 0) -> list[str]:
        pad = " " * indent
        head = " ".join([self.kind, *(_string(label) for label in self.labels)])
        if not self.attributes and not self.blocks:
            return [*(pad + c for c in self.comments), f"{pad}{head} {{}}"]
        lines = [*(pad + c for c in self.comments), f"{pad}{head} {{"]
        width = max((len(name) for name, _ in self.attributes), default=0)
        for name, value in self.attributes:
            lines.append(f"{pad}  {name.ljust(width)} = {_value(value)}")
        for block in self.blocks:
            if len(lines) > 1:
                lines.append("")
            lines += block.lines(indent + 2)
        lines.append(f"{pad}}}")
        return lines


def export_project(
    config: Config, project: ProjectConfig, options: ExportOptions
) -> tuple[list[ExportedFile], ProjectNotes]:
    """Return the job file of one project and what it does not map exactly.

    Raises:
        ExportError: the project cannot be expressed as a Nomad job.
    """
    notes = ProjectNotes(project.name)
    name = _service_name(project)
    job = _Block("job", project.name)
    group = _Block("group", project.name)

    if project.trigger == TriggerMode.ALWAYS_RUNNING:
        job.set("type", "service")
        _service_group(project, name, group, notes)
    else:
        job.set("type", "batch")
        if project.trigger == TriggerMode.SCHEDULE:
            job.add(_periodic(project, notes))
        else:
            job.add(_Block("parameterized"))
            if project.overlap != OverlapPolicy.ALLOW:
                notes.warn(
                    f'overlap = "{project.overlap}" is not kept: each '
                    "'nomad job dispatch' starts a run of its own, as with "
                    '"allow".'
                )
        group.add(_Block("restart").set("attempts", 0).set("mode", "fail")).comments = [
            "# A failed run is not retried, as in runvisor."
        ]
        group.add(_Block("reschedule").set("attempts", 0).set("unlimited", False))
    group.add(_task(project, notes))
    job.add(group)

    lines = [*header_lines(FORMAT, config, project), *_secret_comment(project)]
    lines += [*notes.comment_lines(), "", *job.lines()]
    return [ExportedFile(f"{project.name}.nomad.hcl", "\n".join(lines) + "\n")], notes


def _service_name(project: ProjectConfig) -> str:
    return re.sub(r"[^a-z0-9-]", "-", project.name.lower()).strip("-") or "project"


# Jobs


def _periodic(project: ProjectConfig, notes: ProjectNotes) -> _Block:
    assert project.cron is not None
    zone = schedule_zone(project, notes)
    try:
        cron = portable_cron(project.cron)
    except NoExactForm as error:
        raise untranslatable(project, "a Nomad periodic job", error) from None
    for effect in clock_change_effects(project.cron, zone):
        notes.warn(f"in {zone}, {effect}; Nomad may fire at other times on that day.")

    periodic = _Block("periodic")
    periodic.set("crons", [cron])
    periodic.set("prohibit_overlap", project.overlap != OverlapPolicy.ALLOW)
    periodic.set("time_zone", zone)
    if project.overlap in (OverlapPolicy.QUEUE, OverlapPolicy.REPLACE):
        notes.warn(
            f'overlap = "{project.overlap}" has no Nomad equivalent, so a fire '
            "while the previous run is still going is skipped "
            "(prohibit_overlap = true)."
        )
    if project.catch_up:
        notes.warn(
            "catch_up = true is not kept: Nomad does not launch a periodic job "
            "for fire times missed while the cluster was down."
        )
    if project.jitter > 0:
        notes.warn("jitter has no Nomad equivalent, so runs start at the fire time.")
    return periodic


def _service_group(
    project: ProjectConfig, name: str, group: _Block, notes: ProjectNotes
) -> None:
    group.set("count", 1)
    restart = group.add(_Block("restart"))
    restart.comments = [
        "# restart_limit restarts within restart_window, then the job fails."
    ]
    restart.set("attempts", project.restart_limit)
    restart.set("interval", seconds_text(project.restart_window))
    restart.set("delay", seconds_text(project.backoff.initial))
    restart.set("mode", "fail")
    group.add(_Block("reschedule").set("attempts", 0).set("unlimited", False))

    if project.restart != RestartPolicy.ALWAYS:
        notes.warn(
            f'restart = "{project.restart}" is not kept: Nomad restarts a service '
            "task after every exit."
        )
    notes.warn(
        "Nomad waits restart.delay (plus up to 25% random jitter) before every "
        f"restart; backoff.factor = {project.backoff.factor:g}, backoff.max and "
        "backoff.reset_after are not kept."
    )
    notes.warn(
        f"max_retries = {project.max_retries} failed starts (runs shorter than "
        f"start_seconds = {seconds_text(project.start_seconds)}) has no Nomad "
        "equivalent; only the restart block stops a crashing task."
    )
    if project.health is not None:
        _health(project.health, name, group, notes)


def _health(
    health: HealthConfig, name: str, group: _Block, notes: ProjectNotes
) -> None:
    service = _Block("service")
    service.set("name", name)
    check = _Block("check")
    if health.exec is not None:
        # Nomad's own service discovery runs only http and tcp checks.
        service.set("provider", "consul")
        argv = shlex.split(health.exec)
        check.set("type", "script")
        check.set("command", argv[0])
        if argv[1:]:
            check.set("args", argv[1:])
        check.set("task", name)
    else:
        service.set("provider", "nomad")
        if health.http is not None:
            url = urlsplit(health.http)
            host, port = url.hostname or "", url.port or 80
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            check.set("type", "http")
            check.set("path", path)
        else:
            assert health.tcp is not None
            host_text, _, port_text = health.tcp.rpartition(":")
            host, port = host_text.strip("[]"), int(port_text)
            check.set("type", "tcp")
        group.add(_Block("network")).add(_Block("port", "health").set("static", port))
        service.set("port", "health")
        service.set("address", host)
        if not _is_address(host):
            notes.warn(
                f"Nomad checks an address, so the probe host {host} is used as "
                "the service address as it is; make sure it resolves on the "
                "client."
            )
    check.set("interval", seconds_text(health.interval))
    check.set("timeout", seconds_text(health.timeout))
    if health.on_unhealthy == OnUnhealthy.RESTART:
        check_restart = check.add(_Block("check_restart"))
        check_restart.set("limit", health.failure_threshold)
        check_restart.set("grace", seconds_text(health.start_period))
    elif health.failure_threshold != 1:
        notes.warn(
            'with on_unhealthy = "none", Nomad marks the check critical on the '
            "first failure, not after health.failure_threshold failures."
        )
    if health.success_threshold != 1:
        if health.exec is not None:
            check.set("success_before_passing", health.success_threshold)
        else:
            notes.warn(
                "Nomad's own checks have no success threshold, so "
                f"health.success_threshold = {health.success_threshold} is not kept."
            )
    service.add(check)
    group.add(service)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# Task


def _task(project: ProjectConfig, notes: ProjectNotes) -> _Block:
    task = _Block("task", _service_name(project))
    task.set("driver", "raw_exec")
    task.set("kill_signal", project.stop_signal)
    task.set("kill_timeout", seconds_text(project.stop_timeout))
    if project.stop_timeout > _DEFAULT_MAX_KILL_TIMEOUT:
        notes.warn(
            f"Nomad clients cap kill_timeout at their max_kill_timeout (30s by "
            f"default); raise it to keep stop_timeout = "
            f"{seconds_text(project.stop_timeout)}."
        )
    if project.keep_env_file:
        notes.warn(
            "keep_env_file = true has no effect: the task gets its variables "
            "from Nomad and no .env.local is written."
        )

    script = 'cd -- "$1" || exit 1; shift'
    secrets = secret_variables(project)
    if secrets:
        script += "; " + secret_file_prelude(secrets, "$NOMAD_SECRETS_DIR")
    if project.timeout is not None:
        # timeout(1) signals the command's whole process group.
        script += (
            f"; exec timeout --signal={project.stop_signal} "
            f'--kill-after={project.stop_timeout:g}s {project.timeout:g}s "$@"'
        )
    else:
        script += '; exec "$@"'
    config = task.add(_Block("config"))
    config.set("command", "/bin/sh")
    config.set(
        "args",
        [
            "-c",
            script,
            f"runvisor-{project.name}",
            project.path,
            *command_argv(project),
        ],
    )

    env = task.add(_Block("env"))
    for variable, value in plain_variables(project, trigger_name(project)):
        env.set(variable, value)
    env.set("RUNVISOR_RUN_ID", _Interpolated("${NOMAD_ALLOC_ID}"))

    for secret in unique_secrets(secrets):
        template = task.add(_Block("template"))
        template.set(
            "data",
            f'{{{{ with nomadVar "nomad/jobs/{project.name}" }}}}'
            f'{{{{ index . "{secret.key}" }}}}{{{{ end }}}}',
        )
        template.set("destination", f"secrets/{secret.key}")
        template.set("perms", "0400")
    return task


def _secret_comment(project: ProjectConfig) -> list[str]:
    secrets = unique_secrets(secret_variables(project))
    if not secrets:
        return []
    lines = comment_block(
        f"Secrets come from the Nomad Variable nomad/jobs/{project.name}, "
        "which this file does not contain. Store them once from a file "
        'spec.nv.hcl that holds items { KEY = "VALUE" } with the keys '
        f"{', '.join(secret.key for secret in secrets)}:"
    )
    lines.append(f"#   nomad var put -in hcl nomad/jobs/{project.name} @spec.nv.hcl")
    lines += [
        f"# {secret.variable} comes from the {secret.origin}."
        for secret in secret_variables(project)
    ]
    return lines


# Literals


def _value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, _Interpolated):
        return f'"{value}"'
    if isinstance(value, str):
        return _string(value)
    return _list(value)


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_string(item) for item in values) + "]"


def _string(text: str) -> str:
    """Quote a string for HCL2, with `${` and `%{` escaped so that neither HCL
    nor Nomad interpolates them."""
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    quoted = "".join(out)
    quoted = quoted.replace("${", "$${").replace("%{", "%%{")
    return f'"{quoted}"'
