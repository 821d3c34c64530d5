"""The systemd unit, the install script and systemd's notify protocol.

The unit is checked with `systemd-analyze verify`. The install script runs
for real into a temporary root, where it creates the service user with
systemd-sysusers, so those tests need root. The daemon's notifications go to
a datagram socket of the test, as they would go to systemd.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from supervisor.credential_file import SYSTEMD_KEY_NAME

from .helpers import write_script
from .serve_process import ServeProcess, config_text, fresh_environment, serving

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGING = REPOSITORY / "packaging"
INSTALL_SCRIPT = PACKAGING / "install.sh"
UNIT = PACKAGING / "runvisor.service"

NOTIFY_STATES = ("READY=1", "RELOADING=1", "STOPPING=1")

# Under `make test-frozen` these tests install, check and run the executable.
pytestmark = pytest.mark.frozen


def unit_settings(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


@pytest.fixture
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh creates a user with systemd-sysusers: run as root")
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is missing (Debian package systemd)")


@pytest.fixture
def installable(tmp_path: Path) -> Path:
    """The executable to install: the real one under `make test-frozen`,
    else a stand-in script, since these tests check where files go."""
    binary = os.environ.get("RUNVISOR_BINARY")
    if binary:
        return Path(binary).resolve()
    return write_script(tmp_path / "build", "echo runvisor stand-in", "runvisor")


def install(
    binary: Path, root: Path, prefix: str = "/usr/local"
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [
            "bash",
            str(INSTALL_SCRIPT),
            "--binary",
            str(binary),
            "--prefix",
            prefix,
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def verify_unit(unit: Path) -> list[str]:
    """Run `systemd-analyze verify` and return its complaints about the unit.

    It exits 0 even for unknown keys and invalid values, which it only
    prints, so every line that names the unit counts.
    """
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
    )
    output = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in output if unit.name in line]
    if result.returncode != 0:
        complaints.append(f"exit code {result.returncode}: {output}")
    return complaints


# The unit


def test_installed_unit_passes_verify(
    needs_root: None, installable: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    install(installable, root, prefix="/opt/runvisor")
    installed = root / "etc" / "systemd" / "system" / "runvisor.service"
    text = installed.read_text()
    # systemd-analyze checks that ExecStart exists on this machine, so point
    # it at the file that the script installed under the temporary root.
    checked = tmp_path / "check" / "runvisor.service"
    checked.parent.mkdir()
    checked.write_text(
        text.replace(
            "=/opt/runvisor/bin/runvisor ", f"={root}/opt/runvisor/bin/runvisor "
        )
    )

    complaints = verify_unit(checked)

    assert "ExecStart=/opt/runvisor/bin/runvisor serve\n" in text
    assert "ExecReload=/opt/runvisor/bin/runvisor reload\n" in text
    assert complaints == []


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "runvisor.service"
    broken.write_text(
        UNIT.read_text()
        .replace("/usr/local/bin/runvisor", "/bin/true")
        .replace("KillMode=mixed", "KillMode=gently")
    )

    complaints = verify_unit(broken)

    assert any("kill mode" in line for line in complaints), complaints


def test_unit_matches_the_starter_config(
    runvisor_command: list[str], tmp_path: Path
) -> None:
    service = unit_settings(UNIT)["Service"]
    starter = PACKAGING / "runvisor.toml"
    env = fresh_environment(tmp_path)

    checked = subprocess.run(
        [*runvisor_command, "config", "check", str(starter)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = starter.read_text()
    assert f'data_dir = "/var/lib/{service["StateDirectory"]}"' in text
    assert f'socket = "/run/{service["RuntimeDirectory"]}/control.sock"' in text
    assert 'backend = "file"' in text
    config_dir = f"/etc/{service['ConfigurationDirectory']}"
    assert service["Environment"] == f"RUNVISOR_CONFIG={config_dir}/runvisor.toml"
    key_name, key_file = service["LoadCredential"].split(":")
    assert key_name == SYSTEMD_KEY_NAME
    assert key_file == f"{config_dir}/credentials.key"


# The install script


def test_install_is_idempotent(
    needs_root: None, installable: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"

    first = install(installable, root)
    config = root / "etc" / "runvisor" / "runvisor.toml"
    key = root / "etc" / "runvisor" / "credentials.key"
    binary = root / "usr" / "local" / "bin" / "runvisor"
    unit = root / "etc" / "systemd" / "system" / "runvisor.service"
    config.write_text(config.read_text() + "# edited by the administrator\n")
    key_before = key.read_bytes()
    second = install(installable, root)

    assert "created the system user runvisor" in first.stdout
    assert "user runvisor exists" in second.stdout
    assert f"unchanged {binary}" in second.stdout
    assert f"unchanged {unit}" in second.stdout
    assert f"kept the existing {config}" in second.stdout
    assert f"kept the existing {key}" in second.stdout
    assert "installed" not in second.stdout
    assert config.read_text().endswith("# edited by the administrator\n")
    assert key.read_bytes() == key_before
    assert binary.read_bytes() == installable.read_bytes()


def test_install_sets_owners_and_modes(
    needs_root: None, installable: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"

    install(installable, root)

    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc" / "passwd").read_text().splitlines()
    }
    assert users["runvisor"][5] == "/var/lib/runvisor"
    gid = int(users["runvisor"][3])
    expected = {
        "usr/local/bin/runvisor": (0o755, 0, 0),
        "etc/systemd/system/runvisor.service": (0o644, 0, 0),
        "etc/runvisor": (0o750, 0, gid),
        "etc/runvisor/runvisor.toml": (0o640, 0, gid),
        "etc/runvisor/credentials.key": (0o600, 0, 0),
    }
    for name, (mode, uid, group) in expected.items():
        status = (root / name).stat()
        assert (stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid) == (
            mode,
            uid,
            group,
        ), name
    assert len((root / "etc" / "runvisor" / "credentials.key").read_bytes()) > 32


def test_install_rejects_a_missing_binary(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT), "--binary", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "make binary" in result.stderr
    assert not (tmp_path / "root").exists()


# systemd's notify protocol


def test_notify_states_in_order(runvisor_command: list[str], tmp_path: Path) -> None:
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, ""))

    with serving(runvisor_command, config, tmp_path, env) as daemon:
        # READY=1 only once the control socket accepts connections.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "control.sock"))
        ready = daemon.notify.received[0]
        ready_parent = parent_pid(ready.pid)

        daemon.send(signal.SIGHUP)
        assert daemon.notify.wait_for("READY=1", 10) is not None, daemon.log()
        # An invalid config changes nothing, and the daemon is ready again.
        config.write_text("[runvisor\n")
        daemon.send(signal.SIGHUP)
        assert daemon.notify.wait_for("READY=1", 10) is not None, daemon.log()
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit()

    assert code == 0, daemon.log()
    states = [line for line in daemon.notify.states() if line in NOTIFY_STATES]
    assert states == [
        "READY=1",
        "RELOADING=1",
        "READY=1",
        "RELOADING=1",
        "READY=1",
        "STOPPING=1",
    ]
    # From the executable the notifications come from the bootloader's
    # child, which is why the unit sets NotifyAccess=all.
    if os.environ.get("RUNVISOR_BINARY"):
        assert ready.pid != daemon.pid
        assert ready_parent == daemon.pid
    else:
        assert ready.pid == daemon.pid


def test_full_notify_queue_never_blocks(
    runvisor_command: list[str], tmp_path: Path
) -> None:
    # A notify socket that nobody reads after READY=1 fills its queue after
    # about ten messages, five reloads here. Later notifications are dropped
    # and the daemon keeps serving.
    env = fresh_environment(tmp_path)
    config = tmp_path / "runvisor.toml"
    config.write_text(config_text(tmp_path, ""))
    daemon = ServeProcess(
        runvisor_command, config, tmp_path, env, read_notifications=False
    )
    try:
        daemon.wait_ready()
        for _ in range(8):
            reload = subprocess.run(
                [*runvisor_command, "--config", str(config), "reload"],
                capture_output=True,
                text=True,
                env=env,
                timeout=20,
                check=False,
            )
            assert reload.returncode == 0, reload.stdout + reload.stderr
        daemon.send(signal.SIGTERM)
        code = daemon.wait_exit()
    finally:
        daemon.close()

    assert code == 0, daemon.log()
    assert "cannot notify systemd" in daemon.log()


def parent_pid(pid: int) -> int | None:
    """Return the parent of `pid`, or None once it has exited."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat_line.rsplit(")", 1)[1].split()[1])
