"""Turn a GGUF into a Hugging Face folder, the format vLLM loads (same weights, dequantized).

Needs transformers, gguf, accelerate and torch (the `vllm` extra), not llama.cpp. Used by
the vLLM engine for a GGUF it is given, by the vLLM tests (which make the folder from the
bundled GGUF instead of downloading one) and by bench/make_hf_model.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

HF_CONFIG = "config.json"


def is_hf_folder(path: Path) -> bool:
    """A folder that vLLM (and transformers) can load: it has a `config.json`."""
    return path.is_dir() and (path / HF_CONFIG).is_file()


def check_model_path(path: Path) -> Path:
    """Accept a Hugging Face folder, or a GGUF file to convert; refuse anything else."""
    from aicloud.engines.llamacpp.model import ModelLoadError, check_gguf_path

    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"model not found: {path}") from exc
    if resolved.is_dir():
        if not (resolved / HF_CONFIG).is_file():
            raise ModelLoadError(f"not a Hugging Face model folder (no {HF_CONFIG}): {path}")
        return resolved
    return check_gguf_path(resolved)


def ensure_hf_folder(source: Path, cache: Path) -> Path:
    """`source` if it is a Hugging Face folder, else its GGUF converted once into `cache`."""
    source = check_model_path(source)
    if source.is_dir():
        return source
    stat = source.stat()
    tag = hashlib.sha256(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return gguf_to_hf(source, cache / f"{source.stem}.{tag.hexdigest()[:12]}.hf")


def gguf_to_hf(gguf: Path, out: Path, *, dtype: str = "bfloat16") -> Path:
    """Write config, safetensors weights in `dtype` and tokenizer of `gguf` into `out`.

    Does nothing if `out` already holds a converted model. Writes into a sibling folder
    first and renames it, so a crash never leaves a half-written model behind."""
    if is_hf_folder(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype))
    model.hf_quantizer = None  # the weights are plain tensors now, not GGUF blocks
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(partial)
        if not is_hf_folder(out):
            raise
    return out
