from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from aicloud.providers.secrets import KEY_FILE, Secret, SecretBox, SecretError


def test_a_key_file_is_made_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    box = SecretBox(tmp_path)
    token = box.seal("sk-provider-canary")
    assert "sk-provider-canary" not in token
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SecretBox(tmp_path).open(token).reveal() == "sk-provider-canary"


def test_nothing_is_created_until_a_secret_is_stored(tmp_path: Path) -> None:
    SecretBox(tmp_path / "home")
    assert not (tmp_path / "home").exists()


def test_a_passphrase_or_a_fernet_key_is_the_master_key(tmp_path: Path) -> None:
    token = SecretBox(tmp_path, "correct horse battery staple").seal("v")
    assert SecretBox(tmp_path / "other", "correct horse battery staple").open(token).reveal() == "v"
    key = Fernet.generate_key().decode()
    assert Fernet(key.encode()).decrypt(SecretBox(tmp_path, key).seal("w").encode()) == b"w"
    assert not (tmp_path / KEY_FILE).exists()


def test_the_wrong_master_key_is_a_clear_error_without_the_secret(tmp_path: Path) -> None:
    token = SecretBox(tmp_path, "one").seal("sk-provider-canary")
    with pytest.raises(SecretError) as caught:
        SecretBox(tmp_path, "two").open(token)
    assert "canary" not in str(caught.value)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    SecretBox(tmp_path).seal("x")
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        SecretBox(tmp_path).seal("x")


def test_a_secret_never_prints() -> None:
    secret = Secret("sk-provider-canary")
    assert "canary" not in repr(secret) and "canary" not in str(secret)
    assert "canary" not in f"{secret} {[secret]} {({'k': secret})}"
    assert secret.reveal() == "sk-provider-canary"
