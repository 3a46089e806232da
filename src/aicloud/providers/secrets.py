"""Provider secrets at rest: API keys and extra headers are Fernet tokens (AES-128-CBC +
HMAC-SHA256, from `cryptography`) under one master key per installation.

The master key is `AICLOUD_SECRET_KEY` (a Fernet key, or any passphrase, stretched with
SHA-256), else a key file `AICLOUD_HOME/secret.key` created with mode 0600 the first time
a secret is stored. Losing the key makes stored provider keys unreadable (add them again);
a key file readable by others is refused rather than trusted.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KEY_FILE = "secret.key"


class SecretError(Exception):
    """A secret cannot be stored or read: no usable master key, or the wrong one."""


class Secret:
    """A value that never prints: repr and str show a mask, so a provider key passed to a
    log call, an f-string or an exception stays hidden. `reveal()` is the one way out."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _fernet_key(material: str) -> bytes:
    """A Fernet key as given, or one derived from a passphrase."""
    raw = material.strip().encode()
    try:
        if len(base64.urlsafe_b64decode(raw)) == 32:
            return raw
    except ValueError:
        pass
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest())


def _read_or_create(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"{path} is readable by other users: chmod 600 it") from None
        return path.read_bytes().strip()
    key = Fernet.generate_key()
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class SecretBox:
    """Encrypts and decrypts provider secrets; the master key is read on first use, so an
    installation without providers never creates a key file."""

    def __init__(self, home: Path, passphrase: str | None = None) -> None:
        self._home = home
        self._passphrase = passphrase
        self._fernet: Fernet | None = None

    def _box(self) -> Fernet:
        if self._fernet is None:
            if self._passphrase:
                key = _fernet_key(self._passphrase)
            else:
                self._home.mkdir(parents=True, exist_ok=True, mode=0o700)
                key = _read_or_create(self._home / KEY_FILE)
            self._fernet = Fernet(key)
        return self._fernet

    def seal(self, value: str) -> str:
        return self._box().encrypt(value.encode()).decode("ascii")

    def open(self, token: str) -> Secret:
        try:
            return Secret(self._box().decrypt(token.encode("ascii")).decode())
        except (InvalidToken, ValueError):
            raise SecretError("a stored provider secret cannot be decrypted: the master key "
                              "(AICLOUD_SECRET_KEY or secret.key) is not the one it was "
                              "stored with") from None
