"""The `runvisor creds` commands, run as the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from supervisor.credential_file import KEY_FILE_NAME, STORE_FILE_NAME
from supervisor.database import Database

from .credential_helpers import HOSTILE_SECRET, Cli, base_environment, write_config
from .secret_service import SecretService, running_secret_service


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    projects = f"""
    [projects.report]
    path = "{tmp_path}"
    command = "true"
    trigger = "manual"
    env = {{ TOKEN = {{ credential = "shared" }}, DB = {{ credential = "db" }} }}

    [projects.sync]
    path = "{tmp_path}"
    command = "true"
    trigger = "manual"
    env = {{ TOKEN = {{ credential = "shared" }} }}
    """
    return Cli(write_config(tmp_path, "auto", projects), base_environment(tmp_path))


def test_add_then_get_returns_exact_bytes(cli: Cli) -> None:
    added = cli.run("creds", "add", "db", stdin=HOSTILE_SECRET.encode() + b"\n")
    assert added.returncode == 0, added.stderr
    assert b"encrypted file store" in added.stdout

    got = cli.run("creds", "get", "db", check=True)
    assert got.stdout == HOSTILE_SECRET.encode()
    assert not Path("/tmp/f14-pwned").exists()
    assert not Path("/tmp/f14-pwned2").exists()


def test_get_ends_the_line_on_a_terminal(cli: Cli) -> None:
    cli.run("creds", "add", "db", stdin=b"plain-value\n", check=True)
    leader, follower = os.openpty()
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "supervisor", "--config", str(cli.config)),
                *("creds", "get", "db"),
            ],
            stdout=follower,
            stderr=subprocess.PIPE,
            env=cli.env,
            timeout=60,
        )
        output = os.read(leader, 1024)
    finally:
        os.close(leader)
        os.close(follower)
    assert result.returncode == 0, result.stderr
    # The terminal turns "\n" into "\r\n".
    assert output == b"plain-value\r\n"


@pytest.mark.parametrize(
    ("stdin", "stored"),
    [
        (b"value\n", b"value"),
        (b"value\n\n", b"value\n"),
        (b"value", b"value"),
        (b"two\nlines\n", b"two\nlines"),
        (b" spaced \n", b" spaced "),
        (b"crlf\r\n", b"crlf\r"),
    ],
)
def test_stdin_loses_one_trailing_newline(
    cli: Cli, stdin: bytes, stored: bytes
) -> None:
    cli.run("creds", "add", "value", stdin=stdin, check=True)
    assert cli.run("creds", "get", "value", check=True).stdout == stored


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", "The secret is empty"),
        (b"\n", "The secret is empty"),
        (b"a\x00b", "NUL byte"),
        (b"\xff\xfe", "not valid UTF-8"),
    ],
)
def test_add_rejects_bad_secrets(cli: Cli, stdin: bytes, message: str) -> None:
    result = cli.run("creds", "add", "bad", stdin=stdin)
    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr
    listed = json.loads(cli.run("creds", "list", "--json", check=True).stdout)
    assert listed == []


def test_add_warns_about_short_secret(cli: Cli) -> None:
    result = cli.run("creds", "add", "pin", stdin=b"123\n", check=True)
    assert "not masked" in result.stderr.decode()


@pytest.mark.parametrize("nickname", ["bad nick", "_lead", ".dot", "x" * 65, "a/b"])
def test_add_rejects_invalid_nickname(cli: Cli, nickname: str) -> None:
    result = cli.run("creds", "add", nickname, stdin=b"value-1234")
    assert result.returncode == 1
    assert "Invalid nickname" in result.stderr.decode()


def test_add_rejects_existing_nickname(cli: Cli) -> None:
    cli.run("creds", "add", "db", stdin=b"first-value", check=True)
    result = cli.run("creds", "add", "db", stdin=b"second-value")
    assert result.returncode == 1
    assert "creds update db" in result.stderr.decode()
    assert cli.run("creds", "get", "db").stdout == b"first-value"


def test_list_shows_projects_and_no_secret(cli: Cli) -> None:
    cli.run(
        "creds", "add", "shared", "--description", "API token",
        stdin=b"list-secret-value", check=True,
    )  # fmt: skip
    cli.run("creds", "add", "unused", stdin=b"other-secret-value", check=True)

    listed = cli.run("creds", "list", "--json", check=True)
    text = cli.run("creds", "list", check=True)

    rows = json.loads(listed.stdout)
    assert [row["nickname"] for row in rows] == ["shared", "unused"]
    assert rows[0]["description"] == "API token"
    assert rows[0]["projects"] == ["report", "sync"]
    assert rows[1]["projects"] == []
    assert rows[0]["created_at"] == rows[0]["updated_at"]
    for output in (listed, text):
        assert b"list-secret-value" not in output.stdout + output.stderr
    assert b"report, sync" in text.stdout
    assert b"API token" in text.stdout
    # "db" is mapped by report but was never added.
    assert b"credential 'db' is not stored" in listed.stderr


def test_update_replaces_secret_and_description(cli: Cli) -> None:
    cli.run("creds", "add", "db", "--description", "old", stdin=b"old-value")
    before = json.loads(cli.run("creds", "list", "--json").stdout)[0]

    cli.run("creds", "update", "db", stdin=b"new-value\n", check=True)
    cli.run("creds", "update", "db", "--description", "new", "--keep-secret",
            check=True)  # fmt: skip

    after = json.loads(cli.run("creds", "list", "--json").stdout)[0]
    assert cli.run("creds", "get", "db").stdout == b"new-value"
    assert after["description"] == "new"
    assert after["created_at"] == before["created_at"]
    assert after["updated_at"] > before["updated_at"]


def test_update_needs_existing_credential(cli: Cli) -> None:
    result = cli.run("creds", "update", "ghost", stdin=b"value-1234")
    assert result.returncode == 1
    assert "creds add ghost" in result.stderr.decode()
    assert cli.run("creds", "update", "ghost", "--keep-secret").returncode == 2


def test_delete_refuses_mapped_credential(cli: Cli) -> None:
    cli.run("creds", "add", "shared", stdin=b"mapped-value", check=True)

    refused = cli.run("creds", "delete", "shared")
    assert refused.returncode == 1
    assert "projects 'report' and 'sync'" in refused.stderr.decode()
    assert cli.run("creds", "get", "shared").stdout == b"mapped-value"

    cli.run("creds", "delete", "shared", "--force", check=True)
    gone = cli.run("creds", "get", "shared")
    assert gone.returncode == 1
    assert json.loads(cli.run("creds", "list", "--json").stdout) == []


def test_delete_unknown_credential_fails(cli: Cli) -> None:
    result = cli.run("creds", "delete", "ghost")
    assert result.returncode == 1
    assert "does not exist" in result.stderr.decode()


def test_get_unknown_credential_fails(cli: Cli) -> None:
    result = cli.run("creds", "get", "ghost")
    assert result.returncode == 1
    assert result.stdout == b""
    assert "creds add ghost" in result.stderr.decode()


def test_backend_names_file_and_key_source(cli: Cli) -> None:
    before = json.loads(cli.run("creds", "backend", "--json", check=True).stdout)
    text = cli.run("creds", "backend", check=True).stdout.decode()

    key_file = cli.data_dir / KEY_FILE_NAME
    assert before == {
        "kind": "file",
        "name": "encrypted file",
        "service": None,
        "location": str(cli.data_dir / STORE_FILE_NAME),
        "key_source": f"the key file {key_file}",
        "reason": 'backend = "auto" and no usable keyring backend was found',
    }
    assert "generated when the first secret is stored" in text
    assert not key_file.exists()


def test_key_from_environment_is_used(cli: Cli) -> None:
    cli.env["RUNVISOR_CREDENTIALS_KEY"] = "a key from the environment"
    cli.run("creds", "add", "db", stdin=b"value-1234", check=True)
    shown = json.loads(cli.run("creds", "backend", "--json").stdout)

    assert shown["key_source"] == "the environment variable RUNVISOR_CREDENTIALS_KEY"
    assert not (cli.data_dir / KEY_FILE_NAME).exists()
    del cli.env["RUNVISOR_CREDENTIALS_KEY"]
    result = cli.run("creds", "get", "db")
    assert result.returncode == 1
    assert "does not exist" in result.stderr.decode()


def test_keyring_setting_without_keychain_fails_clearly(tmp_path: Path) -> None:
    cli = Cli(write_config(tmp_path, "keyring"), base_environment(tmp_path))

    added = cli.run("creds", "add", "API_TOKEN", stdin=b"token-value-1234")
    shown = cli.run("creds", "backend")

    for result in (added, shown):
        stderr = result.stderr.decode()
        assert result.returncode == 1
        assert stderr.startswith("runvisor: No usable keyring backend was found.")
        assert "Secret Service" in stderr
        assert 'backend = "file"' in stderr
        assert "Traceback" not in stderr
        assert len(stderr.splitlines()) == 1
    database = Database.open(cli.data_dir / "runvisor.db")
    assert database.credentials() == []
    database.close()


def test_secret_typed_on_terminal_is_hidden(cli: Cli) -> None:
    command = [
        "-m", "supervisor", "--config", str(cli.config), "creds", "add", "typed",
    ]  # fmt: skip
    child = pexpect.spawn(sys.executable, command, env=cli.env, timeout=30)
    try:
        child.expect("input is hidden")
        child.sendline("typed-secret-value")
        child.expect("Repeat the secret")
        child.sendline("typed-secret-value")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    transcript = (child.before or b"").decode()
    assert child.exitstatus == 0, transcript
    assert "typed-secret-value" not in transcript
    assert cli.run("creds", "get", "typed").stdout == b"typed-secret-value"


def test_terminal_entries_must_match(cli: Cli) -> None:
    command = [
        "-m", "supervisor", "--config", str(cli.config), "creds", "add", "typed",
    ]  # fmt: skip
    child = pexpect.spawn(sys.executable, command, env=cli.env, timeout=30)
    try:
        child.expect("input is hidden")
        child.sendline("first-entry")
        child.expect("Repeat the secret")
        child.sendline("second-entry")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1
    assert b"The two entries differ" in (child.before or b"")


def test_help_says_get_prints_a_secret(cli: Cli) -> None:
    result = cli.run("creds", "--help", check=True)
    assert b"this prints a secret" in result.stdout


# Against a real Secret Service


@pytest.fixture(scope="module")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretService]:
    with running_secret_service(tmp_path_factory.mktemp("secret-service")) as service:
        yield service


def test_commands_use_secret_service(
    tmp_path: Path, secret_service: SecretService
) -> None:
    env = base_environment(tmp_path)
    env["DBUS_SESSION_BUS_ADDRESS"] = secret_service.address
    cli = Cli(write_config(tmp_path, "keyring"), env)

    shown = json.loads(cli.run("creds", "backend", "--json", check=True).stdout)
    cli.run("creds", "add", "kr-db", stdin=HOSTILE_SECRET.encode(), check=True)
    got = cli.run("creds", "get", "kr-db", check=True)
    cli.run("creds", "delete", "kr-db", check=True)
    gone = cli.run("creds", "get", "kr-db")

    assert shown["kind"] == "keyring"
    assert shown["name"] == "keyring.backends.SecretService.Keyring"
    assert shown["service"] == "runvisor"
    assert got.stdout == HOSTILE_SECRET.encode()
    assert gone.returncode == 1
    assert not (cli.data_dir / STORE_FILE_NAME).exists()


def test_config_check_warns_about_unknown_nicknames(cli: Cli) -> None:
    before = cli.run("config", "check")
    assert not (cli.data_dir / "runvisor.db").exists()
    cli.run("creds", "add", "shared", stdin=b"shared-value", check=True)
    after = cli.run("config", "check")

    assert before.returncode == 0
    assert "credential 'shared' is not stored" in before.stderr.decode()
    assert "credential 'db' is not stored" in before.stderr.decode()
    assert after.returncode == 0
    assert "credential 'shared'" not in after.stderr.decode()
    assert "credential 'db' is not stored" in after.stderr.decode()
