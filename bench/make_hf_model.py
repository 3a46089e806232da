"""Turn the bundled GGUF into a Hugging Face folder for vLLM (same weights, dequantized).

Run with a Python that has torch, transformers, gguf and accelerate: the project's venv
with the vllm extra, or the bench's vLLM venv (bench/setup-peers.sh):
    bench/.venvs/vllm/bin/python bench/make_hf_model.py [OUT]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the bench's venv does not install aicloud

from aicloud.engines.vllm_convert import gguf_to_hf  # noqa: E402
from aicloud.models.catalog import BUNDLED_FILE, BUNDLED_PACKAGE  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / ".models" / "smollm2"
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None:  # the bench venv may lack it: look in the project's venv
        folders = list((ROOT / ".venv").glob(f"lib/python*/site-packages/{BUNDLED_PACKAGE}"))
    else:
        folders = [Path(p) for p in spec.submodule_search_locations or []]
    folder = next(f for f in folders if (f / BUNDLED_FILE).is_file())
    print(gguf_to_hf(folder / BUNDLED_FILE, out))


if __name__ == "__main__":
    main()
