"""The vLLM engine: the Engine protocol over vLLM v1's `AsyncLLM`.

vLLM keeps its own scheduler (in an engine-core process), so this engine has no waiting
line of its own: requests go straight to vLLM with their priority, and vLLM's priority
scheduler orders them. We tokenize (the model's chat template in our Jinja sandbox, the
Hugging Face tokenizer), so the caller knows the prompt size before anything runs, and
vLLM only ever sees token ids. vLLM is imported lazily: it is an extra (`aicloud[vllm]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aicloud.engines.base import (
    ChatMessage,
    Constraint,
    EmbeddingRequest,
    Embeddings,
    EngineError,
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerationRequest,
    Logprob,
    TokenEvent,
    TokenLogprobs,
    Usage,
    completion_limit,
    not_embedding,
)
from aicloud.engines.events import EventQueue
from aicloud.engines.llamacpp.batcher import RateMeter
from aicloud.engines.llamacpp.chat import ChatTemplate, ControlTokens
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.engines.llamacpp.weights import DEFAULT_CACHE
from aicloud.engines.vllm_convert import ensure_hf_folder

if TYPE_CHECKING:
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
DEFAULT_SEQUENCES = 32
INLINE_TOKENIZE_CHARS = 16_384
FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
          "abort": FinishReason.CANCELLED}  # anything else ("error", …) is an error


def structured_outputs(constraint: Constraint | None) -> Any:
    """Our grammar as vLLM's structured outputs, for its guidance backend (llguidance too,
    so the same texts are allowed as on llama.cpp): the JSON schema, which carries our
    compile options (compact JSON) inside it as `x-guidance`, or the Lark grammar. Any
    other shape is refused rather than run differently."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    spec = json.loads(constraint.grammar)
    grammars = spec.get("grammars") or []
    extra = {k: v for k, v in spec.items() if k != "grammars" and v is not None}
    if len(grammars) == 1 and not extra:
        schema, lark = grammars[0].get("json_schema"), grammars[0].get("lark_grammar")
        if schema is not None and not lark:
            return StructuredOutputsParams(json=schema)
        if lark and schema is None:
            return StructuredOutputsParams(grammar=lark)
    raise EngineError("this grammar is not supported by the vLLM engine",
                      param="response_format")


