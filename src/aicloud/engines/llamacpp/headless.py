"""Embedding decodes that stop before the output head.

llama.cpp builds a decoder model's graph with its output head (n_vocab x n_embd: 49k rows
for SmolLM2) after the final norm, and an embedding context computes that head for every
row though only the final norm's rows are pooled: for SmolLM2 a fifth of the arithmetic per
row, more where the head's weights run on slower kernels than the layers' (its tied Q8_0
embedding table is not repacked, the Q4_0 layers are). The scheduler's eval callback
(`cb_eval`) is asked, node by node, whether the caller wants a node's result; the graph is
computed up to the node it wants and stops there when the callback returns false. So the
callback asks for the final norm (every llama.cpp model builder names it "result_norm"),
copies its rows and stops; pooling and normalising them is then the embedder's.

Whether a model's pooled vector really is a pooling of those rows (a model with dense
layers after pooling, or an architecture that names its norm otherwise, would make it
differ) is checked once per context against llama.cpp's own pooling (`verify`); a context
that fails the check computes its whole graph as before.

The callback runs on the thread that called `llama_decode`, once per graph node up to the
norm (about a thousand for SmolLM2), taking the GIL each time: ~0.4 us a call here, well
under 1 % of a decode, with no Python between the norm's computation and the stop.
"""

from __future__ import annotations

import ctypes
import logging

import llama_cpp
import numpy as np
from llama_cpp import _ggml

log = logging.getLogger(__name__)

FINAL_NORM = b"result_norm"
# How far our pooling of the norm's rows may be from llama.cpp's pooled vector (both unit
# length) for the head to be skipped; the mean differs by ~6e-8 (float64 against its f32
# matrix product), first and last rows by nothing.
TOLERANCE = 1e-5

_lib = _ggml.libggml
_lib.ggml_get_name.restype = ctypes.c_char_p
_lib.ggml_get_name.argtypes = [ctypes.c_void_p]
_lib.ggml_nbytes.restype = ctypes.c_size_t
_lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
_lib.ggml_backend_tensor_get.restype = None
_lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                         ctypes.c_size_t]


def pool(rows: np.ndarray, pooling: int) -> np.ndarray:
    """The unit vector of `rows` (one per token) pooled as llama.cpp pools them."""
    if pooling == llama_cpp.LLAMA_POOLING_TYPE_MEAN:
        raw = rows.astype(np.float64).mean(axis=0)
    elif pooling == llama_cpp.LLAMA_POOLING_TYPE_CLS:
        raw = rows[0].astype(np.float64)
    elif pooling == llama_cpp.LLAMA_POOLING_TYPE_LAST:
        raw = rows[-1].astype(np.float64)
    else:
        raise ValueError(f"no pooling of rows for llama.cpp pooling type {pooling}")
    return unit(raw)


def unit(raw: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(raw))
    result: np.ndarray = raw / norm if norm > 0 else raw
    return result


class NormTap:
    """The eval callback of one embedding context: copies the final norm's rows of each
    decode and, once `stopping`, stops the graph there."""

    POOLINGS = (llama_cpp.LLAMA_POOLING_TYPE_MEAN, llama_cpp.LLAMA_POOLING_TYPE_CLS,
                llama_cpp.LLAMA_POOLING_TYPE_LAST)

    NODE = FINAL_NORM

    def __init__(self, n_embd: int) -> None:
        self.n_embd = n_embd
        self.stopping = False  # set by `verify` once the rows are known to pool right
        self.stops = 0  # graphs stopped at the norm, i.e. output heads not computed
        self.rows: np.ndarray | None = None
        self._expected = 0
        # llama.cpp keeps only the function pointer: this object must outlive the context
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def expect(self, tokens: int) -> None:
        """Before a decode of `tokens` rows: forget the last rows."""
        self.rows = None
        self._expected = tokens

    def _on_node(self, tensor: int | None, ask: bool, _user: int | None) -> bool:
        if not tensor or _lib.ggml_get_name(tensor) != self.NODE:
            return False  # ask: not wanted (never called otherwise for such nodes)
        if ask:
            return True
        size = _lib.ggml_nbytes(tensor)
        if size != self._expected * self.n_embd * 4:  # not one f32 row per token: not ours
            return True
        rows = np.empty((self._expected, self.n_embd), dtype=np.float32)
        _lib.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, size)
        self.rows = rows
        if not self.stopping:
            return True
        self.stops += 1
        return False

    def verify(self, pooling: int, reference: np.ndarray) -> bool:
        """After a decode run without stopping: do the rows pool to llama.cpp's own unit
        vector `reference`? If so, later decodes stop at the norm."""
        ok = (pooling in self.POOLINGS and self.rows is not None
              and float(np.abs(pool(self.rows, pooling) - reference).max()) <= TOLERANCE)
        self.stopping = ok
        return ok

