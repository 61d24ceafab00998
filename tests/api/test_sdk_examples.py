"""The issue's examples, run with the official `openai` Python SDK against the real server.

The code is the examples' own (model name included) but for `base_url` and `max_tokens`, which is
cut to EXAMPLE_MAX_TOKENS so the suite stays fast on a 2-core CPU (set LAYERSERVE_EXAMPLE_MAX_TOKENS=0
to run them with their original 300/200).
"""

from __future__ import annotations

import os

from openai import OpenAI

_LIMIT = int(os.environ.get("LAYERSERVE_EXAMPLE_MAX_TOKENS", "24"))


def budget(original: int) -> int:
    return min(original, _LIMIT) if _LIMIT > 0 else original


def test_chat_completion_example(server, schema):
    client = OpenAI(base_url=server.v1, api_key="your-api-key")
    response = client.chat.completions.create(
        model="meta-llama/Llama-4-Maverick-17B-128E-Original",
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Explain the difference between TCP and UDP."}],
        max_tokens=budget(300), temperature=0.7)
    print(response.choices[0].message.content)

    assert response.choices[0].message.content
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == "SmolLM2-135M-Instruct"  # any model name is accepted; the server names its own
    assert response.system_fingerprint.startswith("fp_")
    usage = response.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= budget(300)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0
    schema(response.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")


def test_streaming_example(server, capsys):
    client = OpenAI(base_url=server.v1, api_key="your-api-key")
    stream = client.chat.completions.create(
        model="meta-llama/Llama-4-Maverick-17B-128E-Original",
        messages=[
            {"role": "user", "content": "Write a short poem about distributed systems."},
        ],
        max_tokens=budget(200),
        stream=True,
    )
    for chunk in stream:
        content = chunk.choices[0].delta.content
        if content:
            print(content, end="", flush=True)
    print()

    printed = capsys.readouterr().out
    assert printed.strip(), "the stream carried no content"


def test_multi_turn_example(server):
    client = OpenAI(base_url=server.v1, api_key="your-api-key")
    messages = [
        {"role": "system", "content": "You are a Python tutor."},
        {"role": "user", "content": "What is a list comprehension?"},
    ]
    response = client.chat.completions.create(
        model="meta-llama/Llama-4-Maverick-17B-128E-Original", messages=messages, max_tokens=budget(200)
    )
    messages.append({"role": "assistant", "content": response.choices[0].message.content})
    # Follow-up question
    messages.append({"role": "user", "content": "Show me a nested example."})
    follow_up = client.chat.completions.create(
        model="meta-llama/Llama-4-Maverick-17B-128E-Original", messages=messages, max_tokens=budget(200)
    )
    print(follow_up.choices[0].message.content)

    assert follow_up.choices[0].message.content
    # The second turn's prompt extends the first one: the server reuses the cached KV of turn one.
    assert follow_up.usage.prompt_tokens > response.usage.prompt_tokens
    assert follow_up.usage.prompt_tokens_details.cached_tokens >= 16


def test_migration_two_lines(server):
    """'change two lines': the client object is all that differs from code written for OpenAI."""
    client = OpenAI(base_url=server.v1, api_key="your-api-key")
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
