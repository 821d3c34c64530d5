"""Secrets through a whole lifecycle of a real `runvisor serve`.

Secrets go everywhere they can: credentials from the encrypted file store
(one of them on two lines), `{ value = ... }` literals, a literal changed by
a reload, output that prints them on stdout and stderr, a health probe that
prints them, a run that times out while printing them, and a lookup of a
credential that does not exist. Then everything runvisor wrote or sent is
searched for the values. That is the data dir (database, WAL, logs,
credential files), the daemon's own log, the live event stream, what the
CLI printed (status, history, logs, config show, exports) and the command
lines of every process of every run. The environments of the runs are
searched for the store's key. No value may appear.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .fault_tools import (
    daemon_process,
    query,
    read_environ,
    run_processes,
    wait_until,
)
from .helpers import write_script

STORED = "stored-secret-Qx7vR2"
MULTILINE = "first-line-Kp3sW9\nsecond-line-Zt6mB1"
LITERAL = "literal-secret-Hc5nJ8"
CHANGED_LITERAL = "changed-literal-Ye4dL0"
STORE_KEY = "store-key-Fa9gU3-" + "k" * 32
SECRETS = [STORED, *MULTILINE.split("\n"), LITERAL, CHANGED_LITERAL, STORE_KEY]


def config_text(root: Path, literal: str) -> str:
    return f"""
[runvisor]
data_dir = "{root / "data"}"
socket = "{root / "control" / "control.sock"}"

[credentials]
backend = "file"

[projects.leaky]
trigger = "manual"
path = "{root / "leaky"}"
stop_timeout = "1s"
env = {{ STORED = {{ credential = "stored" }}, MULTI = {{ credential = "multi" }}, \
LITERAL = {{ value = "{literal}" }}, PLAIN = "plain-visible" }}

[projects.slow]
trigger = "manual"
path = "{root / "leaky"}"
command = "./slow.sh"
timeout = "1s"
stop_timeout = "1s"
env = {{ STORED = {{ credential = "stored" }} }}

# No secrets of its own, but it shares the folder, and so `.env.local`, of
# `leaky`, and prints that file once `leaky` has written its secrets there.
[projects.neighbour]
trigger = "manual"
path = "{root / "leaky"}"
command = "./neighbour.sh"

[projects.probed]
trigger = "always_running"
path = "{root / "probed"}"
stop_timeout = "1s"
backoff = {{ initial = "0.2s" }}
env = {{ STORED = {{ credential = "stored" }}, LITERAL = {{ value = "{literal}" }} }}

[projects.probed.health]
exec = "./check.sh"
interval = "0.3s"
timeout = "1s"
failure_threshold = 1

