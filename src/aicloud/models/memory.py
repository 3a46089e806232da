"""How much memory a model takes, before loading it (from its GGUF's header) and after
(measured): what the pool's budget counts.

The header is read here, not through llama.cpp, so a file is sized (and one too large for
the budget refused) without loading a byte of its weights, and without the `gguf` package.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aicloud.engines.llamacpp.model import (
    DEFAULT_CONTEXT,
    DEFAULT_KV_TYPE,
    GGUF_MAGIC,
    MAX_AUTO_SEQUENCES,
    ModelLoadError,
    kv_bytes_per_token,
)

# scalar value types of GGUF metadata, by type code: struct format
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# Enough for any real header (a 150k-token vocabulary is ~3 MB of strings); a file that
# claims more is refused before its claims are believed.
MAX_KEYS = 100_000
MAX_ITEMS = 10_000_000
OVERHEAD = 0.15


@dataclass(slots=True, frozen=True)
class MemoryNeed:
    """Bytes a model takes once loaded: its weights, the KV cache of all its sequences,
    and llama.cpp's compute buffers (for the generating and the embedding context)."""

    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


@dataclass(slots=True, frozen=True)
class GgufShape:
    """What sizes a model's memory, from its GGUF header."""

    layers: int
    embedding: int
    heads: int
    kv_heads: int
    head_dim: int
    context_train: int
    vocab: int

    def kv_bytes_per_token(self, kv_type: str) -> int:
        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, kv_type)


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header's key-value pairs; arrays are kept as their length only."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"not a GGUF file: {path.name}")
            _version, _tensors, n_keys = struct.unpack("<IQQ", _read(fh, 20))
            if n_keys > MAX_KEYS:
                raise ModelLoadError(f"{path.name}: implausible GGUF header ({n_keys} keys)")
            return dict(_pair(fh) for _ in range(n_keys))
    except (OSError, struct.error, UnicodeDecodeError, EOFError) as exc:
        raise ModelLoadError(f"{path.name}: unreadable GGUF header ({exc})") from None


def gguf_shape(path: Path) -> GgufShape:
    """Read once per file version: a header with a large vocabulary takes ~0.1 s to walk,
    which a cold request would otherwise wait for at every load."""
    stat = path.stat()
    return _shape(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _shape(path: Path, size: int, mtime_ns: int) -> GgufShape:
    meta = read_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path.name}: the GGUF names no architecture")

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ModelLoadError(f"{path.name}: missing or bad {arch}.{key}")
        return value

    embedding, heads = number("embedding_length"), max(1, number("attention.head_count"))
    vocab = meta.get("tokenizer.ggml.tokens")
    return GgufShape(
        layers=number("block_count"), embedding=embedding, heads=heads,
        kv_heads=number("attention.head_count_kv", heads),
        head_dim=number("attention.key_length", embedding // heads),
        context_train=number("context_length", DEFAULT_CONTEXT),
        vocab=vocab if isinstance(vocab, int) else number("vocab_size", 0))


def llamacpp_need(path: Path, *, context: int | None, sequences: int | None,
                  kv_budget_mb: int, batch_tokens: int,
                  kv_type: str = DEFAULT_KV_TYPE) -> MemoryNeed:
    """What `LlamaModel` will allocate for this file and layout (it sizes the context
    and the sequences the same way: see `LlamaModel.resolve`)."""
    shape = gguf_shape(path)
    ctx = min(context or DEFAULT_CONTEXT, shape.context_train or DEFAULT_CONTEXT)
    per_sequence = ctx * shape.kv_bytes_per_token(kv_type)
    seqs = sequences or max(1, min(MAX_AUTO_SEQUENCES, (kv_budget_mb << 20)
                                   // max(1, per_sequence)))
    rows = max(batch_tokens, seqs)
    # per context: hidden states and attention scores of a batch's rows, and logits of the
    # rows that are sampled (one per sequence, plus a prompt's last). llama.cpp reserves
    # logits for every row of a batch, but only the pages written become resident.
    graph = 4 * rows * (4 * shape.embedding + shape.heads * ctx) + 4 * (seqs + 1) * shape.vocab
    weights = path.stat().st_size
    # the embedding context: its own KV for one sequence and the same batch buffers
    kv, compute = (seqs + 1) * per_sequence, 2 * graph
    # what the estimate does not see: the tokenizer's tables, the chat template, allocator
    # slack (SmolLM2, 256-token context, 2 sequences: 136 MiB estimated, 151-153 measured)
    return MemoryNeed(weights=weights, kv=kv,
                      compute=compute + int(OVERHEAD * (weights + kv + compute)))


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def return_freed_memory() -> None:
    """Hand memory freed by an unloaded model back to the system (glibc keeps freed heap
    for reuse): otherwise the process stays as large, and the next load's cost, measured
    as growth, reads low (a SmolLM2 loaded after another was unloaded measured 95 MiB
    instead of 150)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def machine_memory() -> int:
    """Physical memory of the machine, in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _read(fh: IO[bytes], n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError("the file ends inside its header")
    return data


def _string(fh: IO[bytes]) -> str:
    (n,) = struct.unpack("<Q", _read(fh, 8))
    if n > 1 << 24:
        raise EOFError(f"a {n}-byte string")
    return _read(fh, n).decode("utf-8")


def _value(fh: IO[bytes], kind: int) -> Any:
    if kind in SCALARS:
        fmt = SCALARS[kind]
        return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]
    if kind == STRING:
        return _string(fh)
    if kind == ARRAY:
        item, n = struct.unpack("<IQ", _read(fh, 12))
        if n > MAX_ITEMS or item == ARRAY:
            raise EOFError(f"an array of {n} items of type {item}")
        if item in SCALARS:
            fh.seek(n * struct.calcsize(SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _value(fh, item)
        return n
    raise EOFError(f"unknown metadata type {kind}")


def _pair(fh: IO[bytes]) -> tuple[str, Any]:
    key = _string(fh)
    (kind,) = struct.unpack("<I", _read(fh, 4))
    return key, _value(fh, kind)
