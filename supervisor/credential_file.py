"""The encrypted file store of credential secrets.

One file in the data dir, `credentials.enc`, contains every secret, encrypted
with AES-256-GCM. The key is derived with scrypt from key material that
comes from, in this order:

1. `$RUNVISOR_CREDENTIALS_KEY`;
2. `$CREDENTIALS_DIRECTORY/runvisor-key`, which systemd provides with
   `LoadCredential=`;
3. `credentials.key` in the data dir, generated (mode 0600) the first time a
   secret is stored.

The file is JSON: the format, the scrypt parameters and salt, a nonce and the
ciphertext of `{"secrets": {nickname: value}}`. The format fields are the
associated data of the encryption, so changing any of them fails
decryption. Every write picks a new salt and nonce and replaces the file
atomically, mode 0600, under an exclusive lock on `credentials.lock`, so the
CLI and a running daemon can share it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.credential_backends import (
    KEYRING_VARIABLE,
    BackendInfo,
    capitalize,
    check_secret,
)
from supervisor.errors import CredentialError

KEY_VARIABLE = "RUNVISOR_CREDENTIALS_KEY"
SYSTEMD_DIRECTORY_VARIABLE = "CREDENTIALS_DIRECTORY"
SYSTEMD_KEY_NAME = "runvisor-key"
STORE_FILE_NAME = "credentials.enc"
KEY_FILE_NAME = "credentials.key"
LOCK_FILE_NAME = "credentials.lock"

_FORMAT = "runvisor-credentials"
_FORMAT_VERSION = 1
_NONCE_BYTES = 12
_SALT_BYTES = 16
# scrypt cost: about 16 MiB of memory and tens of milliseconds per key
# derivation, so a guessed passphrase is expensive to test. Derived keys are
# cached per salt.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1

# The source of `secrets.token_bytes`, used directly: the secrets module
# imports hmac, which loads OpenSSL's libcrypto (about 4 MiB of resident
# memory) into a daemon that writes `.env.local` through this module before
# every run but may never encrypt anything.
_random_bytes = os.urandom


@dataclass(frozen=True)
class KeySource:
    """The origin of the file store's key material."""

    description: str
    material: bytes | None = None
    """The key material itself, when it comes from the environment."""
    path: Path | None = None
    """The file that contains the key material otherwise."""
    generated: bool = False
    """Whether runvisor creates `path` when it is missing."""


def find_key_source(data_dir: Path, environ: Mapping[str, str]) -> KeySource:
    """Return the first key source that applies, in the documented order."""
    material = environ.get(KEY_VARIABLE, "")
    if material:
        return KeySource(
            f"the environment variable {KEY_VARIABLE}", material=material.encode()
        )
    directory = environ.get(SYSTEMD_DIRECTORY_VARIABLE, "")
    if directory and (Path(directory) / SYSTEMD_KEY_NAME).is_file():
        path = Path(directory) / SYSTEMD_KEY_NAME
        return KeySource(f"the systemd credential {path}", path=path)
    path = data_dir / KEY_FILE_NAME
    return KeySource(f"the key file {path}", path=path, generated=True)


def take_key_environment() -> dict[str, str]:
    """Return the variables that choose and unlock the credential backend,
    and remove RUNVISOR_CREDENTIALS_KEY from this process's environment.

    The daemon calls this once at start, so that its runs, which inherit
    its environment, never see the file store's key.
    """
    names = (KEY_VARIABLE, KEYRING_VARIABLE, SYSTEMD_DIRECTORY_VARIABLE)
    captured = {name: os.environ[name] for name in names if name in os.environ}
    os.environ.pop(KEY_VARIABLE, None)
    return captured


