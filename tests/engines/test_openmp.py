"""llama.cpp's OpenMP workers spin briefly before sleeping (engines/llamacpp/__init__.py).

Checked on the libgomp that llama.cpp really loads: OMP_DISPLAY_ENV makes it print the
settings it read when it was loaded, so the value must have been in the environment
before `llama_cpp` was imported through the engine."""

from __future__ import annotations

import os
import subprocess
import sys

from aicloud.engines.llamacpp import SPIN_COUNT


def spin_count_read_by_libgomp(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import aicloud.engines.llamacpp.model"],
        env={**env, "OMP_DISPLAY_ENV": "VERBOSE"}, capture_output=True, text=True,
        check=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if "GOMP_SPINCOUNT" in line]
    assert lines, f"libgomp printed no settings: {done.stderr[-500:]}"
    return lines[0].split("=")[1].strip().strip("'")


def test_llamacpp_threads_spin_briefly_before_sleeping() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert spin_count_read_by_libgomp(env) == SPIN_COUNT
    assert int(SPIN_COUNT) < 300_000  # libgomp's own default: several ms of spinning


def test_an_operators_spin_count_or_wait_policy_is_kept() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert spin_count_read_by_libgomp({**env, "GOMP_SPINCOUNT": "77"}) == "77"
    assert spin_count_read_by_libgomp({**env, "OMP_WAIT_POLICY": "PASSIVE"}) == "0"
