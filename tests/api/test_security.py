"""Hostile input against the real server: template injection through request data, URLs and file
paths that must never be opened, request limits (n, messages, tools, max_tokens, schema depth and
size, body size). Every refusal is a 400 (or 413) in OpenAI's error envelope, naming the field."""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from api_helpers import CHAT, COMPLETIONS, assert_error, chat_body

from layerserve.config import SchedulerConfig, ServerConfig
from layerserve.text.tool_parsers.schema import MAX_SCHEMA_DEPTH, MAX_SCHEMA_NODES

DEFAULTS = ServerConfig()  # the test server runs with the default request limits
MAX_N = min(DEFAULTS.max_n, SchedulerConfig().max_num_seqs)
MAX_MODEL_LEN = 1024  # conftest.MAX_MODEL_LEN
MAX_BODY_BYTES = 1 << 20  # conftest.MAX_BODY_BYTES


# ---- template injection through request data --------------------------------------------------
SSTI_TEXT = [
    "{{ 7*7 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ config.items() }}",
    "{% for x in ().__class__.__base__.__subclasses__() %}{{ x }}{% endfor %}",
    "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ ''|attr('__class__') }}",
    "{% raw %}{#",
]


def _prompt_text(http: httpx.Client, messages: list[dict[str, Any]]) -> str:
    """The prompt the server renders for `messages`, as text (POST /tokenize, then /detokenize)."""
    response = http.post("/tokenize", json={"messages": messages})
    assert response.status_code == 200, response.text
    tokens = response.json()["tokens"]
    response = http.post("/detokenize", json={"tokens": tokens})
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


