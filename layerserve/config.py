"""Typed configuration, built once (from the CLI or a script) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape of a Llama-family model. Filled from GGUF metadata or a HF config.json."""

    architecture: str  # registry key, e.g. "llama", "qwen2", "qwen3", "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling dict (llama3 type supported)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None  # not supported yet; kept for validation messages


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int = 1 << 30  # bytes for the KV pool (all layers, K and V)
    num_blocks: int | None = None  # overrides kv_cache_memory when set (tests)
    enable_prefix_caching: bool = True


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_model_len: int = 8192  # prompt + completion
    background_share: float = 0.25  # of each step's budget, kept for background work (session ingest) when it has some


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Prompt-lookup speculative decoding (layerserve/engine/draft.py): a decoding sequence whose last
    tokens occurred earlier in its prompt or output drafts the tokens that followed them there, and
    one forward verifies them. Drafting only pays while a step is memory-bound (few rows), hence
    max_batch."""

    num_draft_tokens: int = 3  # most tokens drafted per sequence and step
    min_ngram: int = 3  # shortest suffix that must match earlier tokens
    max_ngram: int = 5  # longest suffix tried first
    max_batch: int = 2  # draft only while at most this many sequences are running


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str  # path or registry name
    dtype: str = "auto"  # the fast path: kernels measured per CPU, the GGUF's own quantization kept
    compile: bool = True  # auto: steps of few rows run as one C++ call (model/compiled_step.py); False: eager torch
    speculative: SpeculativeConfig | None = field(default_factory=SpeculativeConfig)  # None: no drafting
    device: str = "cpu"
    num_threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP layer's settings (`layerserve serve` flags)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # required on /v1/* and the tokenizer routes when set
    served_model_name: str = "SmolLM2-135M-Instruct"  # the `model` in responses; requests may name any
    max_body_bytes: int = 16 << 20  # larger request bodies get 413
    max_n: int = 16  # most choices per request (also capped by the scheduler's max_num_seqs)
    max_messages: int = 2048  # messages in one chat request
    max_tools: int = 128  # tools in one chat request
    max_prompts: int = 256  # prompts in one legacy /v1/completions request
    max_queued_requests: int = 256  # sequences (prompts x n) waiting beyond those running; past it: 429
    max_queued_tokens: int = 1 << 20  # prompt tokens of all admitted sequences; past it: 429
    request_timeout: float | None = None  # seconds a request may run (None: no bound but the client's)
    shutdown_timeout: float = 30.0  # on SIGTERM/SIGINT: seconds to let in-flight requests finish
    log_prompts: bool = False  # include prompt text in the per-request log line
    tool_call_format: str | None = None  # None: detected from the chat template (generic as fallback)
    max_sessions: int = 64  # live sessions at once (the KV pool is the real limit)
    session_ttl: float = 3600.0  # seconds a session may sit unused before it is deleted
    session_dir: str | None = None  # session journals; None: under the user's cache dir, by port and model
    debug: bool = False  # /debug/* routes (a session's held token ids)
    replica: str | None = None  # this server's name as one replica of a cluster: sessions are adopted, not restored
    log_level: str = "info"
