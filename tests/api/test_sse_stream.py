"""Raw-HTTP checks of the SSE stream: framing, chunk order, ids, finish reasons, usage, [DONE],
and every chunk against OpenAI's CreateChatCompletionStreamResponse schema."""

from __future__ import annotations

from collections import Counter

from api_helpers import CHAT, COMPLETIONS, chat_body, stream_chunks


def check_chat_stream(chunks: list[dict], n: int, include_usage: bool) -> dict[int, str]:
    """Assert OpenAI's streaming contract; returns the text per choice."""
    first = chunks[0]
    for chunk in chunks:
        assert (chunk["id"], chunk["created"], chunk["model"], chunk["object"]) == \
               (first["id"], first["created"], first["model"], "chat.completion.chunk")
        assert chunk["system_fingerprint"] == first["system_fingerprint"]
    body = chunks[:-1] if include_usage else chunks
    # one role chunk per choice, before any content of that choice
    seen_role: set[int] = set()
    finished: Counter[int] = Counter()
    texts: dict[int, str] = {i: "" for i in range(n)}
    for chunk in body:
        assert len(chunk["choices"]) == 1, chunk
        choice = chunk["choices"][0]
        index, delta = choice["index"], choice["delta"]
        assert 0 <= index < n
        assert finished[index] == 0, f"chunk after choice {index} finished: {chunk}"
        if "role" in delta:
            assert delta == {"role": "assistant", "content": ""} and index not in seen_role
            seen_role.add(index)
            continue
        assert index in seen_role, "content before the role chunk"
        if choice["finish_reason"] is not None:
            assert delta == {}
            assert choice["finish_reason"] in ("stop", "length")
            finished[index] += 1
        else:
            texts[index] += delta["content"]
        if include_usage:
            assert chunk["usage"] is None
        else:
            assert "usage" not in chunk
    assert seen_role == set(range(n))
    assert finished == Counter(range(n)), "each choice must finish exactly once"
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        usage = last["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert "cached_tokens" in usage["prompt_tokens_details"]
    return texts


def test_stream_framing_and_schema(http, schema):
    chunks = stream_chunks(http, CHAT, chat_body(max_tokens=6, stream=True))
    for chunk in chunks:
        schema(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["id"].startswith("chatcmpl-")
    texts = check_chat_stream(chunks, n=1, include_usage=False)
    assert texts[0]


def test_stream_matches_non_stream(http, schema):
    body = chat_body(max_tokens=8, temperature=0)
    whole = http.post(CHAT, json=body).json()
    schema(whole, "CreateChatCompletionResponse")
    chunks = stream_chunks(http, CHAT, {**body, "stream": True})
    assert check_chat_stream(chunks, 1, False)[0] == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_stream_n_interleaved_with_usage(http, schema):
    chunks = stream_chunks(http, CHAT, chat_body(max_tokens=6, n=3, seed=7, stream=True,
                                                 stream_options={"include_usage": True}))
    for chunk in chunks:
        schema(chunk, "CreateChatCompletionStreamResponse")
    texts = check_chat_stream(chunks, n=3, include_usage=True)
    assert all(texts.values())
    assert chunks[-1]["usage"]["completion_tokens"] == 18
    order = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["delta"].get("content")]
    assert order != sorted(order), "choices should interleave as they are produced"


def test_stream_logprobs(http, schema):
    chunks = stream_chunks(http, CHAT, chat_body(max_tokens=4, stream=True, logprobs=True, top_logprobs=2))
    content_chunks = [c for c in chunks if c["choices"][0]["delta"].get("content") is not None
                      and "role" not in c["choices"][0]["delta"]]
    tokens = [t for c in content_chunks for t in c["choices"][0]["logprobs"]["content"]]
    assert len(tokens) == 4
    assert all(len(t["top_logprobs"]) == 2 for t in tokens)
    for chunk in chunks:
        schema(chunk, "CreateChatCompletionStreamResponse")


def test_stream_obfuscation_when_asked(http):
    chunks = stream_chunks(http, CHAT, chat_body(max_tokens=2, stream=True,
                                                 stream_options={"include_obfuscation": True}))
    assert all(isinstance(c["obfuscation"], str) for c in chunks)


def test_stream_error_before_start_is_plain_json(http):
    response = http.post(CHAT, json=chat_body("x " * 1500, stream=True))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_legacy_stream(http, schema):
    chunks = stream_chunks(http, COMPLETIONS, {"model": "x", "prompt": ["Once upon", "The sky"], "max_tokens": 4,
                                               "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    for chunk in chunks[:-1]:
        schema(chunk, "CreateCompletionStreamResponse")
        assert chunk["object"] == "text_completion"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    finishes = Counter(c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"])
    assert finishes == Counter(range(4))