def _conversation(text: str) -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": text}}
    return [
        {"role": "system", "content": text},
        {"role": "user", "content": [{"type": "text", "text": text}], "name": "u"},
        {"role": "assistant", "content": text, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": text},
        {"role": "user", "content": text},
    ]


@pytest.mark.parametrize("text", SSTI_TEXT)
def test_message_text_is_rendered_literally(http: httpx.Client, text: str) -> None:
    """Template syntax in any message is data: the prompt is exactly the one for a harmless
    placeholder with the text put in its place, never evaluated (no "49", no Python objects)."""
    placeholder = "PLACEHOLDER"
    expected = _prompt_text(http, _conversation(placeholder)).replace(placeholder, text)
    # every message's content, and the call's arguments, which /tokenize renders as a chat request
    # does (the generic tool format writes "Calling f with {arguments}")
    assert expected.count(text) == 6
    assert _prompt_text(http, _conversation(text)) == expected


def test_seven_times_seven_is_not_forty_nine(http: httpx.Client) -> None:
    prompt = _prompt_text(http, [{"role": "user", "content": "{{ 7*7 }}"}])
    assert "<|im_start|>user\n{{ 7*7 }}<|im_end|>" in prompt
    assert "49" not in prompt


@pytest.mark.parametrize("value", [*SSTI_TEXT, {"nested": "{{ 7*7 }}"}, ["{{ 7*7 }}"]])
def test_chat_template_kwargs_values_are_data(http: httpx.Client, value: Any) -> None:
    """Extra template variables reach the template as plain data: the default template does not
    use them, so the prompt (and its token count) is the same as without them."""
    base = http.post(CHAT, json=chat_body("Hi", max_tokens=1))
    assert base.status_code == 200, base.text
    kwargs = {"enable_thinking": value, "payload": value, "raise_exception": value, "namespace": value}
    response = http.post(CHAT, json=chat_body("Hi", max_tokens=1, chat_template_kwargs=kwargs))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == base.json()["usage"]["prompt_tokens"]


def test_chat_template_kwargs_cannot_replace_the_conversation(http: httpx.Client) -> None:
    for name in ("messages", "tools", "add_generation_prompt", "documents"):
        body = chat_body(chat_template_kwargs={name: [{"role": "system", "content": "{{ 7*7 }}"}]})
        assert_error(http.post(CHAT, json=body), 400, param="chat_template_kwargs")


# ---- URLs and file paths are never opened -----------------------------------------------------
@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port nobody but the server under test could connect to."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield sock


def _connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.fixture
def fifo(tmp_path: pathlib.Path) -> pathlib.Path:
    """A named pipe with no writer: a server that opened it for reading would block forever, so the
    request would time out instead of being answered."""
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def _part_body(part: dict[str, Any]) -> dict[str, Any]:
    return {"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}


def test_image_urls_are_refused_without_fetching(http: httpx.Client, listener: socket.socket,
                                                 fifo: pathlib.Path) -> None:
    port = listener.getsockname()[1]
    urls = [
        "file:///etc/passwd",
        "file:///nonexistent/layerserve/secret.png",
        f"file://{fifo}",
        str(fifo),
        "/etc/shadow",
        f"http://127.0.0.1:{port}/image.png",
        f"https://127.0.0.1:{port}/image.png",
        "http://169.254.169.254/latest/meta-data/",
        "data:image/png;base64,iVBORw0KGgo=",
    ]
    errors = []
    for url in urls:
        for detail in (None, "high"):
            image = {"url": url} if detail is None else {"url": url, "detail": detail}
            response = http.post(CHAT, json=_part_body({"type": "image_url", "image_url": image}), timeout=30)
            errors.append(assert_error(response, 400, param="messages[0].content[0]", code="unsupported_parameter"))
    assert len({e["message"] for e in errors}) == 1  # the URL changes nothing: it was never looked at
    assert _connections(listener) == 0


@pytest.mark.parametrize("part", [
    {"type": "input_audio", "input_audio": {"data": "file:///etc/passwd", "format": "wav"}},
    {"type": "input_audio", "input_audio": {"url": "http://127.0.0.1:1/a.wav", "format": "mp3"}},
    {"type": "file", "file": {"file_id": "/etc/passwd"}},
    {"type": "file", "file": {"filename": "../../../../etc/passwd", "file_data": "data:;base64,AAAA"}},
    {"type": "file", "file": {"file_url": "file:///etc/passwd"}},
])
def test_audio_and_file_parts_are_refused(http: httpx.Client, part: dict[str, Any]) -> None:
    error = assert_error(http.post(CHAT, json=_part_body(part), timeout=30), 400, param="messages[0].content[0]",
                         code="unsupported_parameter")
    assert "passwd" not in error["message"]


def test_file_parts_in_every_role_and_endpoint(http: httpx.Client, fifo: pathlib.Path) -> None:
    part = {"type": "image_url", "image_url": {"url": f"file://{fifo}"}}
    body = {"model": "x", "max_tokens": 1, "messages": [{"role": "system", "content": "s"},
                                                         {"role": "user", "content": [{"type": "text", "text": "a"}, part]}]}
    assert_error(http.post(CHAT, json=body, timeout=30), 400, param="messages[1].content[1]")
    response = http.post("/tokenize", json={"messages": body["messages"]}, timeout=30)
    assert_error(response, 400, param="messages[1].content[1]")


# ---- limits -----------------------------------------------------------------------------------
def test_n_limit(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json=chat_body(n=MAX_N + 1)), 400, param="n")
    assert_error(http.post(CHAT, json=chat_body(n=10**12)), 400, param="n")
    assert_error(http.post(COMPLETIONS, json={"model": "x", "prompt": "a", "max_tokens": 1, "n": MAX_N + 1}),
                 400, param="n")
    response = http.post(CHAT, json=chat_body(n=MAX_N, max_tokens=1))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == MAX_N


def test_message_count_limit(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "a"}] * (DEFAULTS.max_messages + 1)
    error = assert_error(http.post(CHAT, json={"model": "x", "max_tokens": 1, "messages": messages}), 400,
                         param="messages")
    assert str(DEFAULTS.max_messages) in error["message"]
    assert_error(http.post("/tokenize", json={"messages": messages}), 400, param="messages")
    # at the limit the count is fine; this many messages are then simply longer than the context
    at_limit = {"model": "x", "max_tokens": 1, "messages": messages[:-1]}
    assert_error(http.post(CHAT, json=at_limit), 400, code="context_length_exceeded")


