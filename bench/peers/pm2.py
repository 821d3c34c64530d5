"""pm2 from the bench npm prefix, with PM2_HOME inside the run's temporary folder.

pm2 always runs its daemon (the "God Daemon") detached from the CLI that
started it, so the adapter finds it through `$PM2_HOME/pm2.pid` and ends it
with `pm2 kill`, or by that pid.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import procs
from bench.peers.base import (
    BENCH_DIR,
    PEERS_DIR,
    Peer,
    PeerMissing,
    Project,
    Settings,
    Workspace,
)

MODULE = PEERS_DIR / "npm" / "lib" / "node_modules" / "pm2"
CLI = PEERS_DIR / "npm" / "bin" / "pm2"
ROUNDTRIP = BENCH_DIR / "peers" / "pm2_roundtrip.js"


class Pm2(Peer):
    name = "pm2"
    counted = "the pm2 God daemon (the pm2 CLI exits after each command)"
    features = frozenset({"schedule"})

    @classmethod
    def version(cls) -> str:
        # `pm2 --version` would start a daemon under ~/.pm2, so read the package.
        try:
            package = json.loads((MODULE / "package.json").read_text())
        except FileNotFoundError:
            raise PeerMissing(
                f"pm2 is not installed in {MODULE}; run bench/setup.sh."
            ) from None
        return f"pm2 {package['version']}"

    def __init__(self, workspace: Workspace) -> None:
        super().__init__(workspace)
        self.home = self.ws.root / "pm2home"
        self.env["PM2_HOME"] = str(self.home)
        self.env["PM2_DISABLE_VERSION_CHECK"] = "true"
        self._ecosystem = self.ws.root / "ecosystem.json"

    def write_config(self, projects: list[Project], settings: Settings) -> None:
        self.settings = settings
        self.projects = projects
        apps = []
        for p in projects:
            app = {
                "name": p.name,
                "script": str(p.script),
                "cwd": str(p.folder),
                "interpreter": "none",
                "exec_mode": "fork",
                "autostart": p.trigger != "manual",
                "autorestart": p.trigger == "always_running" and p.restart,
                # pm2's closest setting to start seconds: an exit before
                # min_uptime counts as an unstable restart.
                "min_uptime": int(settings.start_seconds * 1000),
                "max_restarts": 15,
                "restart_delay": 0,
                "kill_timeout": int(settings.stop_timeout * 1000),
                "treekill": True,
                "watch": False,
                "vizion": False,
                "merge_logs": True,
                "out_file": str(self.ws.root / "logs" / f"{p.name}.out"),
                "error_file": str(self.ws.root / "logs" / f"{p.name}.err"),
            }
            if p.trigger == "schedule":
                # With autorestart off, cron_restart starts the app at each
                # fire time; pm2 also starts it once when the app is added.
                app["cron_restart"] = p.cron
            apps.append(app)
        self._ecosystem.write_text(json.dumps({"apps": apps}, indent=1))

    def _pm2(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> procs.CommandResult:
        return self.run_cli([str(CLI), *args], timeout=timeout, check=check)

    def start_daemon(self) -> None:
        if any(p.trigger != "manual" for p in self.projects):
            self._pm2("start", str(self._ecosystem))
        else:
            self._pm2("ping")
            if self.projects:
                self._pm2("start", str(self._ecosystem))
        procs.wait_for(self.daemon_running, 30, "the pm2 daemon to write its pid file")

    def daemon_pids(self) -> list[int]:
        try:
            return [int((self.home / "pm2.pid").read_text().strip())]
        except (FileNotFoundError, ValueError):
            return []

    def stop_projects(self, names: list[str]) -> None:
        if set(names) == {p.name for p in self.projects}:
            self._pm2("stop", "all")
        else:
            self._pm2("stop", *names)

    def start_projects(self, names: list[str]) -> None:
        if set(names) == {p.name for p in self.projects}:
            self._pm2("start", str(self._ecosystem))
        else:
            self._pm2("start", str(self._ecosystem), "--only", ",".join(names))

    def status(self) -> dict[str, str]:
        out = self._pm2("jlist").stdout
        apps = json.loads(out[out.index("[") :])
        return {
            app["name"]: "running"
            if app["pm2_env"]["status"] == "online"
            else app["pm2_env"]["status"]
            for app in apps
        }

    def status_argv(self, as_json: bool = False) -> list[str]:
        return [str(CLI), "jlist" if as_json else "status"]

    def roundtrip_argv(self, count: int) -> list[str]:
        return ["node", str(ROUNDTRIP), str(MODULE), str(count)]

    def log_files(self, project: str) -> list[Path]:
        return [self.ws.root / "logs" / f"{project}.out"]

    def request_shutdown(self) -> None:
        self._pm2("kill", timeout=60, check=False)
