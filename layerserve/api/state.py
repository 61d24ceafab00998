"""What the app holds (on `app.state.server`): config, and once loaded, the engine and its helpers."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import os
import pathlib
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from layerserve.api.admission import Admission
from layerserve.api.errors import DrainingError, InvalidRequestError, ModelNotReadyError
from layerserve.api.logprobs import TokenText
from layerserve.api.observe import Observability, RequestMetrics
from layerserve.config import EngineConfig, ServerConfig
from layerserve.engine.async_engine import AsyncEngine
from layerserve.engine.builder import EngineInfo
from layerserve.model.guided import GrammarCompiler
from layerserve.text.chat_template import ChatTemplate
from layerserve.text.tool_parsers import TOOL_FORMATS, ToolFormat

log = logging.getLogger("layerserve.api")

# Used when a model ships no chat template: plain ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

EngineLoader = Callable[[EngineConfig], tuple]  # EngineConfig -> (EngineCore, EngineInfo)

# Threads that prepare requests (template rendering, tokenizing, tool planning with schema
# checks, grammar compilation) off the event loop, so one heavy request never stalls the streams.
# Two: one heavy prompt does not hold up every other request's preparation, and on two cores
# more would only contend with the engine thread. No torch runs on them (an OpenMP team per
# thread that ran torch would compete with the engine's).
PREP_THREADS = 2
PREP_THREAD_NAME = "layerserve-prep"

T = TypeVar("T")


def prep_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix=PREP_THREAD_NAME)


@dataclass(slots=True)
class Runtime:
    """Everything that exists once the model is loaded."""

    engine: AsyncEngine
    info: EngineInfo
    template: ChatTemplate
    token_text: TokenText
    fingerprint: str  # system_fingerprint: changes when the weights or dtype change
    max_token_bytes: int  # the longest token's length in bytes
    tool_format: ToolFormat  # how this model calls tools (from its chat template)
    grammars: GrammarCompiler  # constrained decoding: tool calls, response_format
    prep: ThreadPoolExecutor  # see PREP_THREADS: made at load, shut down by `close`

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def offload(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a prep thread (with this task's context variables); what it
        raises (an InvalidRequestError: a 400) is raised here."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.prep, call)

    def check_fits(self, chars: int, param: str) -> None:
        """Refuse a text of `chars` characters that cannot fit the context, before tokenizing it: a
        token covers at most `max_token_bytes` bytes (so at least as many characters), so the text
        needs at least chars // max_token_bytes tokens."""
        limit = self.engine.max_model_len
        if chars // self.max_token_bytes >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, the {param} of your request "
                f"take at least {chars // self.max_token_bytes} tokens. Please shorten them.", param,
                "context_length_exceeded")

    def encode_raw(self, text: str, *, add_special_tokens: bool, param: str | None = None) -> list[int]:
        """Token ids of a raw prompt, on the calling thread (a prep thread: see `offload`).
        Special-token strings in it are parsed: its author writes the whole prompt, markup
        included (chat prompts go through `chat_prompt.template_prompt_ids` instead). With
        `param`, `check_fits` first."""
        if param is not None:
            self.check_fits(len(text), param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def close(self) -> None:
        """Stop the prep threads (a preparation still running finishes; queued ones are dropped)."""
        self.prep.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class ServerState:
    config: ServerConfig
    engine_config: EngineConfig
    created: int = field(default_factory=lambda: int(time.time()))
    runtime: Runtime | None = None
    load_error: str | None = None
    draining: bool = False  # set on SIGTERM/SIGINT: /health is 503 and new requests are refused
    admission: Admission = field(init=False)
    observability: Observability = field(init=False)
    sessions: Any = None  # the SessionStore (layerserve.sessions.store), once the model is loaded

    def __post_init__(self) -> None:
        self.admission = Admission(self.engine_config.scheduler.max_num_seqs, self.config.max_queued_requests,
                                   self.config.max_queued_tokens)
        self.observability = Observability(self)

    @property
    def metrics(self) -> RequestMetrics:
        return self.observability.requests

    def ready(self) -> Runtime:
        """The runtime, or 503: while loading, after a failed load, or while shutting down."""
        if self.draining:
            raise DrainingError("The server is shutting down; retry on another instance.")
        if self.runtime is not None:
            if not self.runtime.engine.running:
                raise ModelNotReadyError("The engine has stopped; see the server log.")
            return self.runtime
        if self.load_error is not None:
            raise ModelNotReadyError("The model failed to load; the server log says why.")
        raise ModelNotReadyError("The model is still loading; retry shortly.")

    @property
    def max_n(self) -> int:
        return min(self.config.max_n, self.engine_config.scheduler.max_num_seqs)

    async def load(self, loader: EngineLoader) -> None:
        """Build the engine on its own thread (the event loop keeps answering /health with 503)."""
        try:
            engine, (info, max_token_bytes) = await AsyncEngine.launch(lambda: self._build(loader))
            tokenizer = engine.tokenizer
            source = tokenizer.chat_template
            if not source:
                log.warning("the model has no chat template; using ChatML")
                source = CHATML_TEMPLATE
            template = ChatTemplate(source, tokenizer.bos_token, tokenizer.eos_token)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the model failed")
            return
        digest = hashlib.sha256(f"{info.model_path}|{info.dtype}|{info.model_config}".encode()).hexdigest()
        tool_format = TOOL_FORMATS.for_tokenizer(tokenizer, self.config.tool_call_format)
        self.runtime = Runtime(engine, info, template, TokenText(tokenizer), f"fp_{digest[:10]}", max_token_bytes,
                               tool_format, GrammarCompiler(tokenizer), prep_executor())
        try:
            await self._open_sessions(self.runtime)
        except Exception as exc:
            self.load_error = f"sessions: {type(exc).__name__}: {exc}"
            log.exception("restoring sessions failed")
            self.runtime = None
            return
        log.info("model loaded in %.1fs: %s (%s, max_model_len %d, %d KV blocks of %d tokens = %.0f MiB, "
                 "max_num_seqs %d, prefix cache %s, tool format %s)",
                 info.load_seconds, info.model_path, info.dtype, info.max_model_len, info.num_blocks,
                 info.block_size, info.kv_cache_bytes / (1 << 20),
                 self.engine_config.scheduler.max_num_seqs,
                 "on" if self.engine_config.cache.enable_prefix_caching else "off", tool_format.name)

    async def _open_sessions(self, rt: Runtime) -> None:
        from layerserve.sessions.journal import Journal
        from layerserve.sessions.store import SessionStore

        directory = session_dir(self.config)
        journal = Journal(directory, owner=self.config.replica)  # a cluster's replica locks what it holds
        store = SessionStore(rt, journal, max_sessions=self.config.max_sessions,
                             ttl=self.config.session_ttl, metrics=self.metrics)
        restored = await rt.offload(store.restore)
        store.start()
        self.sessions = store
        log.info("sessions: %d restored from %s", restored, directory)

    def session_counters(self) -> dict[str, int]:
        return self.sessions.counters() if self.sessions is not None else {"sessions": 0}

    def _build(self, loader: EngineLoader) -> tuple:
        core, info = loader(self.engine_config)
        tokenizer = core.tokenizer
        max_token_bytes = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
        tokenizer.encode_plain("")  # builds its plain-text copies now rather than in the first chat request
        return core, (info, max(max_token_bytes, 1))

    async def close(self) -> None:
        if self.sessions is not None:
            await self.sessions.close()
        if self.runtime is not None:
            await self.runtime.engine.stop()
            self.runtime.close()


def session_dir(config: ServerConfig) -> pathlib.Path:
    """Where session journals live: --session-dir, $LAYERSERVE_SESSION_DIR, or the user's cache dir
    by port and model."""
    if config.session_dir is not None:
        return pathlib.Path(config.session_dir)
    if os.environ.get("LAYERSERVE_SESSION_DIR"):
        return pathlib.Path(os.environ["LAYERSERVE_SESSION_DIR"])
    base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    model = re.sub(r"[^A-Za-z0-9_.-]", "_", config.served_model_name)
    return base / "layerserve" / "sessions" / f"{config.port}-{model}"


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def runtime(request: Request) -> Runtime:
    return request.app.state.server.ready()
