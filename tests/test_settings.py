"""Where settings put things."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicloud.config import Settings


def test_every_home_on_a_machine_shares_the_re_typed_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new AICLOUD_HOME must not re-type and re-time a model the machine has decided
    already (issue 18: measured once per model and machine)."""
    monkeypatch.delenv("AICLOUD_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    one = Settings(home=tmp_path / "one")
    other = Settings(home=tmp_path / "other")
    assert one.weights_cache == other.weights_cache == tmp_path / "cache/aicloud/weights"
    assert Settings(home=tmp_path / "one", weights_dir=tmp_path / "w").weights_cache == \
        tmp_path / "w"
