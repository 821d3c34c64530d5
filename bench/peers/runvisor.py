"""runvisor from the project's virtual environment.

`runvisor --config PATH serve` runs the daemon in the foreground, logging to
stderr (`--config` is an option of the main command, before the
subcommand). Logs are files under `<data_dir>/logs/<project>/<run_id>.log`,
one line per output line after a time stamp and the stream name. Commands
that need the control socket (`stop`, `start`, live `status`) are used when
the installed CLI has them. `missing_feature` returns which are absent, and
scenarios that need them are skipped with that reason.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from bench import procs, profile
from bench.peers.base import BENCH_DIR, REPO_DIR, Peer, PeerMissing, Project, Settings


def _find_cli() -> Path:
    """Locate the `runvisor` command: $RUNVISOR_BIN, the repository's .venv,
    or the one installed beside the Python running the benchmark."""
    override = os.environ.get("RUNVISOR_BIN")
    if override:
        return Path(override)
    for candidate in (
        REPO_DIR / ".venv" / "bin" / "runvisor",
        Path(sys.executable).parent / "runvisor",
    ):
        if candidate.exists():
            return candidate
    found = shutil.which("runvisor")
    return Path(found) if found else REPO_DIR / ".venv" / "bin" / "runvisor"


CLI = _find_cli()
# The Python that has the runvisor package, for the round-trip client.
VENV_PYTHON = CLI.parent / "python"
ROUNDTRIP = BENCH_DIR / "roundtrip.py"

# runvisor's backoff.initial must be greater than 0, so 1 ms is its smallest
# restart delay. A factor of 1 keeps it there: the default factor of 2 would
# double it at each of the scenario's kills, since reset_after is 1 minute.
FAST_BACKOFF = "1ms"


@functools.cache
def cli_commands() -> frozenset[str]:
    """Return the subcommands the installed `runvisor` CLI offers."""
    if not CLI.exists():
        return frozenset()
    out = subprocess.run([CLI, "--help"], capture_output=True, text=True, timeout=60)
    # argparse lists each subcommand on its own line, indented by 4 spaces.
    return frozenset(re.findall(r"^ {4}([a-z][a-z-]*)\b", out.stdout, re.MULTILINE))


def _toml_string(value: str) -> str:
    return json.dumps(value)


class Runvisor(Peer):
    name = "runvisor"
    counted = "the `runvisor serve` process"
    features = frozenset({"schedule"})
    # When set, every daemon is sampled with py-spy into this folder.
    profile_dir: ClassVar[Path | None] = None
    _profiler: subprocess.Popen[bytes] | None = None

    @classmethod
    def version(cls) -> str:
        if "serve" not in cli_commands():
            raise PeerMissing(f"the runvisor CLI at {CLI} has no serve command yet")
        out = subprocess.run(
            [CLI, "--version"], capture_output=True, text=True, timeout=60
        )
        commit = subprocess.run(
            ["git", "-C", str(REPO_DIR), "log", "-1", "--format=%h"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return f"{out.stdout.strip()} (commit {commit}, working tree)"

    @classmethod
    def missing_feature(cls, feature: str) -> str | None:
        commands = cli_commands()
        needs = {
            "schedule": set(),
            "stop": {"stop", "start"},
            "control": {"stop"},
        }.get(feature)
        if needs is None:
            return f"runvisor has no {feature} feature"
        absent = sorted(needs - commands)
        if absent:
            return f"the runvisor CLI has no {', '.join(absent)} command yet"
        if (
            feature == "control"
            and not (REPO_DIR / "supervisor" / "control.py").exists()
        ):
            return "runvisor has no control client (supervisor/control.py) yet"
        return None

    @property
    def _config(self) -> Path:
        return self.ws.root / "runvisor.toml"

    @property
    def _data_dir(self) -> Path:
        return self.ws.root / "rvdata"

    @property
    def _socket(self) -> Path:
        return self._data_dir / "control.sock"

    def write_config(self, projects: list[Project], settings: Settings) -> None:
        self.settings = settings
        self.projects = projects
        lines = [
            "[runvisor]",
            f"data_dir = {_toml_string(str(self._data_dir))}",
            f"socket = {_toml_string(str(self._socket))}",
            # No rotation within a run (a 0 size is rejected), like the
            # peers' logs, so every line stays in one file.
            'log_max_bytes = "4GiB"',
            'log_level = "info"',
            "",
            "[credentials]",
            'backend = "file"',
        ]
        for p in projects:
            lines += [
                "",
                f"[projects.{p.name}]",
                f"path = {_toml_string(str(p.folder))}",
                f"trigger = {_toml_string(p.trigger)}",
                f"stop_timeout = {settings.stop_timeout:g}",
            ]
            if p.trigger == "schedule":
                lines.append(f"cron = {_toml_string(p.cron or '')}")
            if p.trigger == "always_running":
                lines += [
                    f"restart = {_toml_string('always' if p.restart else 'never')}",
                    f"start_seconds = {settings.start_seconds:g}",
                    # Scenarios kill children on purpose; the flap limit
                    # must not turn the project fatal meanwhile.
                    "restart_limit = 1000",
                ]
                if settings.fast_restart:
                    lines += [
                        f"[projects.{p.name}.backoff]",
                        f"initial = {_toml_string(FAST_BACKOFF)}",
                        "factor = 1.0",
                    ]
        self._config.write_text("\n".join(lines) + "\n")

    def start_daemon(self) -> None:
        self._stderr_path = self.ws.root / "runvisor.stderr"
        self.daemon = subprocess.Popen(
            [CLI, "--config", self._config, "serve"],
            env=self.env,
            cwd=self.ws.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self._stderr_path, "wb"),  # noqa: SIM115
        )
        procs.wait_for(self._ready, 120, "runvisor to report it is running", 0.01)
        if self.profile_dir is not None:
            output = self.profile_dir / f"{self.ws.root.name}.txt"
            self._profiler = profile.start(self.daemon.pid, output, self.env)

    def _ready(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise RuntimeError(
                f"runvisor serve exited with {self.daemon.returncode}: "
                f"{self._stderr_path.read_text()[-2000:]}"
            )
        if b" running: config=" not in self._stderr_path.read_bytes():
            return False
        # With a control server, ready means its socket exists too.
        return self.missing_feature("control") is not None or self._socket.exists()

    def daemon_pids(self) -> list[int]:
        return [self.daemon.pid] if self.daemon is not None else []

    def _cli(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> procs.CommandResult:
        return self.run_cli(
            [str(CLI), "--config", str(self._config), *args], timeout, check
        )

    def stop_projects(self, names: list[str]) -> None:
        reason = self.missing_feature("stop")
        if reason:
            raise PeerMissing(reason)
        # One request per project, all at once, as a user's script would.
        commands = [
            subprocess.Popen(
                [CLI, "--config", self._config, "stop", name],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for name in names
        ]
        for name, command in zip(names, commands, strict=True):
            _, err = command.communicate(timeout=120)
            if command.returncode != 0:
                raise RuntimeError(
                    f"runvisor stop {name} failed: {err.decode().strip()}"
                )

    def start_projects(self, names: list[str]) -> None:
        reason = self.missing_feature("stop")
        if reason:
            raise PeerMissing(reason)
        for name in names:
            self._cli("start", name)

    def status(self) -> dict[str, str]:
        document = json.loads(self._cli("status", "--json").stdout)
        rows = document if isinstance(document, list) else document.get("projects", [])
        states = {}
        for row in rows:
            state = row.get("state")
            if state is None:  # the status read from the store when no daemon responds
                last_run = row.get("last_run") or {}
                state = last_run.get("status", "stopped")
            states[row["name"]] = state
        return states

    def status_argv(self, as_json: bool = False) -> list[str]:
        argv = [str(CLI), "--config", str(self._config), "status"]
        return [*argv, "--json"] if as_json else argv

    def roundtrip_argv(self, count: int) -> list[str]:
        reason = self.missing_feature("control")
        if reason:
            raise PeerMissing(reason)
        return [
            str(VENV_PYTHON),
            str(ROUNDTRIP),
            "runvisor",
            str(self._socket),
            str(count),
        ]

    def log_files(self, project: str) -> list[Path]:
        folder = self._data_dir / "logs" / project
        try:
            files = [p for p in folder.iterdir() if p.name.endswith(".log")]
        except FileNotFoundError:
            return []
        return sorted(files, key=lambda p: int(p.stem) if p.stem.isdigit() else 0)

    def cleanup(self) -> None:
        super().cleanup()
        if self._profiler is not None:
            # py-spy writes its output once the daemon has exited.
            try:
                self._profiler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._profiler.kill()
                self._profiler.wait()

    def request_shutdown(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
