"""A GGUF model and one shared llama.cpp context, on llama-cpp-python's low-level API.

Only the engine thread touches the context; tokenizing and detokenizing only read the
vocabulary, which llama.cpp keeps immutable, so the event loop may call them too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import stat
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp
from llama_cpp import _logger  # noqa: F401 - installs its callback first; ours replaces it

from aicloud.engines.base import EngineError
from aicloud.engines.llamacpp.chat import ControlTokens

GGUF_MAGIC = b"GGUF"


class ErrorsOnly:
    """llama.cpp's log callback: its errors to stderr, its chatter dropped. The one
    llama-cpp-python installs reads an older ggml level enum (WARN is 3 now, ERROR was), so
    every warning got through, among them one line per sequence of each decode stopped for
    an interactive newcomer (`preempt.py`). Called only when llama.cpp logs."""

    ERROR, CONT = 4, 5  # ggml_log_level

    def __init__(self) -> None:
        self.printing = False  # a continued line follows its first line's level
        self.callback = llama_cpp.llama_log_callback(self._log)

    def _log(self, level: int, text: bytes | None, _data: ctypes.c_void_p) -> None:
        if level != self.CONT:
            self.printing = level == self.ERROR
        if self.printing and text:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()


LOG = ErrorsOnly()
llama_cpp.llama_log_set(LOG.callback, ctypes.c_void_p(0))


class ModelLoadError(EngineError):
    code = "model_load_failed"


DEFAULT_KV_TYPE = "bf16"


@dataclass(slots=True, frozen=True)
class ContextConfig:
    """How one context is laid out: `sequences` slots, each in its own KV stream.

    `None` means "size it for this model and machine" (see `LlamaModel.resolve`).
    The defaults make a greedy request's text independent of the batch it runs in:
    per-sequence streams place each sequence's cells the same under any load (in a unified
    cache a freed hole moves a sequence's next cells before its older ones, reordering the
    attention sums). Flash attention with a bf16 (or q8_0) cache computes every query row
    with one kernel, over its own cells in order, whatever else the step holds; with an f16
    cache llama.cpp switches kernels by the step's shape (a tiled one for 64 rows of one
    stream, one that splits the cells among the threads for a lone sequence past 512
    cells), which round differently. Flash attention made decode 1.2-1.5x faster here
    (docs/benchmarks.md); without it (`flash_attention=False`) every row takes the plain
    matrix-product path. `unified_kv=True` trades the identity for fewer graph
    computations per step."""

    sequences: int | None = None
    context_per_sequence: int | None = None
    threads: int | None = None
    step_sequences: int | None = None
    batch_tokens: int = 512
    kv_budget_mb: int = 2048
    flash_attention: bool = True
    kv_type: str = DEFAULT_KV_TYPE  # of K and V: bf16, f16 or q8_0 (`KV_TYPES`)
    unified_kv: bool = False
    adapt_threads: bool = True  # `threads` is then the most a decode uses (threads.py)
    # rows an interactive decode step may hold in all, batch-class rows filling what its
    # interactive rows leave (issue 16). 1 (batch rows sit interactive steps out) until a
    # quiet A/B shows riders pay: on the loaded machine of session 9 they did not clearly
    ride_rows: int = 1

    @property
    def n_ctx(self) -> int:
        return (self.sequences or 1) * (self.context_per_sequence or 0)

    def __post_init__(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise ModelLoadError(f"unknown KV cache type {self.kv_type!r}; one of "
                                 + ", ".join(KV_TYPES))
        if KV_TYPES[self.kv_type].quantized and not self.flash_attention:
            raise ModelLoadError("a quantized KV cache needs flash attention")


@dataclass(slots=True, frozen=True)
class KvType:
    ggml_type: int
    block_bytes: int  # bytes per block of `block` values
    block: int = 1

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def bytes(self, values: int) -> int:
        return -(-values // self.block) * self.block_bytes


KV_TYPES = {"bf16": KvType(30, 2), "f16": KvType(1, 2), "q8_0": KvType(8, 34, 32)}


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, kv_type: str) -> int:
    """K and V of every layer: what one more token of context costs."""
    return 2 * layers * KV_TYPES[kv_type].bytes(kv_heads * head_dim)


MAX_AUTO_SEQUENCES = 32
# Sequences decoded per step, per thread. With flash attention and the running sequences
# in one run of KV streams, a step of 32 on 2 threads made 365 tok/s against 251 for two
# steps of 16 (bench/engine_profile.py, session 9): a step reads every weight once, so
# narrower steps mostly re-read them. A newcomer's first token still does not wait for a
# full step: the step that ends a prompt decodes a quarter as many others.
STEP_SEQUENCES_PER_THREAD = 16
DEFAULT_CONTEXT = 2048


def check_gguf_path(path: Path) -> Path:
    """Refuse anything but a readable regular GGUF file before llama.cpp parses it."""
    try:
        resolved = path.resolve(strict=True)
        mode = resolved.stat().st_mode
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"model file not found: {path}") from exc
    if not stat.S_ISREG(mode):
        raise ModelLoadError(f"model path is not a regular file: {path}")
    with resolved.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"not a GGUF file: {path}")
    return resolved


# control tokens by file version (path, size, mtime), the oldest forgotten first
MAX_KNOWN_FILES = 64
_CONTROLS: dict[tuple[str, int, int], ControlTokens] = {}
_CONTROLS_LOCK = threading.Lock()


class Vocabulary:
    """What reads a model's vocabulary and metadata (tokenizing, control tokens, token
    text): the loaded model's, or a vocabulary-only load of a GGUF (`VocabOnly`)."""

    model: llama_cpp.llama_model_p | None
    vocab: llama_cpp.llama_vocab_p
    n_vocab: int

    def metadata(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, special: bool, add_special: bool = True) -> list[int]:
        """`special=True` parses control tokens such as `<|im_start|>` (for rendered
        templates); user text in plain completions is tokenized literally. `add_special`:
        BOS (and EOS) as the model wants them around a whole prompt."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity,
                                     add_special, special)
        if n < 0:
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity,
                                         add_special, special)
        return list(tokens[:n])

    # -- what a chat template needs (chat.ChatTokenizer) ------------------------------------

    path: Path

    @functools.cached_property
    def controls(self) -> ControlTokens:
        """Tokens only parsed with `special=True` (control and unknown): the ones a user's
        text must never produce. Scanned once per file version, not at every load of it:
        a scan of SmolLM2's 49k tokens is ~45 ms of a cold request's load."""
        stat = self.path.stat()
        key = (str(self.path), stat.st_size, stat.st_mtime_ns)
        with _CONTROLS_LOCK:
            known = _CONTROLS.get(key)
        if known is not None:
            return known
        wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        ids: dict[str, int] = {}
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self.vocab, token) & wanted:
                ids.setdefault(self.token_text(token), token)
        found = ControlTokens(ids)
        with _CONTROLS_LOCK:
            _CONTROLS[key] = found
            while len(_CONTROLS) > MAX_KNOWN_FILES:
                _CONTROLS.pop(next(iter(_CONTROLS)))
        return found

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenize(text, special=True)

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenize(text, special=False, add_special=False)

    def affixes(self) -> tuple[list[int], list[int]]:
        bos = [llama_cpp.llama_vocab_bos(self.vocab)] if llama_cpp.llama_vocab_get_add_bos(
            self.vocab) else []
        eos = [llama_cpp.llama_vocab_eos(self.vocab)] if llama_cpp.llama_vocab_get_add_eos(
            self.vocab) else []
        return bos, eos

    def piece(self, token: int) -> bytes:
        """The bytes of one token; control tokens render as nothing."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    @property
    def bos_text(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_text(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_eos(self.vocab))


class VocabOnly(Vocabulary):
    """A GGUF's vocabulary and metadata without its weights (llama.cpp's `vocab_only`):
    a tokenizer in a few megabytes, loaded in a fraction of a second."""

    def __init__(self, path: Path) -> None:
        self.path = check_gguf_path(path)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp cannot read the vocabulary of {path.name}: "
                                 "truncated, corrupt or unsupported")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()


