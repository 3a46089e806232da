"""Log-probabilities of sampled tokens, read from llama.cpp's logits row (engine thread).

OpenAI's semantics: the log-softmax of the model's raw logits at that position, before
any sampling filter (temperature, top-k/p, penalties, logit bias), for the chosen token
and the `k` most likely alternatives. Only sequences that asked pay for it: a few passes
over the vocabulary per token (SmolLM2's 49k floats: 0.25 ms in float32 here, 0.35 ms
through float64, no closer than 3e-6; picking 20 alternatives adds 0.5 ms).
"""

from __future__ import annotations

from collections.abc import Callable

import llama_cpp
import numpy as np
import numpy.typing as npt

from aicloud.engines.base import Logprob, TokenLogprobs

LogprobRow = npt.NDArray[np.float32]


def log_softmax(ctx: llama_cpp.llama_context_p, index: int, n_vocab: int) -> LogprobRow:
    """The distribution at batch row `index`, copied out: read it before anything writes
    into the logits (a constraint mask, the next `llama_decode`)."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index),
                                   shape=(n_vocab,))
    row: LogprobRow = logits - logits.max()  # a new array: the logits stay as they are
    row -= np.float32(np.log(np.exp(row).sum(dtype=np.float64)))
    return row


def token_logprobs(row: LogprobRow, token: int, k: int,
                   piece: Callable[[int], bytes]) -> TokenLogprobs:
    """The chosen token's log-probability and the `k` best alternatives, best first."""
    top: tuple[Logprob, ...] = ()
    if k > 0:
        best = np.argpartition(row, -k)[-k:]
        best = best[np.argsort(-row[best], kind="stable")]
        top = tuple(_logprob(int(t), float(row[t]), piece) for t in best)
    return TokenLogprobs(_logprob(token, float(row[token]), piece), top)


def _logprob(token: int, value: float, piece: Callable[[int], bytes]) -> Logprob:
    raw = piece(token)  # JSON has no -inf: floored as vLLM does
    return Logprob(raw.decode("utf-8", errors="replace"), raw, max(value, -9999.0))