def default_context(folder: Path) -> int:
    """The model's context, at most 2048 tokens (as the llama.cpp engine sizes it)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    return min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


class VllmStream(EventQueue):
    """The outputs of one vLLM request, turned into our events by a task on the loop."""

    def __init__(self, engine: VllmEngine, request_id: str, prompt_tokens: int,
                 outputs: RequestOutputCollector, top_logprobs: int | None = None) -> None:
        super().__init__()
        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.top_logprobs = top_logprobs  # None: not asked for
        self.completion_tokens = 0
        self.started = False  # vLLM has scheduled it and sent a first output
        self._pump = asyncio.create_task(self._run(outputs))

    def cancel(self) -> None:
        """vLLM answers an abort with a last output (finish reason "abort"), which ends
        the stream with the tokens counted so far."""
        if not self.done:
            self._engine.abort(self.request_id)

    def stop(self) -> None:
        """End the stream now, as cancelled (the engine is closing)."""
        self._pump.cancel()

    async def _run(self, outputs: RequestOutputCollector) -> None:
        try:
            while not self.done:
                self._on_output(outputs.get_nowait() or await outputs.get())
        except asyncio.CancelledError:  # the engine is closing
            self._put("", FinishReason.CANCELLED)
            raise
        except Exception:
            log.exception("vLLM failed on request %s", self.request_id)
            self._put("", FinishReason.ERROR)
        finally:
            outputs.close()
            self._engine.forget(self)

    def _on_output(self, out: RequestOutput) -> None:
        self.started = True
        new = out.outputs[0]
        self.completion_tokens += len(new.token_ids)  # a delta: tokens made since last time
        self._engine.meter.add(len(new.token_ids))
        logprobs = self._logprobs(new)
        if not out.finished:
            if new.text or logprobs:
                self._put(new.text, None, logprobs=logprobs)
            return
        reason = FINISH.get(str(new.finish_reason), FinishReason.ERROR)
        self._put(new.text, reason, cached=out.num_cached_tokens or 0, logprobs=logprobs)

    def _logprobs(self, new: CompletionOutput) -> tuple[TokenLogprobs, ...]:
        if self.top_logprobs is None:
            return ()
        return vllm_logprobs(new, self.top_logprobs, self._engine.eos_token_id)

    def _put(self, text: str, reason: FinishReason | None, cached: int = 0,
             logprobs: tuple[TokenLogprobs, ...] = ()) -> None:
        usage = None if reason is None else Usage(self.prompt_tokens, self.completion_tokens,
                                                  cached)
        self.put(TokenEvent(text, self.completion_tokens, reason, usage, logprobs))


def vllm_logprobs(new: CompletionOutput, k: int,
                  eos: int | None) -> tuple[TokenLogprobs, ...]:
    """vLLM's own logprobs (raw, before its sampling filters) in our shape: for each new
    token vLLM maps the sampled token and the k best to their logprob and rank. The
    end-of-text token is not text, so its logprobs are not sent (as on llama.cpp)."""
    out = []
    for token, ranked in zip(new.token_ids, new.logprobs or (), strict=False):
        if token == eos or not ranked or token not in ranked:
            continue
        top = sorted(((t, e) for t, e in ranked.items() if e.rank is not None
                      and e.rank <= k), key=lambda item: item[1].rank or 0)
        out.append(TokenLogprobs(_logprob(ranked[token]), tuple(_logprob(e) for _, e in top)))
    return tuple(out)


def _logprob(entry: Any) -> Logprob:
    text = entry.decoded_token or ""
    return Logprob(text, text.encode(), max(float(entry.logprob), -9999.0))


class HfChatTokenizer:
    """A Hugging Face tokenizer as `chat.ChatTokenizer`: its control tokens are the added
    tokens marked special (what `split_special_tokens=True` leaves as text)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.controls = ControlTokens({token.content: token_id for token_id, token in
                                       tokenizer.added_tokens_decoder.items()
                                       if token.special})
        plain = self.encode_plain("a")
        whole = list(tokenizer("a")["input_ids"])
        at = next((i for i in range(len(whole)) if whole[i:i + len(plain)] == plain), 0)
        self._affixes = whole[:at], whole[at + len(plain):]

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tokenizer(text, split_special_tokens=False)["input_ids"])

    def encode_plain(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False,
                                    split_special_tokens=True)["input_ids"])

    def affixes(self) -> tuple[list[int], list[int]]:
        return list(self._affixes[0]), list(self._affixes[1])