class LlamaModel(Vocabulary):
    """Owns the llama.cpp model, vocabulary and context; frees them on `close`."""

    def __init__(self, path: Path, config: ContextConfig) -> None:
        self.path = check_gguf_path(path)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path.name}: truncated or unsupported")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.context_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self.config = self.resolve(config)
        self.ctx = self._new_context(self.config)

    def kv_bytes_per_token(self, kv_type: str) -> int:
        m = self.model
        head_dim: int = llama_cpp.llama_model_n_embd(m) // max(1, llama_cpp.llama_model_n_head(m))
        return kv_bytes_per_token(llama_cpp.llama_model_n_layer(m),
                                  llama_cpp.llama_model_n_head_kv(m), head_dim, kv_type)

    def resolve(self, config: ContextConfig) -> ContextConfig:
        """Fill in what was left to us: context from the model, sequences from the KV budget,
        threads from the cores we may run on."""
        context = min(config.context_per_sequence or DEFAULT_CONTEXT, self.context_train)
        per_sequence = context * self.kv_bytes_per_token(config.kv_type)
        fits = (config.kv_budget_mb << 20) // max(1, per_sequence)
        sequences = config.sequences or max(1, min(MAX_AUTO_SEQUENCES, fits))
        threads = config.threads or default_threads()
        step = config.step_sequences or STEP_SEQUENCES_PER_THREAD * threads
        return replace(config, context_per_sequence=context, sequences=sequences,
                       threads=threads, step_sequences=min(step, sequences),
                       batch_tokens=max(config.batch_tokens, sequences))

    def _new_context(self, config: ContextConfig) -> llama_cpp.llama_context_p:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = config.batch_tokens
        cparams.n_ubatch = config.batch_tokens
        cparams.n_seq_max = config.sequences
        cparams.n_threads = config.threads
        cparams.n_threads_batch = config.threads
        cparams.kv_unified = config.unified_kv
        cparams.type_k = cparams.type_v = KV_TYPES[config.kv_type].ggml_type
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if config.flash_attention
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        ctx: llama_cpp.llama_context_p = llama_cpp.llama_init_from_model(self.model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelLoadError("llama.cpp could not create a context (out of memory?)")
        return ctx

    @property
    def memory(self) -> llama_cpp.llama_memory_t:
        memory: llama_cpp.llama_memory_t = llama_cpp.llama_get_memory(self.ctx)
        return memory

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = llama_cpp.llama_context_p(0)  # NULL, as llama.cpp sees None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))
