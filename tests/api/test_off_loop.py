"""Request preparation runs on the runtime's prep threads, never on the event loop: chat-template
rendering, tokenizing, tool / response_format planning with its JSON-schema checks, grammar
compilation and detokenizing a /detokenize body. A heavy request would otherwise stall every
stream. Checked by where the work ran (the thread), through real requests on the app with the
default model, not by a timer; and no torch runs there (its OpenMP team must stay the engine's)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from api_helpers import assert_error, chat_body

import layerserve.api.chat_prompt as chat_prompt
import layerserve.text.tools as tools_module
from layerserve.api.app import _default_loader, build_app
from layerserve.api.state import PREP_THREAD_NAME
from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from layerserve.model.guided import GrammarCompiler
from layerserve.text.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class Where:
    """Records which thread each wrapped function ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, threading.Thread]] = []

    def wrap(self, what: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((what, threading.current_thread()))
            return fn(*args, **kwargs)

        return recorded

    def kinds(self) -> set[str]:
        return {what for what, _ in self.calls}

    def off_loop(self, loop_thread: threading.Thread) -> None:
        on_loop = [what for what, thread in self.calls if thread is loop_thread]
        assert not on_loop, f"ran on the event loop: {sorted(set(on_loop))}"
        # (the engine thread decodes what it generates: that is its job, not preparation)
        elsewhere = {(what, t.name) for what, t in self.calls if not t.name.startswith(PREP_THREAD_NAME)
                     and not (what == "decode" and t.name == "layerserve-engine")}
        assert not elsewhere, f"ran outside the prep threads: {elsewhere}"


@pytest.fixture
async def app_where(monkeypatch):
    engine = EngineConfig(model="default", cache=CacheConfig(kv_cache_memory=64 << 20),
                          scheduler=SchedulerConfig(max_model_len=1024))
    app = build_app(engine, ServerConfig())
    state = app.state.server
    await state.load(_default_loader)
    assert state.runtime is not None, state.load_error
    rt = state.runtime
    where = Where()
    jinja = rt.template._template  # the jinja template itself: whoever calls it, the render is recorded
    monkeypatch.setattr(jinja, "render", where.wrap("render", jinja.render))
    for name in ("encode", "encode_prompt", "encode_plain", "decode"):
        if hasattr(Tokenizer, name):
            monkeypatch.setattr(Tokenizer, name, where.wrap(name.replace("_prompt", "").replace("_plain", ""),
                                                            getattr(Tokenizer, name)))
    monkeypatch.setattr(chat_prompt, "plan_chat", where.wrap("plan", chat_prompt.plan_chat))
    monkeypatch.setattr(tools_module, "schema_error", where.wrap("schema check", tools_module.schema_error))
    monkeypatch.setattr(GrammarCompiler, "compile", where.wrap("grammar compile", GrammarCompiler.compile))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=120) as client:
            yield client, where
    finally:
        await state.close()


def torch_watch() -> tuple[list[tuple[str, str]], Callable[..., None]]:
    """A profile hook for threads started from now on: records torch calls made on prep threads."""
    seen: list[tuple[str, str]] = []

    def hook(frame, event, arg):
        if event == "call":
            module = frame.f_globals.get("__name__") or ""
        elif event == "c_call":
            module = getattr(arg, "__module__", None) or ""
        else:
            return
        if module.startswith("torch") and threading.current_thread().name.startswith(PREP_THREAD_NAME):
            seen.append((module, getattr(arg, "__name__", None) or frame.f_code.co_name))

    return seen, hook


async def test_preparation_runs_on_prep_threads(app_where):
    client, where = app_where
    loop_thread = threading.current_thread()
    torch_calls, hook = torch_watch()
    threading.setprofile(hook)  # the prep threads start with the first request
    try:
        # a tool call (planned, schema checked, rendered, tokenized, grammar compiled: the first
        # compile builds llguidance's tokenizer trie)
        response = await client.post("/v1/chat/completions", json=chat_body(
            "What's the weather in Paris?", tools=[WEATHER], tool_choice="required", max_tokens=30))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] == "tool_calls"
        assert {"render", "encode", "plan", "schema check", "grammar compile"} <= where.kinds()
        # small talk with tools: the generic format routes, then renders a text answer request
        before = len([w for w, _ in where.calls if w == "render"])
        response = await client.post("/v1/chat/completions", json=chat_body(
            "Hi! Tell me a joke about cats.", tools=[WEATHER], max_tokens=30, seed=3))
        assert response.status_code == 200, response.text
        assert len([w for w, _ in where.calls if w == "render"]) - before == 2  # the routing and answer prompts
        # structured output, streamed
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(
                "Name a city.", response_format=SCHEMA_FORMAT, max_tokens=12, stream=True)) as stream:
            assert stream.status_code == 200
            assert (await stream.aread()).endswith(b"data: [DONE]\n\n")
        # legacy completions, /tokenize (both forms), /detokenize
        response = await client.post("/v1/completions", json={"model": "x", "prompt": ["Once", "upon"], "max_tokens": 2})
        assert response.status_code == 200, response.text
        for body in ({"prompt": "hello world"}, {"messages": [{"role": "user", "content": "hi"}]}):
            response = await client.post("/tokenize", json=body)
            assert response.status_code == 200 and response.json()["count"] > 0, response.text
        response = await client.post("/detokenize", json={"tokens": response.json()["tokens"]})
        assert response.status_code == 200 and "hi" in response.json()["prompt"]
    finally:
        threading.setprofile(None)
    assert {"render", "encode", "decode", "plan", "schema check", "grammar compile"} <= where.kinds()
    where.off_loop(loop_thread)
    assert not torch_calls, f"torch ran on a prep thread: {sorted(set(torch_calls))[:10]}"


async def test_errors_raised_on_prep_threads_are_the_same_400s(app_where):
    client, where = app_where
    loop_thread = threading.current_thread()
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}
    assert_error(await client.post("/v1/chat/completions", json=chat_body(response_format=bad_schema)), 400,
                 param="response_format", code=None)
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    assert_error(await client.post("/v1/chat/completions", json=chat_body(tools=[bad_tool])), 400,
                 param="tools[0].function.parameters")
    error = assert_error(await client.post("/v1/chat/completions", json=chat_body("word " * 60_000)), 400,
                         param="messages", code="context_length_exceeded")
    assert "maximum context length is 1024 tokens" in error["message"]
    assert_error(await client.post("/v1/completions", json={"model": "x", "prompt": "word " * 60_000}), 400,
                 param="prompt", code="context_length_exceeded")
    assert_error(await client.post("/v1/chat/completions", json=chat_body(
        messages=[{"role": "assistant", "content": None}])), 400, param="messages[0].content")
    assert_error(await client.post("/detokenize", json={"tokens": [10 ** 9]}), 400, param="tokens")
    assert {"plan", "schema check", "render"} <= where.kinds()
    where.off_loop(loop_thread)
    # and the server goes on serving
    response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert response.status_code == 200, response.text
