"""Every error case over raw HTTP: status code and OpenAI's envelope {"error": {message, type, param, code}}."""

from __future__ import annotations

import concurrent.futures

import pytest

from api_helpers import CHAT, COMPLETIONS, assert_error, chat_body, stream_chunks

USER = [{"role": "user", "content": "hi"}]

# (name, body, param) -> 400 invalid_request_error
BAD_CHAT = [
    ("missing messages", {"model": "x"}, "messages"),
    ("empty messages", {"model": "x", "messages": []}, "messages"),
    ("messages not a list", {"model": "x", "messages": "hi"}, "messages"),
    ("unknown role", {"model": "x", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0]"),
    ("missing role", {"model": "x", "messages": [{"content": "hi"}]}, "messages[0]"),
    ("missing content", {"model": "x", "messages": [{"role": "user"}]}, "messages[0].content"),
    ("content wrong type", {"model": "x", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("empty parts", {"model": "x", "messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ("text part without text", {"model": "x", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ("unknown message field", {"model": "x", "messages": [{"role": "user", "content": "hi", "mood": "ok"}]},
     "messages[0].mood"),
    ("tool message without id", {"model": "x", "messages": [{"role": "tool", "content": "4"}]},
     "messages[0].tool_call_id"),
    ("assistant without content", {"model": "x", "messages": [{"role": "assistant"}]}, "messages[0].content"),
    ("unknown field", chat_body(frobnicate=1), "frobnicate"),
    ("temperature as string", chat_body(temperature="0.5"), "temperature"),
    ("temperature too high", chat_body(temperature=2.5), "temperature"),
    ("temperature negative", chat_body(temperature=-0.1), "temperature"),
    ("top_p too high", chat_body(top_p=1.5), "top_p"),
    ("max_tokens zero", chat_body(max_tokens=0), "max_tokens"),
    ("max_tokens float", chat_body(max_tokens=1.5), "max_tokens"),
    ("max_tokens bool", chat_body(max_tokens=True), "max_tokens"),
    ("conflicting budgets", chat_body(max_tokens=4, max_completion_tokens=5), "max_tokens"),
    ("n zero", chat_body(n=0), "n"),
    ("n above limit", chat_body(n=17), "n"),
    ("presence_penalty out of range", chat_body(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty out of range", chat_body(frequency_penalty=-3), "frequency_penalty"),
    ("repetition_penalty zero", chat_body(repetition_penalty=0), "repetition_penalty"),
    ("top_k below -1", chat_body(top_k=-2), "top_k"),
    ("min_p above 1", chat_body(min_p=1.5), "min_p"),
    ("seed too big", chat_body(seed=2**64), "seed"),
    ("stop too many", chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop wrong type", chat_body(stop=5), "stop"),
    ("logit_bias bad key", chat_body(logit_bias={"abc": 1}), "logit_bias"),
    ("logit_bias id out of vocab", chat_body(logit_bias={"99999999": 1}), "logit_bias"),
    ("logit_bias value out of range", chat_body(logit_bias={"5": 101}), "logit_bias"),
    ("top_logprobs without logprobs", chat_body(top_logprobs=2), "top_logprobs"),
    ("top_logprobs with logprobs false", chat_body(logprobs=False, top_logprobs=2), "top_logprobs"),
    ("top_logprobs above 20", chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("stream_options without stream", chat_body(stream_options={"include_usage": True}), "stream_options"),
    ("stream not bool", chat_body(stream="yes"), "stream"),
    ("tool_choice without tools", chat_body(tool_choice="auto"), "tool_choice"),
    ("parallel_tool_calls without tools", chat_body(parallel_tool_calls=True), "parallel_tool_calls"),
    ("empty tools", chat_body(tools=[]), "tools"),
    ("bad tool name", chat_body(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
     "tools[0].function.name"),
    ("tool_choice names unknown tool",
     chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
               tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    ("bad response_format", chat_body(response_format={"type": "xml"}), "response_format"),
    ("json_schema without name", chat_body(response_format={"type": "json_schema", "json_schema": {}}),
     "response_format.json_schema.name"),
]

# Valid OpenAI fields this server cannot honour: 400 "not supported", never ignored.
UNSUPPORTED_CHAT = [
    ("image part", {"model": "x", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, "messages[0].content[0]"),
    ("audio part", {"model": "x", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages[0].content[0]"),
    ("file part", {"model": "x", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "f"}}]}]}, "messages[0].content[0]"),
    ("function role", {"model": "x", "messages": [{"role": "function", "name": "f", "content": "1"}]},
     "messages[0].role"),
    ("audio output", chat_body(modalities=["text", "audio"]), "modalities"),
    ("audio param", chat_body(audio={"voice": "alloy", "format": "wav"}), "audio"),
    ("prediction", chat_body(prediction={"type": "content", "content": "x"}), "prediction"),
    ("functions", chat_body(functions=[{"name": "f"}]), "functions"),
    ("function_call", chat_body(function_call="auto"), "function_call"),
    ("web search", chat_body(web_search_options={}), "web_search_options"),
    ("verbosity", chat_body(verbosity="low"), "verbosity"),
    ("store", chat_body(store=True), "store"),
    ("custom tool", chat_body(tools=[{"type": "custom", "custom": {"name": "c"}}]), "tools[0]"),
]


@pytest.mark.parametrize("name,body,param", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_request(http, schema, name, body, param):
    error = assert_error(http.post(CHAT, json=body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    schema({"error": error}, "ErrorResponse")


@pytest.mark.parametrize("name,body,param", UNSUPPORTED_CHAT, ids=[c[0] for c in UNSUPPORTED_CHAT])
def test_unsupported_chat_field(http, name, body, param):
    error = assert_error(http.post(CHAT, json=body), 400, param=param, code="unsupported_parameter")
    assert "not supported" in error["message"]


def test_messages_are_named_in_errors(http):
    error = assert_error(http.post(CHAT, json=chat_body(frobnicate=1)), 400)
    assert error["message"] == "Unrecognized request argument supplied: frobnicate"
    error = assert_error(http.post(CHAT, json={"model": "x"}), 400)
    assert "messages" in error["message"]


LONE_SURROGATE = b'{"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "a\\ud800b"}]}'


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"null", b'{"model": NaN}', b"\xff\xfe",
                                 b'{"model": "x", "messages": [{"role": "user", "content": "hi"}]', LONE_SURROGATE])
def test_bad_json(http, raw):
    response = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, code="invalid_json")


def test_surrogate_pairs_are_fine(http):
    body = b'{"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert http.post(CHAT, content=body, headers={"content-type": "application/json"}).status_code == 200


def test_context_length_exceeded(http):
    error = assert_error(http.post(CHAT, json=chat_body("word " * 1200)), 400, code="context_length_exceeded")
    assert "1024" in error["message"]  # says the numbers
    error = assert_error(http.post(CHAT, json=chat_body(max_tokens=1020)), 400, code="context_length_exceeded")
    assert "1020" in error["message"]


def test_huge_prompt_is_refused_before_tokenizing(http):
    """~900 KB of text cannot fit 1024 tokens whatever the tokenizer does; the answer says so at once."""
    error = assert_error(http.post(CHAT, json=chat_body("lorem ipsum " * 75000)), 400, param="messages",
                         code="context_length_exceeded")
    assert "at least" in error["message"]
    assert_error(http.post(COMPLETIONS, json={"model": "x", "prompt": "lorem " * 150000}), 400, param="prompt",
                 code="context_length_exceeded")


BAD_COMPLETIONS = [
    ("missing model", {"prompt": "x"}, "model", None),
    ("prompt wrong type", {"model": "x", "prompt": 5}, "prompt", None),
    ("empty prompt list", {"model": "x", "prompt": []}, "prompt", None),
    ("negative token id", {"model": "x", "prompt": [1, -2]}, "prompt", None),
    ("token id out of vocab", {"model": "x", "prompt": [1, 10**9]}, "prompt", None),
    ("logprobs above 20", {"model": "x", "prompt": "a", "logprobs": 21}, "logprobs", None),
    ("best_of below n", {"model": "x", "prompt": "a", "n": 2, "best_of": 1}, "best_of", None),
    ("max_tokens negative", {"model": "x", "prompt": "a", "max_tokens": -1}, "max_tokens", None),
]


@pytest.mark.parametrize("name,body,param,_", BAD_COMPLETIONS, ids=[c[0] for c in BAD_COMPLETIONS])
def test_bad_completion_request(http, name, body, param, _):
    error = assert_error(http.post(COMPLETIONS, json=body), 400)
    assert error["param"].startswith(param), error  # e.g. "prompt[1]" for a bad token id


@pytest.mark.parametrize("field,value", [("echo", True), ("suffix", "end"), ("best_of", 3)])
def test_unsupported_completion_field(http, field, value):
    body = {"model": "x", "prompt": "a", "max_tokens": 2, field: value}
    assert_error(http.post(COMPLETIONS, json=body), 400, param=field, code="unsupported_parameter")


def test_completion_context_length(http):
    assert_error(http.post(COMPLETIONS, json={"model": "x", "prompt": "word " * 1200}), 400,
                 code="context_length_exceeded")
    assert_error(http.post(COMPLETIONS, json={"model": "x", "prompt": "word " * 1200, "max_tokens": 0}), 400,
                 code="context_length_exceeded")


def test_unknown_route_404(http, schema):
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/chat/complete"), ("GET", "/")):
        error = assert_error(http.request(method, path), 404, code="unknown_url")
        assert path in error["message"]
        schema({"error": error}, "ErrorResponse")


def test_unknown_model_404(http):
    error = assert_error(http.get("/v1/models/meta-llama/Llama-4-Maverick"), 404, param="model",
                         code="model_not_found")
    assert "meta-llama/Llama-4-Maverick" in error["message"]


def test_wrong_method_405(http):
    assert_error(http.get(CHAT), 405, code="method_not_allowed")
    assert_error(http.post("/v1/models"), 405)


def test_body_too_large_413(http):
    big = "x" * (1 << 20)  # over the 1 MiB limit the test server runs with
    assert_error(http.post(CHAT, json=chat_body(big)), 413, code="request_too_large")


def test_body_too_large_chunked_413(http):
    def chunks():
        for _ in range(20):
            yield b"x" * 65536

    response = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, code="request_too_large")


def test_bad_requests_do_not_disturb_others(http):
    """A stream keeps going while bad requests hammer the server; the server stays healthy."""
    bad = [b"{", b"[]", b'{"model": 1}', b'{"model":"x","messages":[{"role":"user","content":"hi"}],"n":99}']

    def hammer() -> list[int]:
        return [http.post(CHAT, content=raw, headers={"content-type": "application/json"}).status_code
                for raw in bad * 10]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(stream_chunks, http, CHAT, chat_body(max_tokens=12, stream=True))
        statuses = pool.submit(hammer).result()
        chunks = stream.result()
    assert set(statuses) == {400}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert http.get("/health").status_code == 200