@dataclass
class FileSecrets:
    """Secrets in one AES-256-GCM encrypted file in the data dir.

    The file is JSON: the format, the scrypt parameters and salt, a nonce and
    the ciphertext of `{"secrets": {nickname: value}}`. The format fields are
    the associated data, so changing any of them fails decryption. Every
    write picks a new salt and nonce and replaces the file atomically, mode
    0600, under an exclusive lock on `credentials.lock`.
    """

    data_dir: Path
    key_source: KeySource
    reason: str
    info: BackendInfo = field(init=False)
    _keys: dict[tuple[bytes, bytes, int, int, int], bytes] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.info = BackendInfo(
            kind="file",
            name="encrypted file",
            reason=self.reason,
            location=str(self.path),
            key_source=self.key_source.description,
        )

    @property
    def path(self) -> Path:
        return self.data_dir / STORE_FILE_NAME

    def get(self, nickname: str) -> str | None:
        return self._read().get(nickname)

    def set(self, nickname: str, value: str) -> None:
        check_secret(value, f"The secret of {nickname!r}")
        with self._locked():
            entries = self._read()
            entries[nickname] = value
            self._write(entries)

    def delete(self, nickname: str) -> bool:
        with self._locked():
            entries = self._read()
            if nickname not in entries:
                return False
            del entries[nickname]
            self._write(entries)
        return True

    def _read(self) -> dict[str, str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise CredentialError(
                f"Cannot read the credential store {self.path}: {error.strerror}."
            ) from None
        header, nonce, ciphertext = self._parse(data)
        key = self._key(header, create=False)
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            plaintext = AESGCM(key).decrypt(nonce, ciphertext, _associated_data(header))
        except InvalidTag:
            raise CredentialError(
                f"Cannot decrypt the credential store {self.path} with the key "
                f"from {self.key_source.description}: the key differs from the "
                "one the store was written with, or the file was changed. Use "
                "the original key, or move the store away and add the "
                "credentials again."
            ) from None
        entries = json.loads(plaintext)["secrets"]
        return {str(name): str(value) for name, value in entries.items()}

    def _write(self, entries: dict[str, str]) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        header: dict[str, Any] = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "kdf": {
                "name": "scrypt",
                "n": _SCRYPT_N,
                "r": _SCRYPT_R,
                "p": _SCRYPT_P,
                "salt": _encode(_random_bytes(_SALT_BYTES)),
            },
        }
        key = self._key(header, create=True)
        nonce = _random_bytes(_NONCE_BYTES)
        plaintext = json.dumps({"secrets": entries}).encode()
        ciphertext = AESGCM(key).encrypt(nonce, plaintext, _associated_data(header))
        document = {
            **header,
            "nonce": _encode(nonce),
            "ciphertext": _encode(ciphertext),
        }
        write_private_file(self.path, json.dumps(document, indent=1).encode() + b"\n")

    def _parse(self, data: bytes) -> tuple[dict[str, Any], bytes, bytes]:
        try:
            document = json.loads(data)
            header = {
                "format": document["format"],
                "version": document["version"],
                "kdf": dict(document["kdf"]),
            }
            nonce = base64.b64decode(document["nonce"], validate=True)
            ciphertext = base64.b64decode(document["ciphertext"], validate=True)
            valid = (
                header["format"] == _FORMAT
                and header["version"] == _FORMAT_VERSION
                and _valid_kdf(header["kdf"])
            )
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise CredentialError(
                f"The credential store {self.path} is not a runvisor credential "
                "file of a known version. Restore it from a backup, or move it "
                "away and add the credentials again."
            )
        return header, nonce, ciphertext

    def _key(self, header: dict[str, Any], *, create: bool) -> bytes:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        material = self._material(create=create)
        kdf = header["kdf"]
        salt = base64.b64decode(kdf["salt"])
        n, r, p = kdf["n"], kdf["r"], kdf["p"]
        cache_key = (material, salt, n, r, p)
        key = self._keys.get(cache_key)
        if key is None:
            key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(material)
            self._keys[cache_key] = key
        return key

    def _material(self, *, create: bool) -> bytes:
        source = self.key_source
        if source.material is not None:
            return source.material
        assert source.path is not None
        try:
            material = read_key_file(source.path, check_mode=source.generated)
        except FileNotFoundError:
            if not (source.generated and create):
                raise CredentialError(
                    f"The credential store {self.path} is encrypted, but "
                    f"{source.description} does not exist. Restore that file, "
                    f"or set {KEY_VARIABLE} to the key the store was written with."
                ) from None
            material = generate_key_file(source.path)
        if not material:
            raise CredentialError(
                f"{capitalize(source.description)} is empty. Put the key in it, "
                "or remove it to have runvisor generate a new one."
            )
        return material

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        make_private_dir(self.data_dir)
        lock_path = self.data_dir / LOCK_FILE_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _valid_kdf(kdf: dict[str, Any]) -> bool:
    # Bounds keep a damaged file from asking scrypt for gigabytes of memory
    # before decryption can reject it.
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    return (
        kdf.get("name") == "scrypt"
        and isinstance(kdf.get("salt"), str)
        and isinstance(n, int)
        and isinstance(r, int)
        and isinstance(p, int)
        and 2 <= n <= 2**20
        and n & (n - 1) == 0
        and 1 <= r <= 32
        and 1 <= p <= 16
    )


def _associated_data(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def read_key_file(path: Path, *, check_mode: bool) -> bytes:
    """Return the key material in `path`, without surrounding whitespace.

    With `check_mode`, a key file that other users may read is rejected.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode & 0o777
        if check_mode and mode & 0o077:
            raise CredentialError(
                f"The key file {path} has mode {mode:04o}, so other users may "
                f"read it. Run 'chmod 600 {path}'."
            )
        return file.read().strip()


def generate_key_file(path: Path) -> bytes:
    """Create `path` with 32 random bytes (base64), mode 0600, and return them.

    When another process creates the file first, its key is returned.
    """
    make_private_dir(path.parent)
    material = base64.urlsafe_b64encode(_random_bytes(32)).rstrip(b"=")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return read_key_file(path, check_mode=True)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(material + b"\n")
        file.flush()
        os.fsync(file.fileno())
    return material


def write_private_file(target: Path, content: bytes, *, durable: bool = True) -> None:
    """Replace `target` atomically with `content`, mode 0600 from the first
    byte, never writing through a symlink.

    The content goes to a new temporary file in the same folder, created with
    O_EXCL and O_NOFOLLOW, and is then renamed over `target`. The rename
    replaces a symlink at that name instead of following it. `durable`
    flushes the content to disk before the rename, so that a power loss
    cannot leave an empty file under the name.
    """
    temporary = target.with_name(f"{target.name}.{_random_bytes(8).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            # The creation mode is filtered by the umask. Make it exact.
            os.fchmod(file.fileno(), 0o600)
            file.write(content)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.rename(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
