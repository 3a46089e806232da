"""Weight formats: the same model re-typed for the machine it runs on.

Low concurrency is memory-bound (small weights win); batched decode is compute-bound, and
which kernels are fastest depends on the CPU (on AVX2, Q4_0 is repacked into interleaved
blocks that llama.cpp's batched kernels run fastest). Re-typing a quantized file changes
its numbers slightly, so it is the operator's choice (`--weights`), never silent; the
result is cached next to the other data and made once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import llama_cpp

from aicloud.engines.llamacpp.model import ModelLoadError, default_threads

FORMATS = {
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
}
NATIVE = "native"
DEFAULT_CACHE = Path("~/.aicloud/weights")


def check_format(fmt: str) -> str:
    if fmt != NATIVE and fmt not in FORMATS:
        raise ModelLoadError(f"unknown weight format {fmt!r}: use native or one of {list(FORMATS)}")
    return fmt


def retyped_path(source: Path, fmt: str, cache: Path) -> Path:
    stat = source.stat()
    tag = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache / f"{source.stem}.{tag.hexdigest()[:12]}.{fmt}.gguf"


def ensure_weights(source: Path, fmt: str, cache: Path) -> Path:
    """Return a GGUF of `source` in `fmt`, re-typing it into `cache` the first time."""
    if check_format(fmt) == NATIVE:
        return source
    target = retyped_path(source, fmt, cache)
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FORMATS[fmt]
    params.allow_requantize = True
    params.nthread = default_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"could not convert {source.name} to {fmt}")
    partial.replace(target)
    return target
