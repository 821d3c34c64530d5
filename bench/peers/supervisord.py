"""supervisord 4 from the bench virtual environment, run in the foreground."""

from __future__ import annotations

import subprocess
import xmlrpc.client
from pathlib import Path
from typing import Any

from bench import procs
from bench.peers.base import BENCH_DIR, PEERS_DIR, Peer, PeerMissing, Project, Settings
from bench.roundtrip import UnixServerProxy

BIN = PEERS_DIR / "venv" / "bin"
ROUNDTRIP = BENCH_DIR / "roundtrip.py"

_STATES = {"RUNNING": "running"}


class Supervisord(Peer):
    name = "supervisord"
    counted = "the supervisord process"

    @classmethod
    def version(cls) -> str:
        if not (BIN / "supervisord").exists():
            raise PeerMissing(
                f"supervisord is not installed in {BIN}; run bench/setup.sh."
            )
        out = subprocess.run(
            [BIN / "supervisord", "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()

    @property
    def _conf(self) -> Path:
        return self.ws.root / "supervisord.conf"

    @property
    def _sock(self) -> Path:
        return self.ws.root / "supervisor.sock"

    def write_config(self, projects: list[Project], settings: Settings) -> None:
        self.settings = settings
        self.projects = projects
        ws = self.ws.root
        lines = [
            "[unix_http_server]",
            f"file={self._sock}",
            "chmod=0700",
            "[supervisord]",
            f"logfile={ws}/supervisord.log",
            f"pidfile={ws}/supervisord.pid",
            f"childlogdir={ws}/logs",
            "nodaemon=true",
            "loglevel=warn",
            "minfds=8192",
            "minprocs=512",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = "
            "supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{self._sock}",
        ]
        for p in projects:
            if p.trigger == "schedule":
                raise PeerMissing("supervisord has no schedule feature")
            always = p.trigger == "always_running"
            # startsecs is supervisord's start seconds; a restart after a
            # RUNNING process exits has no delay, so fast_restart changes nothing.
            lines += [
                f"[program:{p.name}]",
                f"command={p.script}",
                f"directory={p.folder}",
                f"autostart={'true' if always else 'false'}",
                f"autorestart={'true' if always and p.restart else 'false'}",
                f"startsecs={settings.start_seconds:g}",
                "startretries=3",
                f"stopwaitsecs={settings.stop_timeout:g}",
                "stopasgroup=true",
                "killasgroup=true",
                f"stdout_logfile={ws}/logs/{p.name}.out",
                "stdout_logfile_maxbytes=0",
                f"stderr_logfile={ws}/logs/{p.name}.err",
                "stderr_logfile_maxbytes=0",
            ]
        self._conf.write_text("\n".join(lines) + "\n")

    def start_daemon(self) -> None:
        self.daemon = subprocess.Popen(
            [BIN / "supervisord", "-c", self._conf],
            env=self.env,
            cwd=self.ws.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.ws.root / "supervisord.stderr", "wb"),  # noqa: SIM115
        )
        procs.wait_for(self._answers, 30, "supervisord to answer on its socket", 0.01)

    def _answers(self) -> bool:
        if self.daemon is not None and self.daemon.poll() is not None:
            raise RuntimeError(
                f"supervisord exited with {self.daemon.returncode}; "
                f"see {self.ws.root / 'supervisord.stderr'}."
            )
        try:
            state: dict[str, Any] = self._rpc().supervisor.getState()  # type: ignore[assignment]
            return state["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def _rpc(self) -> xmlrpc.client.ServerProxy:
        return UnixServerProxy(str(self._sock))

    def daemon_pids(self) -> list[int]:
        return [self.daemon.pid] if self.daemon is not None else []

    def _ctl(self, *args: str, check: bool = False) -> procs.CommandResult:
        return self.run_cli(
            [str(BIN / "supervisorctl"), "-c", str(self._conf), *args], check=check
        )

    def stop_projects(self, names: list[str]) -> None:
        self._ctl("stop", *names)

    def start_projects(self, names: list[str]) -> None:
        self._ctl("start", *names)

    def status(self) -> dict[str, str]:
        infos: list[dict[str, Any]] = self._rpc().supervisor.getAllProcessInfo()  # type: ignore[assignment]
        return {
            info["name"]: _STATES.get(info["statename"], info["statename"].lower())
            for info in infos
        }

    def status_argv(self, as_json: bool = False) -> list[str]:
        # supervisorctl has no JSON output; its plain status is the equivalent.
        return [str(BIN / "supervisorctl"), "-c", str(self._conf), "status"]

    def roundtrip_argv(self, count: int) -> list[str]:
        return [
            str(BIN / "python"),
            str(ROUNDTRIP),
            "supervisord",
            str(self._sock),
            str(count),
        ]

    def log_files(self, project: str) -> list[Path]:
        return [self.ws.root / "logs" / f"{project}.out"]

    def request_shutdown(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