[projects.broken]
trigger = "manual"
path = "{root / "leaky"}"
env = {{ STORED = {{ credential = "stored" }}, GONE = {{ credential = "gone" }} }}
"""


def write_projects(root: Path) -> None:
    write_script(
        root / "leaky",
        """
        echo "token=$STORED in a line"
        echo "$STORED" >&2
        printf '%s\\n' "$MULTI"
        echo "literal=$LITERAL; plain=$PLAIN"
        echo "$STORED$LITERAL$STORED"
        # Lines over 64 KiB are cut into pieces. Here the literal would
        # straddle the cut twice: in an ended line, and in a line that is
        # cut before its end has been written.
        printf '%65530s%s tail\n' '' "$LITERAL"
        printf '%65530s%s%100s' '' "$LITERAL" ''
        sleep 0.2
        printf 'end of the long line\n'
        exec -a fault-leaky sleep 1000
        """,
    )
    write_script(
        root / "leaky",
        """
        while :; do echo "still $STORED"; sleep 0.1; done
        """,
        name="slow.sh",
    )
    write_script(
        root / "leaky",
        """
        until grep -q LITERAL .env.local 2>/dev/null; do sleep 0.05; done
        cat .env.local
        """,
        name="neighbour.sh",
    )
    write_script(root / "probed", "exec -a fault-probed sleep 1000")
    write_script(
        root / "probed",
        'echo "probe sees $STORED and $LITERAL"\necho "$STORED" >&2\nexit 1',
        name="check.sh",
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_secrets_appear_nowhere(tmp_path: Path) -> None:
    write_projects(tmp_path)
    (tmp_path / "control").mkdir(mode=0o700)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, LITERAL))
    db = tmp_path / "data" / "runvisor.db"
    env = {
        **os.environ,
        "RUNVISOR_CREDENTIALS_KEY": STORE_KEY,
        "PYTHON_KEYRING_BACKEND": "",
    }
    printed: dict[str, bytes] = {}

    def cli(*args: str, stdin: bytes = b"") -> bytes:
        result = subprocess.run(
            [sys.executable, "-m", "supervisor", "--config", str(config), *args],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=60,
        )
        printed[" ".join(args)] = result.stdout + result.stderr
        return result.stdout

    cli("creds", "add", "stored", stdin=STORED.encode())
    cli("creds", "add", "multi", stdin=MULTILINE.encode())
    command_lines: dict[int, bytes] = {}
    environments: dict[int, dict[str, str]] = {}

    def sample_processes(tag: str) -> None:
        for process in run_processes(tag):
            try:
                command_lines[process.pid] = Path(
                    f"/proc/{process.pid}/cmdline"
                ).read_bytes()
            except OSError:
                continue
            environments[process.pid] = read_environ(process.pid)

    with daemon_process(tmp_path, config, extra_env=env) as daemon:
        daemon.start()
        runvisor = [sys.executable, "-m", "supervisor", "--config", str(config)]
        events = subprocess.Popen(
            [*runvisor, "events", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            # Started first, so its run masks secrets that appear after it
            # started.
            cli("trigger", "neighbour")
            cli("trigger", "leaky")
            wait_until(
                lambda: (
                    query(db, "SELECT status FROM runs WHERE project = 'neighbour'")
                    == [("succeeded",)]
                )
            )
            wait_until(
                lambda: any(p.project == "leaky" for p in run_processes(daemon.tag))
            )
            sample_processes(daemon.tag)
            cli("trigger", "slow")
            cli("trigger", "broken")
            wait_until(
                lambda: (
                    query(
                        db,
                        "SELECT count(*) FROM runs WHERE project = 'probed'"
                        " AND reason LIKE 'restarted for health%'",
                    )[0][0]
                    >= 1
                ),
                timeout=30,
            )
            wait_until(
                lambda: (
                    query(
                        db,
                        "SELECT status FROM runs WHERE project IN ('slow', 'broken')",
                    )
                    in ([("timed_out",), ("failed",)], [("failed",), ("timed_out",)])
                ),
                timeout=30,
            )
            sample_processes(daemon.tag)
            cli("stop", "leaky")

            # A reload changes a literal; the next runs use the new one.
            config.write_text(config_text(tmp_path, CHANGED_LITERAL))
            cli("reload")
            cli("trigger", "leaky")
            wait_until(
                lambda: (
                    query(
                        db,
                        "SELECT count(*) FROM runs WHERE project = 'leaky'"
                        " AND status = 'running'",
                    )
                    == [(1,)]
                )
            )
            wait_until(
                lambda: any(p.project == "leaky" for p in run_processes(daemon.tag))
            )
            sample_processes(daemon.tag)

            for args in [
                ("status",),
                ("status", "--json"),
                ("history", "--json"),
                ("logs", "leaky"),
                ("logs", "probed", "--json"),
                ("logs", "slow"),
                ("config", "show"),
                ("config", "show", "leaky"),
                ("config", "check"),
                ("export", "systemd"),
                ("export", "kubernetes"),
                ("export", "nomad"),
                ("creds", "list"),
            ]:
                cli(*args)
            command_lines[daemon.pid] = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
        finally:
            events.send_signal(signal.SIGINT)
            event_output, _ = events.communicate(timeout=30)
        assert daemon.stop() == 0
        printed["daemon log"] = daemon.log_text().encode()
    printed["events"] = event_output

    # Nothing vacuous: the runs did print the secrets, masked.
    leaky_logs = b"".join(
        path.read_bytes() for path in (tmp_path / "data" / "logs" / "leaky").iterdir()
    )
    assert b"token=*** in a line" in leaky_logs
    neighbour_logs = b"".join(
        path.read_bytes()
        for path in (tmp_path / "data" / "logs" / "neighbour").iterdir()
    )
    assert b"export LITERAL='***'" in neighbour_logs
    assert b"literal=***; plain=plain-visible" in leaky_logs
    # A cut inside a secret would leave its halves unmasked in two records.
    # Each cut came before the literal, which starts the next piece whole.
    assert b" out *** tail\n" in leaky_logs
    assert b" out ***" + b" " * 100 + b"end of the long line\n" in leaky_logs
    for secret in SECRETS:
        for half in (secret[: len(secret) // 2], secret[len(secret) // 2 :]):
            assert half.encode() not in leaky_logs, f"part of {secret!r} in a log"
    assert b'"project":"leaky"' in event_output
    assert b"***" in event_output
    assert b"restarted for health" in printed["history --json"]
    assert b"GONE" in printed["history --json"]
    assert len(command_lines) >= 4

    written = {
        str(path): path.read_bytes()
        for path in (tmp_path / "data").rglob("*")
        if path.is_file()
    }
    assert any(name.endswith("runvisor.db") for name in written)
    sources = {**written, **printed}
    sources.update({f"cmdline of {pid}": line for pid, line in command_lines.items()})
    for secret in SECRETS:
        for source, content in sources.items():
            assert secret.encode() not in content, f"{secret!r} found in {source}"
    # The store's key stays in the daemon: no run inherits it.
    for pid, environment in environments.items():
        assert "RUNVISOR_CREDENTIALS_KEY" not in environment, pid
        assert STORE_KEY not in environment.values(), pid
    assert not (tmp_path / "leaky" / ".env.local").exists()
    assert not (tmp_path / "probed" / ".env.local").exists()
