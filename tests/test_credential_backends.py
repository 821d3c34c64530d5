"""The credential backends against real stores: the encrypted file, and a
real Secret Service (gnome-keyring-daemon on a private D-Bus bus)."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.credential_backends import SERVICE_NAME, KeyringSecrets, find_keyring
from supervisor.credential_file import (
    KEY_FILE_NAME,
    KEY_VARIABLE,
    STORE_FILE_NAME,
    FileSecrets,
    KeySource,
    find_key_source,
    take_key_environment,
)
from supervisor.credentials import select_backend
from supervisor.errors import BackendUnavailable, CredentialError

from .secret_service import SecretService, running_secret_service
from .test_credentials import HOSTILE_VALUES

NO_KEYRING_ENVIRONMENT = {"PYTHON_KEYRING_BACKEND": ""}


@pytest.fixture
def no_keychain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host without a keychain: no D-Bus session, no display."""
    for name in ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    runtime = tmp_path / "empty-runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "")


@pytest.fixture(scope="module")
def secret_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecretService]:
    with running_secret_service(tmp_path_factory.mktemp("secret-service")) as service:
        yield service


@pytest.fixture
def keychain(
    secret_service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> SecretService:
    """Point this process's D-Bus session at the test Secret Service."""
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", secret_service.address)
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    return secret_service


def store_with_key(data_dir: Path, key: bytes = b"key material") -> FileSecrets:
    return FileSecrets(data_dir, KeySource("a test key", material=key), "test")


# The encrypted file


def test_file_store_round_trip(tmp_path: Path) -> None:
    store = store_with_key(tmp_path)
    assert store.get("missing") is None

    for name, value in HOSTILE_VALUES.items():
        store.set(name, value)
    store.set("EMPTY", "")

    reopened = store_with_key(tmp_path)
    for name, value in HOSTILE_VALUES.items():
        assert reopened.get(name) == value, name
    assert reopened.delete("EMPTY")
    assert not reopened.delete("EMPTY")
    assert reopened.get("EMPTY") is None


def test_file_store_never_holds_plaintext(tmp_path: Path) -> None:
    store = store_with_key(tmp_path)
    store.set("token", "plaintext-marker-4711")

    raw = (tmp_path / STORE_FILE_NAME).read_bytes()
    assert b"plaintext-marker-4711" not in raw
    assert b"token" not in raw
    assert stat.S_IMODE((tmp_path / STORE_FILE_NAME).stat().st_mode) == 0o600


def test_file_store_rejects_wrong_key(tmp_path: Path) -> None:
    store_with_key(tmp_path, b"right key").set("token", "value-1234")

    with pytest.raises(CredentialError, match="Cannot decrypt") as caught:
        store_with_key(tmp_path, b"wrong key").get("token")
    assert "a test key" in str(caught.value)


def test_file_store_detects_tampering(tmp_path: Path) -> None:
    store_with_key(tmp_path).set("token", "value-1234")
    path = tmp_path / STORE_FILE_NAME
    document = json.loads(path.read_text())
    document["kdf"]["r"] = 9
    path.write_text(json.dumps(document))

    with pytest.raises(CredentialError, match="Cannot decrypt"):
        store_with_key(tmp_path).get("token")


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b'{"format": "other"}', b'{"format": "runvisor-credentials"}'],
)
def test_file_store_rejects_unknown_files(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STORE_FILE_NAME).write_bytes(content)
    with pytest.raises(CredentialError, match="not a runvisor credential file"):
        store_with_key(tmp_path).get("token")


def test_file_store_rejects_huge_scrypt_cost(tmp_path: Path) -> None:
    store_with_key(tmp_path).set("token", "value-1234")
    path = tmp_path / STORE_FILE_NAME
    document = json.loads(path.read_text())
    document["kdf"]["n"] = 2**30
    path.write_text(json.dumps(document))

    with pytest.raises(CredentialError, match="not a runvisor credential file"):
        store_with_key(tmp_path).get("token")


def test_file_store_rejects_nul(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="NUL byte"):
        store_with_key(tmp_path).set("token", "a\x00b")
    assert not (tmp_path / STORE_FILE_NAME).exists()


def _add_many(data_dir: str, worker: int) -> None:
    store = store_with_key(Path(data_dir))
    for number in range(10):
        store.set(f"w{worker}-{number}", f"value-{worker}-{number}")


def test_file_store_writers_do_not_lose_entries(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_add_many, args=(str(tmp_path), worker))
        for worker in range(3)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0, 0, 0]

    store = store_with_key(tmp_path)
    for worker in range(3):
        for number in range(10):
            assert store.get(f"w{worker}-{number}") == f"value-{worker}-{number}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# Key sources


def test_key_from_environment_comes_first(tmp_path: Path) -> None:
    systemd = tmp_path / "systemd"
    systemd.mkdir()
    (systemd / "runvisor-key").write_text("from systemd\n")
    environ = {KEY_VARIABLE: "from env", "CREDENTIALS_DIRECTORY": str(systemd)}

    source = find_key_source(tmp_path / "data", environ)

    assert source.material == b"from env"
    assert source.description == "the environment variable RUNVISOR_CREDENTIALS_KEY"


