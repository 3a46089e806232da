"""How the pool turns a catalog entry into an engine, by engine kind. `cli.build_pool` fills
the registry (it knows the server's settings); the pool only asks it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aicloud.engines.base import Engine, EngineError
from aicloud.engines.llamacpp.model import ModelLoadError, check_gguf_path
from aicloud.engines.upstream_count import TOKENIZER, check_tokenizer
from aicloud.models.catalog import CatalogEntry, EngineKind

EngineFactory = Callable[[CatalogEntry], Engine]
# bytes of this machine's memory the entry's engine will take once loaded (an estimate)
MemoryEstimator = Callable[[CatalogEntry], int]


@dataclass(slots=True, frozen=True)
class EngineKinds:
    """The engine kinds this server can run. A kind without a factory (vLLM without its
    extra, upstream models before providers are configured) fails to load with a message
    that says so. A kind without an estimator takes none of the budget (a remote
    provider, replicas placed by Ray on other machines)."""

    factories: Mapping[EngineKind, EngineFactory]
    estimators: Mapping[EngineKind, MemoryEstimator] = field(default_factory=dict)

    def build(self, entry: CatalogEntry) -> Engine:
        factory = self.factories.get(entry.engine)
        if factory is None:
            raise ModelLoadError(f"this server cannot run {entry.engine.value} models "
                                 f"(model {entry.id})")
        return factory(entry)

    def estimate(self, entry: CatalogEntry) -> int:
        estimator = self.estimators.get(entry.engine)
        return estimator(entry) if estimator is not None else 0


def check_source(entry: CatalogEntry) -> CatalogEntry:
    """A local model's source as an absolute path to what its engine reads (a regular
    GGUF file; for vLLM, a Hugging Face folder or a GGUF), refused with a clear error
    otherwise: a missing file, a device, a folder for llama.cpp. An upstream model's
    `options["tokenizer"]` is checked the same way (a GGUF llama.cpp reads). Reads the disk."""
    if entry.engine is EngineKind.UPSTREAM:
        return _with_tokenizer(entry)
    if TOKENIZER in entry.options:
        raise EngineError("options.tokenizer is for upstream models: a local model counts "
                          "with its own", param="options.tokenizer")
    if entry.engine is EngineKind.VLLM:
        from aicloud.engines.vllm_convert import check_model_path

        resolved = check_model_path(entry.path)
    else:
        resolved = check_gguf_path(entry.path)
    return dataclasses.replace(entry, source=str(resolved))


def _with_tokenizer(entry: CatalogEntry) -> CatalogEntry:
    if TOKENIZER not in entry.options:
        return entry
    path = check_tokenizer(entry.options[TOKENIZER])
    return dataclasses.replace(entry, options={**entry.options, TOKENIZER: path})
