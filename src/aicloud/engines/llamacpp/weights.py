"""Weight formats: the same model re-typed for the machine it runs on.

Low concurrency is memory-bound (small weights win); batched decode is compute-bound, and
which kernels are fastest depends on the CPU: on AVX2, Q4_0 is repacked into interleaved
blocks that llama.cpp's batched kernels run fastest (SmolLM2's raw decode ceiling at 32
sequences: 305 tok/s as Q4_0 against 148 as the bundled Q4_1). So the format is the
engine's decision by default (`auto`): a 4-bit file is also tried as Q4_0, both are timed
on a short batched decode, and the faster one is served; the decision is kept per file and
machine, so it is measured once. Re-typing changes a quantized file's numbers slightly
(Q4_1 to Q4_0 drops each block's offset), which is why a file of another precision is
never re-typed silently and `--weights native` serves the file exactly as it is.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp

from aicloud.engines.llamacpp.model import ModelLoadError, default_threads

log = logging.getLogger(__name__)

FORMATS = {
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
}
NATIVE = "native"
AUTO = "auto"
# Files of these types are 4-bit already: serving them as Q4_0 is a choice of kernels, not
# of precision. Other files (8-bit, 16-bit, other bit widths) are served as they are.
FOUR_BIT = {llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
            llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL,
            llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS}
# Re-typed weights must beat the file by this much to be served instead of it.
MIN_GAIN = 1.10
DEFAULT_CACHE = Path("~/.aicloud/weights")


def check_format(fmt: str) -> str:
    if fmt not in (NATIVE, AUTO) and fmt not in FORMATS:
        raise ModelLoadError(f"unknown weight format {fmt!r}: use auto, native or one of "
                             f"{list(FORMATS)}")
    return fmt


def retyped_path(source: Path, fmt: str, cache: Path) -> Path:
    stat = source.stat()
    tag = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache / f"{source.stem}.{tag.hexdigest()[:12]}.{fmt}.gguf"


def ensure_weights(source: Path, fmt: str, cache: Path) -> Path:
    """Return a GGUF of `source` in `fmt` (`auto`: the faster format on this machine),
    re-typing it into `cache` the first time."""
    if check_format(fmt) == AUTO:
        fmt = choose_format(source, cache)
    if fmt == NATIVE:
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


Probe = Callable[[Path], float]


def choose_format(source: Path, cache: Path, probe: Probe | None = None) -> str:
    """`native` or `q4_0`, whichever decodes faster here; decided once per file and
    machine and remembered in `cache/formats.json`."""
    record = cache / "formats.json"
    key = f"{retyped_path(source, NATIVE, cache).name}|{machine_signature()}"
    decisions = _read_decisions(record)
    if key in decisions:
        return decisions[key]
    if file_type(source) not in FOUR_BIT:
        return NATIVE
    probe = probe or decode_rate
    started = time.perf_counter()
    try:
        native = probe(source)
        retyped = probe(ensure_weights(source, "q4_0", cache))
    except ModelLoadError as exc:  # serve the file; try again on the next start
        log.warning("%s: serving the file's own weights: %s", source.name, exc.message)
        return NATIVE
    choice = "q4_0" if retyped >= MIN_GAIN * native else NATIVE
    log.info("%s: serving %s weights (batched decode here: %.0f tok/s as the file, %.0f as "
             "q4_0; measured once in %.1f s)", source.name, choice, native, retyped,
             time.perf_counter() - started)
    decisions[key] = choice
    _write_decisions(record, decisions)
    return choice


def file_type(path: Path) -> int:
    """The file's llama.cpp type (`general.file_type`), read without loading the weights;
    -1 when it does not say."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not read {path.name}: truncated or unsupported")
    try:
        buf = ctypes.create_string_buffer(32)
        n = llama_cpp.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
        return int(buf.value) if n > 0 and buf.value.isdigit() else -1
    finally:
        llama_cpp.llama_model_free(model)


def machine_signature() -> str:
    """What the decision depends on besides the file: the CPU and its features, the cores
    we may use, and the llama.cpp build."""
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
        cpu += hashlib.sha256(flags.encode()).hexdigest()[:8]
    except OSError:
        pass
    raw = f"{platform.machine()}|{cpu}|{default_threads()}|{llama_cpp.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def decode_rate(path: Path, sequences: int = 16, steps: int = 6, prompt: int = 8) -> float:
    """Tokens per second of batched decode (`sequences` rows a step, the shape of a busy
    server), best of `steps` steps after a short prefill."""
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path.name}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = sequences * (prompt + steps + 1)
    cparams.n_batch = cparams.n_ubatch = sequences * prompt
    cparams.n_seq_max = sequences
    cparams.n_threads = cparams.n_threads_batch = default_threads()
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    batch = llama_cpp.llama_batch_init(sequences * prompt, 0, 1)
    try:
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {path.name}")
        token = min(100, llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)) - 1)
        rows = [(s, p) for s in range(sequences) for p in range(prompt)]
        _decode(ctx, batch, token, rows, last_only=True)
        best = float("inf")
        for step in range(steps):
            started = time.perf_counter()
            _decode(ctx, batch, token, [(s, prompt + step) for s in range(sequences)])
            best = min(best, time.perf_counter() - started)
        return sequences / best
    finally:
        llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _decode(ctx: llama_cpp.llama_context_p, batch: Any, token: int,
            rows: list[tuple[int, int]], last_only: bool = False) -> None:
    for i, (seq, pos) in enumerate(rows):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = not last_only or i + 1 == len(rows) or rows[i + 1][0] != seq
    batch.n_tokens = len(rows)
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise ModelLoadError("llama.cpp could not decode while timing the weights")


def _read_decisions(record: Path) -> dict[str, str]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if v in (NATIVE, *FORMATS)} if isinstance(
        data, dict) else {}


def _write_decisions(record: Path, decisions: dict[str, str]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(decisions, indent=1, sort_keys=True))
    partial.replace(record)