def _tool(i: int, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": f"tool_{i}"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def test_tool_count_limit(http: httpx.Client) -> None:
    tools = [_tool(i) for i in range(DEFAULTS.max_tools + 1)]
    error = assert_error(http.post(CHAT, json=chat_body(tools=tools)), 400, param="tools")
    assert str(DEFAULTS.max_tools) in error["message"]
    response = http.post(CHAT, json=chat_body(tools=tools[:-1]))
    assert response.status_code != 500
    if response.status_code != 200:  # 128 tool descriptions may not fit the 1024-token test context
        assert_error(response, 400, code="context_length_exceeded")


@pytest.mark.parametrize("path,field", [(CHAT, "max_tokens"), (CHAT, "max_completion_tokens"),
                                        (COMPLETIONS, "max_tokens")])
@pytest.mark.parametrize("value", [MAX_MODEL_LEN, 10**9, 2**63 - 1, 2**80])
def test_max_tokens_beyond_the_context(http: httpx.Client, path: str, field: str, value: int) -> None:
    body: dict[str, Any] = {"model": "x", field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"})
    error = assert_error(http.post(path, json=body), 400, code="context_length_exceeded")
    assert str(MAX_MODEL_LEN) in error["message"]


def _deep_schema(levels: int) -> dict[str, Any]:
    """Objects and arrays alternating, `levels` schemas deep, an object at the top."""
    schema: dict[str, Any] = {"type": "string"}
    for i in range(levels - 1):
        is_object = (levels - 2 - i) % 2 == 0
        schema = {"type": "object", "properties": {f"p{i}": schema}} if is_object else {"type": "array", "items": schema}
    return schema


def _response_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}


@pytest.mark.parametrize("levels", [MAX_SCHEMA_DEPTH + 1, 100, 400])
def test_deep_schemas_are_400_naming_the_field(http: httpx.Client, levels: int) -> None:
    deep = _deep_schema(levels)
    tools = [_tool(0, {"type": "object", "properties": {}}), _tool(1, deep)]
    error = assert_error(http.post(CHAT, json=chat_body(tools=tools)), 400, param="tools[1].function.parameters")
    assert "nested too deeply" in error["message"]
    error = assert_error(http.post(CHAT, json=chat_body(response_format=_response_format(deep))), 400,
                         param="response_format")
    assert "nested too deeply" in error["message"]


def test_schema_at_the_depth_limit_is_accepted(http: httpx.Client) -> None:
    schema = _deep_schema(MAX_SCHEMA_DEPTH)
    response = http.post(CHAT, json=chat_body(max_tokens=2, response_format=_response_format(schema)))
    assert response.status_code == 200, response.text


def test_ten_thousand_levels_are_refused(http: httpx.Client) -> None:
    """Too deep even to parse as JSON here (so written by hand); refused either way, and the
    server lives on."""
    levels = 10_000
    deep = '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels
    tool = '{"type": "function", "function": {"name": "f", "parameters": %s}}' % deep
    response_format = '{"type": "json_schema", "json_schema": {"name": "deep", "schema": %s}}' % deep
    head = '{"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], '
    for body in (head + f'"tools": [{tool}]}}', head + f'"response_format": {response_format}}}'):
        response = http.post(CHAT, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)
        assert_error(response, 400)
    assert http.post(CHAT, json=chat_body(max_tokens=1)).status_code == 200


def test_huge_schemas_are_400(http: httpx.Client) -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_NODES // 2)}}
    error = assert_error(http.post(CHAT, json=chat_body(tools=[_tool(0, wide)])), 400,
                         param="tools[0].function.parameters")
    assert "too large" in error["message"]
    enum = {"type": "string", "enum": list(range(MAX_SCHEMA_NODES))}
    error = assert_error(http.post(CHAT, json=chat_body(response_format=_response_format(enum))), 400,
                         param="response_format")
    assert "too large" in error["message"]


def test_body_over_the_limit_is_413_before_any_parsing(http: httpx.Client) -> None:
    # not even JSON: the size alone decides
    assert_error(http.post(CHAT, content=b"{" * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"}),
                 413, code="request_too_large")
    huge_schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40_000)}}
    assert_error(http.post(CHAT, json=chat_body(tools=[_tool(0, huge_schema)])), 413, code="request_too_large")
    assert_error(http.post("/tokenize", json={"prompt": "x" * MAX_BODY_BYTES}), 413, code="request_too_large")
    # just under the limit: parsed, and refused for what it says, not for its size
    body = chat_body("x")
    padding = MAX_BODY_BYTES - len(httpx.Request("POST", "/", json=body).content) - 64
    body["user"] = "u" * padding
    response = http.post(CHAT, json={**body, "max_tokens": 1})
    assert response.status_code == 200, response.text


# ---- deep request data outside schemas --------------------------------------------------------
def _raw_post(http: httpx.Client, path: str, body: str) -> httpx.Response:
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)


def _no_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error(response, response.status_code)


def test_deep_chat_template_kwargs_are_not_a_server_error(http: httpx.Client) -> None:
    deep = "[" * 600 + "]" * 600  # parses as JSON (the parser allows ~1000 levels)
    body = '{"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], ' \
           '"chat_template_kwargs": {"k": %s}}' % deep
    _no_server_error(_raw_post(http, CHAT, body))


@pytest.mark.parametrize("levels", [800, 5000])
def test_deep_tool_call_arguments_are_not_a_server_error(http: httpx.Client, levels: int) -> None:
    arguments = '{"a": ' * levels + "1" + "}" * levels  # a string in the body: any depth gets through
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]
    _no_server_error(http.post(CHAT, json={"model": "x", "max_tokens": 1, "messages": messages}, timeout=60))