def test_key_from_systemd_credential(tmp_path: Path) -> None:
    systemd = tmp_path / "systemd"
    systemd.mkdir()
    (systemd / "runvisor-key").write_text("from systemd\n")
    environ = {"CREDENTIALS_DIRECTORY": str(systemd)}
    data_dir = tmp_path / "data"

    source = find_key_source(data_dir, environ)
    FileSecrets(data_dir, source, "test").set("token", "value-1234")

    assert source.description == f"the systemd credential {systemd / 'runvisor-key'}"
    assert not (data_dir / KEY_FILE_NAME).exists()
    same_key = KeySource("same key", material=b"from systemd")
    assert FileSecrets(data_dir, same_key, "test").get("token") == "value-1234"


def test_generated_key_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    source = find_key_source(data_dir, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert source.path == data_dir / KEY_FILE_NAME
    assert source.generated

    store = FileSecrets(data_dir, source, "test")
    assert store.get("token") is None
    assert not (data_dir / KEY_FILE_NAME).exists()
    store.set("token", "value-1234")

    key_file = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert len(key_file.read_bytes().strip()) == 43
    assert FileSecrets(data_dir, source, "again").get("token") == "value-1234"


def test_lost_key_file_is_reported(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    source = find_key_source(data_dir, {})
    FileSecrets(data_dir, source, "test").set("token", "value-1234")
    (data_dir / KEY_FILE_NAME).unlink()

    with pytest.raises(CredentialError, match="does not exist") as caught:
        FileSecrets(data_dir, source, "test").get("token")
    assert KEY_VARIABLE in str(caught.value)


def test_readable_key_file_is_rejected(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    source = find_key_source(data_dir, {})
    FileSecrets(data_dir, source, "test").set("token", "value-1234")
    (data_dir / KEY_FILE_NAME).chmod(0o644)

    with pytest.raises(CredentialError, match="chmod 600"):
        FileSecrets(data_dir, source, "test").get("token")


def test_take_key_environment_removes_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, "the key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/runvisor.service")

    captured = take_key_environment()

    assert captured[KEY_VARIABLE] == "the key"
    assert captured["CREDENTIALS_DIRECTORY"] == "/run/credentials/runvisor.service"
    assert KEY_VARIABLE not in os.environ


# Choosing a backend without a keychain


def test_auto_without_keychain_uses_file(tmp_path: Path, no_keychain: None) -> None:
    backend = select_backend("auto", tmp_path, NO_KEYRING_ENVIRONMENT)
    assert backend.info.kind == "file"
    assert backend.info.reason == (
        'backend = "auto" and no usable keyring backend was found'
    )


def test_keyring_without_keychain_fails_clearly(
    tmp_path: Path, no_keychain: None
) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        select_backend("keyring", tmp_path, NO_KEYRING_ENVIRONMENT)
    message = str(caught.value)
    assert message.startswith("No usable keyring backend was found.")
    assert "Secret Service" in message
    assert 'backend = "file"' in message
    assert "Traceback" not in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("keyring.backends.null.Keyring", "which stores nothing"),
        ("keyring.backends.fail.Keyring", "which stores nothing"),
        ("keyring.backends.chainer.ChainerBackend", "which stores nothing"),
        ("no.such.Backend", "which cannot be loaded"),
    ],
)
def test_named_keyring_backend_must_store(
    tmp_path: Path, no_keychain: None, name: str, expected: str
) -> None:
    environ = {"PYTHON_KEYRING_BACKEND": name}
    with pytest.raises(BackendUnavailable, match=expected):
        select_backend("keyring", tmp_path, environ)
    assert select_backend("auto", tmp_path, environ).info.kind == "file"


def test_file_setting_ignores_keychain(tmp_path: Path, keychain: SecretService) -> None:
    backend = select_backend("file", tmp_path, {})
    assert backend.info.kind == "file"


# A real Secret Service


def test_auto_picks_secret_service(tmp_path: Path, keychain: SecretService) -> None:
    backend = select_backend("auto", tmp_path, {})
    assert backend.info.kind == "keyring"
    assert backend.info.name == "keyring.backends.SecretService.Keyring"
    assert "keyring recommends" in backend.info.reason


def test_named_backend_is_honoured(tmp_path: Path, keychain: SecretService) -> None:
    environ = {"PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring"}
    backend = select_backend("keyring", tmp_path, environ)
    assert backend.info.name == "keyring.backends.SecretService.Keyring"
    assert backend.info.reason.endswith("PYTHON_KEYRING_BACKEND names it")


def test_secret_service_round_trip(keychain: SecretService) -> None:
    keychain_backend, _ = find_keyring({})
    assert keychain_backend is not None
    secrets = KeyringSecrets(keychain_backend, "test")

    for name, value in HOSTILE_VALUES.items():
        if value:
            secrets.set(f"round-trip-{name}", value)
    for name, value in HOSTILE_VALUES.items():
        if value:
            assert secrets.get(f"round-trip-{name}") == value, name

    assert (
        keychain_backend.get_password(SERVICE_NAME, "round-trip-HASH")
        == (HOSTILE_VALUES["HASH"])
    )
    assert secrets.delete("round-trip-HASH")
    assert not secrets.delete("round-trip-HASH")
    assert secrets.get("round-trip-HASH") is None
    assert secrets.get("never-stored") is None


def test_secret_service_rejects_nul(keychain: SecretService) -> None:
    keychain_backend, _ = find_keyring({})
    assert keychain_backend is not None
    with pytest.raises(CredentialError, match="NUL byte"):
        KeyringSecrets(keychain_backend, "test").set("nul", "a\x00b")
