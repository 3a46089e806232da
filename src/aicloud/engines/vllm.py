"""The vLLM engine: the Engine protocol over vLLM v1's `AsyncLLM`.

vLLM keeps its own scheduler (in an engine-core process), so this engine has no waiting
line of its own: requests go straight to vLLM with their priority, and vLLM's priority
scheduler orders them. We tokenize (the model's chat template in our Jinja sandbox, the
Hugging Face tokenizer), so the caller knows the prompt size before anything runs, and
vLLM only ever sees token ids. vLLM is imported lazily: it is an extra (`aicloud[vllm]`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aicloud.engines.base import (
    ChatMessage,
    EngineError,
    EngineInfo,
    EngineStats,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    Usage,
    completion_limit,
)
from aicloud.engines.events import EventQueue
from aicloud.engines.llamacpp.batcher import RateMeter
from aicloud.engines.llamacpp.chat import ChatTemplate
from aicloud.engines.llamacpp.model import ContextConfig
from aicloud.engines.llamacpp.weights import DEFAULT_CACHE
from aicloud.engines.vllm_convert import ensure_hf_folder

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import RequestOutputCollector

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 2048
DEFAULT_SEQUENCES = 32
INLINE_TOKENIZE_CHARS = 16_384
FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
          "abort": FinishReason.CANCELLED}  # anything else ("error", …) is an error


def default_context(folder: Path) -> int:
    """The model's context, at most 2048 tokens (as the llama.cpp engine sizes it)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    return min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)


class VllmStream(EventQueue):
    """The outputs of one vLLM request, turned into our events by a task on the loop."""

    def __init__(self, engine: VllmEngine, request_id: str, prompt_tokens: int,
                 outputs: RequestOutputCollector) -> None:
        super().__init__()
        self._engine = engine
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
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
        if not out.finished:
            if new.text:
                self._put(new.text, None)
            return
        reason = FINISH.get(str(new.finish_reason), FinishReason.ERROR)
        self._put(new.text, reason, cached=out.num_cached_tokens or 0)

    def _put(self, text: str, reason: FinishReason | None, cached: int = 0) -> None:
        usage = None if reason is None else Usage(self.prompt_tokens, self.completion_tokens,
                                                  cached)
        self.put(TokenEvent(text, self.completion_tokens, reason, usage))


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
        self._streams: dict[str, VllmStream] = {}
        self._aborts: set[asyncio.Task[None]] = set()
        self.meter = RateMeter()

    async def start(self) -> None:
        """Start vLLM's engine-core process (minutes on a CPU: it compiles the model)."""
        folder = await asyncio.to_thread(ensure_hf_folder, self.path, self._weights_cache)
        self._llm = await asyncio.to_thread(self._create, folder)
        tokenizer = self.tokenizer
        self._template = ChatTemplate(tokenizer.chat_template, bos_token=tokenizer.bos_token
                                      or "", eos_token=tokenizer.eos_token or "")

    def _create(self, folder: Path) -> AsyncLLM:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        config = self._requested
        args = AsyncEngineArgs(
            model=str(folder), served_model_name=[self.model_id],
            max_model_len=config.context_per_sequence or default_context(folder),
            max_num_seqs=config.sequences or DEFAULT_SEQUENCES,
            kv_cache_memory_bytes=config.kv_budget_mb << 20,
            scheduling_policy="priority", enable_prefix_caching=True,
            enforce_eager=self.eager, disable_log_stats=True,
        )
        return AsyncLLM.from_engine_args(args)

    async def close(self) -> None:
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

    async def encode_chat(self, messages: list[ChatMessage],
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        if self._template is None:
            raise EngineError(f"model {self.model_id} is not loaded")
        return await self._tokenize(self._template.render(messages, tools), special=True)

    async def encode_text(self, text: str) -> list[int]:
        return await self._tokenize(text, special=False)

    async def _tokenize(self, text: str, *, special: bool) -> list[int]:
        """`special=True` reads control tokens such as `<|im_start|>` in rendered
        templates; user text in plain completions is tokenized literally."""
        def run() -> list[int]:
            return list(self.tokenizer(text, split_special_tokens=not special)["input_ids"])

        return run() if len(text) <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(run)

    async def generate(self, request: GenerationRequest) -> VllmStream:
        from vllm.inputs import tokens_input

        params = self._sampling(request, self._check(request))
        outputs = await self.llm.add_request(
            request.request_id, tokens_input(request.prompt_tokens),
            params, priority=request.priority)
        stream = VllmStream(self, request.request_id, len(request.prompt_tokens), outputs)
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
            output_kind=RequestOutputKind.DELTA,
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

    def info(self) -> EngineInfo:
        llm = self.llm
        return EngineInfo(self.model_id, llm.model_config.max_model_len,
                          llm.vllm_config.scheduler_config.max_num_seqs, self.kind,
                          self._template.source if self._template else None)

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
