"""Settings from `AICLOUD_*` environment variables; the CLI overrides some per run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from aicloud.store.db import default_url

WEEK = 7 * 24 * 3600.0  # the longest keep_alive (catalog.MAX_KEEP_ALIVE)


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "aicloud"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AICLOUD_", extra="ignore")

    home: Path = Field(default=Path("~/.aicloud"), description="where aicloud keeps its data")
    database_url: str | None = Field(default=None, description="default: SQLite under home")
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[str] = Field(default_factory=list, description="ID=PATH or PATH of GGUF files")
    engine: Literal["llamacpp", "vllm"] = Field(
        default="llamacpp", description="llamacpp, or vllm (the vllm extra; Hugging Face "
        "folders, or GGUF files converted to one)")
    vllm_eager: bool = Field(default=False, description="vLLM without torch.compile: "
                             "starts in about a minute instead of several on a small CPU")
    sequences: int | None = Field(default=None, ge=1, le=256)
    context: int | None = Field(default=None, ge=64)
    threads: int | None = Field(default=None, ge=1)
    step_sequences: int | None = Field(
        default=None, ge=1, le=256, description="sequences decoded per step, in turns "
        "(default: 16 per thread)")
    batch_tokens: int = Field(default=512, ge=16, le=8192)
    adapt_threads: bool = Field(default=True, description="re-decide the decode thread "
                                "count by measuring (a busy neighbour makes fewer faster)")
    kv_budget_mb: int = Field(default=2048, ge=16)
    kv_cache: Literal["bf16", "f16", "q8_0"] = Field(
        default="bf16", description="type of the KV cache: bf16 (as vLLM keeps a bf16 "
        "model's), f16, or q8_0 (half the memory); with f16 a greedy text can depend on "
        "the batch it ran in")
    flash_attention: bool = Field(default=True, description="llama.cpp's flash attention "
                                  "(off: the plain matrix-product path, f16 or bf16 cache)")
    weights: str = Field(default="auto", description="auto (the faster of the file and "
                         "q4_0 here, measured once), native, q4_0, q8_0, bf16 or f16")
    weights_dir: Path | None = Field(default=None, description="re-typed weights and the "
                                     "format decisions (default: the user's cache, "
                                     "$XDG_CACHE_HOME/aicloud/weights)")
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    scheduling: Literal["vtc", "fcfs"] = Field(default="vtc",
                                               description="vtc (tenant-fair) or fcfs")
    fair_share_by: Literal["project", "key", "organization"] = "project"
    prefix_cache_scope: Literal["project", "key", "organization"] = Field(
        default="project", description="who may reuse a cached prompt prefix (and see it in "
        "cached_tokens): the same project, key or organization; cache_salt narrows it")
    max_queue: int = Field(default=1024, ge=1, description="waiting requests per model")
    max_queue_wait: float = Field(default=60.0, gt=0, description="seconds before a 429/503")
    input_token_weight: float = Field(default=1.0, ge=0)
    output_token_weight: float = Field(default=2.0, ge=0)
    metrics_public: bool = Field(default=False, description="serve /metrics without a key")
    cors_origins: str = Field(
        default="", description="browser origins allowed to call the API, comma separated "
        "(https://app.example.com,http://localhost:3000; * for any); empty: CORS off")
    ray_address: str | None = Field(default=None, description="auto, local or HOST:PORT")
    replicas: int = Field(default=1, ge=1, le=256)
    min_replicas: int | None = Field(default=None, ge=1, le=256)
    max_replicas: int | None = Field(default=None, ge=1, le=256)
    replica_cpus: float | None = Field(default=None, gt=0)
    scale_up_after: float = Field(default=2.0, gt=0, description="queue wait that adds one")
    scale_down_after: float = Field(default=60.0, gt=0, description="idle time that removes one")
    redis_url: str | None = Field(default=None, description="share rate limits through Redis")
    hold_seconds: float = Field(default=3600, ge=10,
                                description="how long a budget hold outlives a crashed server")
    instance_timeout: float = Field(
        default=60, ge=10, description="a server whose heartbeat is this old is dead: any "
        "other server bills its running requests as interrupted and releases its holds")
    log_level: str = "info"
    console: bool = Field(default=True, description="serve the admin console at /console")
    console_session_minutes: int = Field(default=480, ge=1, le=43200,
                                         description="a console sign-in lasts this long")
    console_sign_in_attempts: int = Field(
        default=10, ge=1, description="failed console sign-ins allowed per minute from one "
        "client address (a burst of as many, then one every 60/N s)")
    secret_key: SecretStr | None = Field(
        default=None, description="master key for provider secrets at rest (a Fernet key or "
        "a passphrase); default: a key file created in home with mode 0600")
    # the Files and Batch APIs
    files_dir: Path | None = Field(default=None, description="uploaded and batch output "
                                   "files (default: files/ under home)")
    max_file_bytes: int = Field(default=200 << 20, ge=1024, description="largest upload")
    batch_window: int = Field(default=32, ge=1, le=1024, description="lines of one batch "
                              "in flight at once (they wait in the batch class)")
    batch_yield_lines: int = Field(default=8, ge=1, le=1024, description="batch lines "
                                   "that may run on a model that cannot pause a sequence "
                                   "(vLLM, Ray) while interactive requests do")
    # the model pool (models/pool.py): memory budget, idle unloading, residency
    memory_budget_mb: int | None = Field(
        default=None, ge=16, description="memory the loaded models may take together "
        "(default: half of the machine's)")
    keep_alive: float = Field(default=300.0, ge=0, le=WEEK,
                              description="idle seconds before an unpinned model unloads")
    max_keep_alive: float = Field(
        default=3600.0, ge=0, le=WEEK,
        description="the most a request's X-Keep-Alive header may ask for")
    min_residency: float = Field(default=2.0, ge=0, description="seconds a loaded model "
                                 "stays before another load may evict it")
    load_wait: float = Field(default=30.0, ge=0, description="how long a load waits for "
                             "busy models to make room before its requests get a 503")

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def weights_cache(self) -> Path:
        """Derived from the model files and the machine only, so shared by every home on
        the machine: a new installation neither re-types a model nor times it again."""
        return (self.weights_dir or user_cache() / "weights").expanduser()

    @property
    def db_url(self) -> str:
        return self.database_url or default_url(self.home_dir)

    @property
    def files_path(self) -> Path:
        return (self.files_dir or self.home / "files").expanduser()

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    def prepare_home(self) -> None:
        self.home_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
