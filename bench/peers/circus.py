"""circus from the bench virtual environment, its ZeroMQ endpoints on Unix sockets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench import procs
from bench.peers.base import BENCH_DIR, PEERS_DIR, Peer, PeerMissing, Project, Settings

BIN = PEERS_DIR / "venv" / "bin"
ROUNDTRIP = BENCH_DIR / "roundtrip.py"

# circus checks its processes every `check_delay` seconds (5 s by default in
# an ini file) and respawns dead ones only then, so that period is its restart
# delay. 0.1 s is the smallest period used here: smaller ones cost idle CPU.
FAST_CHECK_DELAY = 0.1
DEFAULT_CHECK_DELAY = 5.0


class Circus(Peer):
    name = "circus"
    counted = "the circusd process"

    @classmethod
    def version(cls) -> str:
        if not (BIN / "circusd").exists():
            raise PeerMissing(f"circusd is not installed in {BIN}; run bench/setup.sh.")
        out = subprocess.run(
            [BIN / "circusd", "--version"], capture_output=True, text=True, timeout=30
        )
        return f"circus {out.stdout.strip()}"

    @property
    def _ini(self) -> Path:
        return self.ws.root / "circus.ini"

    @property
    def _endpoint(self) -> str:
        return f"ipc://{self.ws.root}/circus-ctl.sock"

    def write_config(self, projects: list[Project], settings: Settings) -> None:
        self.settings = settings
        self.projects = projects
        ws = self.ws.root
        check_delay = FAST_CHECK_DELAY if settings.fast_restart else DEFAULT_CHECK_DELAY
        lines = [
            "[circus]",
            f"endpoint = {self._endpoint}",
            f"pubsub_endpoint = ipc://{ws}/circus-pub.sock",
            f"stats_endpoint = ipc://{ws}/circus-stats.sock",
            "statsd = false",
            f"check_delay = {check_delay:g}",
            "warmup_delay = 0",
        ]
        for p in projects:
            if p.trigger == "schedule":
                raise PeerMissing("circus has no schedule feature")
            always = p.trigger == "always_running"
            # circus has no start seconds: a watcher is "active" once spawned.
            lines += [
                f"[watcher:{p.name}]",
                f"cmd = {p.script}",
                f"working_dir = {p.folder}",
                "numprocesses = 1",
                "copy_env = true",
                f"autostart = {'true' if always else 'false'}",
                f"respawn = {'true' if always and p.restart else 'false'}",
                f"graceful_timeout = {settings.stop_timeout:g}",
                "stop_children = true",
                "stdout_stream.class = FileStream",
                f"stdout_stream.filename = {ws}/logs/{p.name}.out",
                "stdout_stream.max_bytes = 0",
                "stderr_stream.class = FileStream",
                f"stderr_stream.filename = {ws}/logs/{p.name}.err",
                "stderr_stream.max_bytes = 0",
            ]
        self._ini.write_text("\n".join(lines) + "\n")

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen(
            [
                BIN / "circusd",
                "--log-level",
                "warning",
                "--log-output",
                self.ws.root / "circusd.log",
                self._ini,
            ],
            env=self.env,
            cwd=self.ws.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.ws.root / "circusd.stderr", "wb"),  # noqa: SIM115
        )
        procs.wait_for(self._answers, 60, "circusd to answer on its socket", 0.05)

    def _answers(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise RuntimeError(
                f"circusd exited with {self.daemon.returncode}; "
                f"see {self.ws.root / 'circusd.stderr'}."
            )
        sock = self.ws.root / "circus-ctl.sock"
        if not sock.exists():
            return False
        return self._ctl("--json", "dstats", check=False).returncode == 0

    def daemon_pids(self) -> list[int]:
        return [self.daemon.pid] if self.daemon is not None else []

    def _ctl(self, *args: str, check: bool = True) -> procs.CommandResult:
        argv = [str(BIN / "circusctl"), "--endpoint", self._endpoint, "--timeout", "30"]
        return self.run_cli([*argv, *args], check=check)

    def stop_projects(self, names: list[str]) -> None:
        if set(names) == {p.name for p in self.projects}:
            self._ctl("stop")
            return
        for name in names:
            self._ctl("stop", name)

    def start_projects(self, names: list[str]) -> None:
        if set(names) == {p.name for p in self.projects}:
            self._ctl("start")
            return
        for name in names:
            self._ctl("start", name)

    def status(self) -> dict[str, str]:
        out = self._ctl("--json", "status").stdout
        statuses = json.loads(out)["statuses"]
        return {
            name: "running" if state == "active" else state
            for name, state in statuses.items()
        }

    def status_argv(self, as_json: bool = False) -> list[str]:
        argv = [str(BIN / "circusctl"), "--endpoint", self._endpoint]
        return [*argv, "--json", "status"] if as_json else [*argv, "status"]

    def roundtrip_argv(self, count: int) -> list[str]:
        return [
            str(BIN / "python"),
            str(ROUNDTRIP),
            "circus",
            self._endpoint,
            str(count),
        ]

    def log_files(self, project: str) -> list[Path]:
        return [self.ws.root / "logs" / f"{project}.out"]

    def request_shutdown(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
