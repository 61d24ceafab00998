"""Chat completion features through the official Python SDK: n, stop, seed, logprobs, usage,
message forms, and the fields that are accepted and validated (tools, response_format)."""

from __future__ import annotations

import math

import openai
import pytest

MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_n_choices(openai_client, schema):
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content for c in response.choices)
    assert 3 <= response.usage.completion_tokens <= 3 * 6
    assert len({c.message.content for c in response.choices}) > 1, "three samples came out identical"
    schema(response.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")


def test_seed_reproducible(openai_client):
    def ask(seed: int) -> str:
        return openai_client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=seed).choices[0].message.content

    first = ask(1234)
    assert ask(1234) == first
    assert any(ask(seed) != first for seed in (1, 2, 3))


def test_extreme_seed_is_accepted(openai_client):
    for seed in (2**63 - 1, -(2**63)):
        response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, n=2, seed=seed)
        assert len(response.choices) == 2


def test_greedy_is_deterministic(openai_client):
    answers = {openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                     temperature=0).choices[0].message.content for _ in range(2)}
    assert len(answers) == 1


def test_stop_sequence(openai_client):
    base = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    text = base.choices[0].message.content
    assert len(text) >= 12, text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    stopped = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                    stop=[stop, "@@@"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]  # the stop text itself is not returned
    single = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                   stop=stop)
    assert single.choices[0].message.content == stopped.choices[0].message.content


def test_finish_reason_length(openai_client):
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_logprobs(openai_client, schema):
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0,
                                                     logprobs=True, top_logprobs=3)
    schema(response.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    text = b"".join(bytes(t.bytes) for t in content).decode("utf-8")
    assert text == response.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and math.isfinite(token.logprob)
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token
        assert len(token.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)


def test_logprobs_without_top(openai_client):
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in response.choices[0].logprobs.content)
    plain = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_logit_bias_forces_a_token(openai_client, http):
    token = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    expected = http.post("/detokenize", json={"tokens": [token] * 3}).json()["prompt"]
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3,
                                                     logit_bias={str(token): 100}, temperature=0)
    assert response.choices[0].message.content == expected


def test_stream_usage(openai_client):
    stream = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == 5 and usage.total_tokens == usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text


def test_usage_counts_cached_prompt_tokens(openai_client):
    messages = [{"role": "system", "content": "You answer in one word. " * 8},
                {"role": "user", "content": "Name a colour."}]
    openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    again = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= again.usage.prompt_tokens


def test_message_forms(openai_client):
    """developer role, content-part arrays, names, and a tool round trip in the history."""
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "What is 2+2?"},
                                                    {"type": "text", "text": "Answer with a digit."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    response = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert response.choices[0].message.content is not None


def test_tools_and_response_format_are_accepted(openai_client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"location": {"type": "string"}},
                                                              "required": ["location"]}}}]
    for tool_choice in ("auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}):
        response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, tools=tools,
                                                         tool_choice=tool_choice, parallel_tool_calls=False)
        assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    for response_format in ({"type": "text"}, {"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}):
        response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                                         response_format=response_format)
        assert response.choices


def test_accepted_metadata_fields(openai_client):
    response = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, user="user-1", metadata={"k": "v"}, store=False,
        service_tier="auto", prompt_cache_key="abc", safety_identifier="s1", modalities=["text"],
        presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, extra_body={"top_k": 20, "min_p": 0.05,
                                                                              "repetition_penalty": 1.1})
    assert response.service_tier == "default"


def test_sdk_raises_bad_request_with_code(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 1500}],
                                              max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    assert info.value.status_code == 400