class VllmEngine:
    kind = "vllm"

    def __init__(self, model_id: str, path: Path, config: ContextConfig | None = None, *,
                 eager: bool = False, weights_cache: Path | None = None) -> None:
        self.model_id = model_id
        self.path = path  # a Hugging Face folder, or a GGUF converted into one at start
        self.eager = eager  # skip torch.compile: starts faster, decodes slower
        self._weights_cache = (weights_cache or DEFAULT_CACHE).expanduser()
        self._requested = config or ContextConfig()
        self._llm: AsyncLLM | None = None
        self._template: ChatTemplate | None = None
        self._chat_tokenizer: HfChatTokenizer | None = None
        self._streams: dict[str, VllmStream] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        self.meter = RateMeter()

    async def start(self) -> None:
        """Start vLLM's engine-core process (minutes on a CPU: it compiles the model)."""
        folder = await asyncio.to_thread(ensure_hf_folder, self.path, self._weights_cache)
        self._llm = await asyncio.to_thread(self._create, folder)
        tokenizer = self.tokenizer
        self._template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token
                                      or "", eos_token=tokenizer.eos_token or "",
                                      model=self.model_id)
        self._chat_tokenizer = await asyncio.to_thread(HfChatTokenizer, tokenizer)

    def _create(self, folder: Path) -> AsyncLLM:
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        config = self._requested
        args = AsyncEngineArgs(
            model=str(folder), served_model_name=[self.model_id],
            max_model_len=config.context_per_sequence or default_context(folder),
            max_num_seqs=config.sequences or DEFAULT_SEQUENCES,
            kv_cache_memory_bytes=config.kv_budget_mb << 20,
            scheduling_policy="priority", enable_prefix_caching=True,
            enforce_eager=self.eager, disable_log_stats=True,
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
        )
        return AsyncLLM.from_engine_args(args)

    async def close(self) -> None:
        if self._template is not None:
            self._template.close()
        for stream in list(self._streams.values()):
            stream.stop()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    @property
    def llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineError(f"model {self.model_id} is not running")
        return self._llm

    @property
    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """As the llama.cpp engine: rendered off the loop within the template's limits,
        control tokens only from the template."""
        if self._template is None or self._chat_tokenizer is None:
            raise EngineError(f"model {self.model_id} is not loaded")
        extra = {"tools": tools} if tools else {}
        return await self._template.encode_async(messages, self._chat_tokenizer, **extra)

    async def encode_text(self, text: str) -> list[int]:
        return await self._tokenize(text, special=False)

    async def _tokenize(self, text: str, *, special: bool) -> list[int]:
        """`special=True` reads control tokens such as `<|im_start|>` in rendered
        templates; user text in plain completions is tokenized literally."""
        def run() -> list[int]:
            return list(self.tokenizer(text, split_special_tokens=not special)["input_ids"])

        return run() if len(text) <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(run)

    async def generate(self, request: GenerationRequest) -> VllmStream:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import tokens_input

        params = self._sampling(request, self._check(request))
        # vLLM mixes the salt into its block hashes: no prefix is shared across scopes
        prompt = tokens_input(request.prompt_tokens, cache_salt=request.cache_scope or None)
        try:
            outputs = await self.llm.add_request(request.request_id, prompt, params,
                                                 priority=request.priority)
        except VLLMValidationError as exc:
            if request.constraint is None:
                raise
            raise EngineError(f"vLLM cannot use this response format: {exc}"[:400],
                              param="response_format") from None
        stream = VllmStream(self, request.request_id, len(request.prompt_tokens), outputs,
                            request.logprobs)
        self._streams[request.request_id] = stream
        return stream

    @staticmethod
    def _sampling(request: GenerationRequest, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        return SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
            seed=s.seed, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, repetition_penalty=s.repetition_penalty,
            max_tokens=max_tokens, stop=list(request.stop),
            output_kind=RequestOutputKind.DELTA, logprobs=request.logprobs,
            logit_bias=dict(request.logit_bias) or None,
            structured_outputs=structured_outputs(request.constraint),
        )

    def _check(self, request: GenerationRequest) -> int:
        """Refuse what cannot run; return the effective completion limit."""
        return completion_limit(request, self.info().context_length,
                                self.llm.model_config.get_vocab_size())

    def abort(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def forget(self, stream: VllmStream) -> None:
        self._streams.pop(stream.request_id, None)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """A vLLM engine runs one task; this one generates (its info says so)."""
        raise not_embedding(self.model_id)

    def info(self) -> EngineInfo:
        llm = self.llm
        return EngineInfo(self.model_id, llm.model_config.max_model_len,
                          llm.vllm_config.scheduler_config.max_num_seqs, self.kind,
                          chat_template=self._template.source if self._template else None)

    def stats(self) -> EngineStats:
        """Running: requests vLLM has started answering; waiting: the others. vLLM's KV
        cache lives in its own process, so its fill is not reported here."""
        running = sum(s.started for s in self._streams.values())
        total = 0
        if self._llm is not None:
            cache = self._llm.vllm_config.cache_config
            total = (cache.num_gpu_blocks or 0) * cache.block_size
        return EngineStats(running, len(self._streams) - running,
                           round(self.meter.rate, 2), 0, total)
