"""Stopping a decode of batch rows mid-graph when an interactive request arrives.

llama.cpp's CPU backend calls the context's abort callback between graph nodes (on its
first worker thread); when it returns true, `llama_decode` returns 2 and removes the
aborted rows' KV cells again, so the sequences are as if the decode had not been called.
A Python callback would be entered per node (hundreds per decode) from a C thread, taking
the GIL each time while the event loop holds it: the decode would wait on the interpreter.

So the callback is a C function already loaded, libc's `strlen`, on a two-byte buffer:
b"\\x01\\x00" is "abort", b"\\x00\\x00" is "go on". It returns exactly 0 or 1 (the second
byte is always NUL) in the whole return register, so it reads as the `bool` the callback
type declares on every C ABI we run on (x86-64 System V and Windows, AArch64: one pointer
argument in the first argument register, the result in the first return register), and it
holds no lock and never touches Python. The flag byte is written by one thread and read by
another without a fence: a one-byte store cannot tear, and a late read only costs one more
graph node before the abort.
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp

_ABORT, _GO = b"\x01", b"\x00"


def _strlen_address() -> int:
    libc = ctypes.CDLL("msvcrt" if sys.platform == "win32" else None)
    address = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    if not address:
        raise RuntimeError("libc strlen not found")
    return address


class AbortFlag:
    """The abort callback of one context. `raise_flag` may be called from any thread; the
    engine thread clears it before each decode it allows to be stopped."""

    def __init__(self, ctx: llama_cpp.llama_context_p) -> None:
        self._ctx = ctx
        self._flag = ctypes.create_string_buffer(2)  # both bytes NUL: go on
        self._callback = llama_cpp.ggml_abort_callback(_strlen_address())
        llama_cpp.llama_set_abort_callback(ctx, self._callback,
                                           ctypes.cast(self._flag, ctypes.c_void_p))

    @property
    def raised(self) -> bool:
        return self._flag.raw[:1] == _ABORT

    def raise_flag(self) -> None:
        self._flag[0] = _ABORT

    def clear(self) -> None:
        self._flag[0] = _GO

    def close(self) -> None:
        """Detach from the context (before the buffer may be freed)."""
        self.clear()
        llama_cpp.llama_set_abort_callback(self._ctx, llama_cpp.ggml_abort_callback(), None)


# llama_decode's status for a decode stopped by the abort callback
ABORTED = 2
