"""Chat completion features through the official Python SDK: n, stop, seed, sampling filters,
penalties, logit bias, logprobs, usage, message forms, tools and response_format -- each checked
for what it does, not only for being accepted."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]
NUMBERS = [{"role": "user", "content": "List the numbers: 1, 1, 1, 1, 1, 1,"}]  # greedy repeats "1, "


def concurrently(fn: Callable[..., Any], calls: Iterable[dict[str, Any]]) -> list[Any]:
    """fn(**kwargs) for each of `calls` at once (the server batches them); results in order."""
    calls = list(calls)
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda kw: fn(**kw), calls))


def token_bytes(choice) -> list[bytes]:
    """The generated tokens of a choice (asked with logprobs=True), as bytes."""
    return [bytes(t.bytes) for t in choice.logprobs.content]


def test_n_choices(openai_client, schema):
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content for c in response.choices)
    assert 3 <= response.usage.completion_tokens <= 3 * 6
    assert len({c.message.content for c in response.choices}) > 1, "three samples came out identical"
    schema(response.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")


def test_seed_reproducible_across_requests_and_batches(openai_client):
    def ask(seed: int, n: int = 1) -> list[str]:
        response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0,
                                                         seed=seed, n=n)
        return [c.message.content for c in response.choices]

    def start(texts: list[str]) -> list[str]:
        # The noise is keyed by (seed, choice, step), never by a batch position. Across batches of
        # other sizes the fast path's kernels (chosen per row count) round differently, and a
        # near-tie late in a sample may then go the other way: batch-dependent checks compare the
        # first few tokens, where a wrongly keyed noise would already differ.
        return [t[:12] for t in texts]

    first = ask(11)[0]
    assert ask(11) == [first]  # alone again, in the same company: the very same sample
    twelve, thirteen, trio = concurrently(ask, [{"seed": 12}, {"seed": 13}, {"seed": 11, "n": 3}])
    alone = {11: first, 12: twelve[0], 13: thirteen[0]}
    assert len(set(alone.values())) == 3  # different seeds, different samples
    assert start(trio[:1]) == start([alone[11]])  # choice 0 does not depend on n, nor on the batch it ran in
    assert len(set(trio)) == 3  # the choices are independent samples...
    assert trio[1] != alone[12] and trio[2] != alone[13]  # ...not choice 0 of seed + index
    # again, as separate requests in other company: every sample as it began
    got = concurrently(ask, [{"seed": 11}, {"seed": 12}, {"seed": 11, "n": 3}, {"seed": 11}, {"seed": 13}])
    assert [start(g) for g in got] == [start(x) for x in ([alone[11]], [alone[12]], trio, [alone[11]], [alone[13]])]


def test_every_seed_bit_counts(openai_client):
    """Seeds that differ only in their high bits (or sign) give different samples; the extremes of
    int64 are accepted."""
    def ask(seed: int) -> str:
        return openai_client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content

    seeds = [5, 5 + 2**32, 5 + 2**62, 5 - 2**63, 2**63 - 1, -(2**63)]
    samples = concurrently(ask, [{"seed": seed} for seed in seeds])
    assert len(set(samples)) == len(seeds), dict(zip(seeds, samples))
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, n=2, seed=2**63 - 1)
    assert len(response.choices) == 2


def test_greedy_is_deterministic(openai_client):
    answers = {openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8,
                                                     temperature=0).choices[0].message.content for _ in range(2)}
    assert len(answers) == 1


def test_single_token_filters_at_temperature_1_equal_greedy(openai_client):
    """top_k=1, top_p=0 and min_p=1 each leave one token to sample from: the greedy one, at every
    step. 400 sampled steps (4 choices x 100 tokens), in one batch with the greedy request itself.
    (A noise uniform of exactly 1.0 once made every zeroed token NaN, and argmax picked one: about
    one sampled step in 340 left the only allowed token. With these seeds that old sampler drew such
    a uniform in every one of the four choices, at steps 81 and 37, 27, and 3.)"""
    def ask(n: int = 1, extra_body: dict | None = None, **fields: Any):
        return openai_client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=100, logprobs=True, n=n,
            extra_body={"ignore_eos": True, **(extra_body or {})}, **fields).choices

    greedy, *sampled = concurrently(ask, [
        {"temperature": 0},
        {"temperature": 1.0, "seed": 5, "n": 2, "extra_body": {"top_k": 1}},
        {"temperature": 1.0, "seed": 27, "top_p": 0.0},
        {"temperature": 1.0, "seed": 69, "extra_body": {"min_p": 1.0}},
    ])
    expected = token_bytes(greedy[0])
    assert len(expected) == 100
    for label, choices in zip(["top_k=1", "top_p=0", "min_p=1"], sampled):
        for choice in choices:
            got = token_bytes(choice)
            first_off = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
            assert got == expected, f"{label}, choice {choice.index}: left the only allowed token at step {first_off}"
            assert choice.message.content == greedy[0].message.content


def test_top_k_top_p_min_p_bound_every_sampled_token(openai_client):
    """At temperature 1 the logprobs are the sampling distribution, so each sampled token can be
    checked against the filter: within the top k; inside the nucleus (the tokens ranked above it
    hold less than top_p); at least min_p times the best token's probability."""
    def ask(seed: int, **extra: float):
        return openai_client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=24, temperature=1.0, seed=seed, n=2, logprobs=True,
            top_logprobs=20, extra_body={"ignore_eos": True, **extra}).choices

    top_k, top_p, min_p = concurrently(ask, [{"seed": 1, "top_k": 3}, {"seed": 2, "top_p": 0.5},
                                             {"seed": 3, "min_p": 0.2}])

    def steps(choices):
        for choice in choices:
            for token in choice.logprobs.content:
                ranked = [bytes(t.bytes) for t in token.top_logprobs]
                rank = ranked.index(bytes(token.bytes)) if bytes(token.bytes) in ranked else len(ranked)
                yield token, rank, [math.exp(t.logprob) for t in token.top_logprobs]

    ranks = [rank for _, rank, _ in steps(top_k)]
    assert max(ranks) < 3, ranks
    assert any(rank > 0 for rank in ranks), "top_k=3 never sampled below the best token: not sampling?"
    for token, rank, probs in steps(top_p):
        assert sum(probs[:rank]) < 0.5 + 1e-4, (token.token, rank, probs[:rank + 1])
    for token, _, probs in steps(min_p):
        assert math.exp(token.logprob) >= 0.2 * probs[0] - 1e-6, (token.token, token.logprob, probs[0])


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


def test_logit_bias_minus_100_bans_the_greedy_token(openai_client, http):
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, temperature=0,
                                                     logprobs=True, top_logprobs=2)
    best, second = response.choices[0].logprobs.content[0].top_logprobs[:2]
    ids = http.post("/tokenize", json={"prompt": best.token, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1 and http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == best.token
    banned = {str(ids[0]): -100}
    response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, temperature=0,
                                                     logprobs=True, logit_bias=banned)
    assert response.choices[0].logprobs.content[0].token == second.token != best.token  # the runner-up wins

    # sampled: without the bias most of 8 samples start with the best token; with it, none does
    def firsts(**fields: Any) -> list[str]:
        response = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, temperature=1.0,
                                                         seed=4, n=8, logprobs=True, **fields)
        return [c.logprobs.content[0].token for c in response.choices]

    assert best.token in firsts()
    assert best.token not in firsts(logit_bias=banned)


def test_penalties_break_a_repetitive_continuation(openai_client):
    def tokens(**fields: Any) -> list[str]:
        response = openai_client.chat.completions.create(model=MODEL, messages=NUMBERS, max_tokens=16, temperature=0,
                                                         logprobs=True, **fields)
        return [t.token for t in response.choices[0].logprobs.content]

    penalties = [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.5}}]
    plain, *penalized = concurrently(tokens, [{}, *penalties])
    assert Counter(plain)["1"] >= 5, plain  # greedy: "1, 1, 1, ..."
    for fields, got in zip(penalties, penalized):
        assert got != plain, fields
        assert Counter(got)["1"] < Counter(plain)["1"], (fields, got)


def test_stream_usage(openai_client):
    stream = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True,
                                                   temperature=0, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == 5 and usage.total_tokens == usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    whole = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    assert text == whole.choices[0].message.content and text
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_usage_counts_cached_prompt_tokens(openai_client):
    messages = [{"role": "system", "content": "You answer in one word. " * 8},
                {"role": "user", "content": "Name a colour."}]
    openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    again = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    cached, prompt = again.usage.prompt_tokens_details.cached_tokens, again.usage.prompt_tokens
    block = 16  # the server's KV block size: whole blocks are reused, at least one token is computed
    assert cached % block == 0 and prompt - block <= cached < prompt, (cached, prompt)


MESSAGE_FORMS = [
    {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "name": "ann", "content": [{"type": "text", "text": "What is 2+2?"},
                                                {"type": "text", "text": "Answer with a digit."}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4"},
]


def test_message_forms(openai_client, http):
    """developer role, content-part arrays, names, and a tool round trip in the history: each
    reaches the prompt (developer as the template's system turn, the parts in order, the call and
    its result)."""
    rendered = http.post("/tokenize", json={"messages": MESSAGE_FORMS}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": rendered}).json()["prompt"]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>"), text  # developer: the system turn
    at = [text.find(piece) for piece in ("What is 2+2?", "Answer with a digit.", '{"a": 2, "b": 2}', "4<|im_end|>")]
    assert -1 not in at and at == sorted(at), text  # the parts, the call and its result, in order

    def prompt_tokens(messages) -> int:
        response = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
        choice = response.choices[0]
        assert choice.message.content and choice.finish_reason == "length" and response.usage.completion_tokens == 3
        return response.usage.prompt_tokens

    # the call's arguments are in the prompt: twelve more words in them, a dozen more prompt tokens
    longer = json.dumps({"a": 2, "b": 2, "note": " ".join(["word"] * 12)})
    call = {**MESSAGE_FORMS[2]["tool_calls"][0], "function": {"name": "add", "arguments": longer}}
    longer_call = [*MESSAGE_FORMS[:2], {"role": "assistant", "content": None, "tool_calls": [call]}, MESSAGE_FORMS[3]]
    assert prompt_tokens(longer_call) - prompt_tokens(MESSAGE_FORMS) >= 12


def test_tokenize_counts_a_chat_prompt_as_the_chat_request_does(openai_client, http):
    """/tokenize with messages renders "exactly as a chat request would be": a client counting its
    context with it must get what the request then costs, tool calls in the history included."""
    for messages in (HELLO, MESSAGE_FORMS[:2], MESSAGE_FORMS):
        counted = http.post("/tokenize", json={"messages": messages}).json()["count"]
        response = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
        assert response.usage.prompt_tokens == counted, messages


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}


def test_tool_choice_takes_effect(openai_client):
    """"none" answers in text even when asked for the weather; "required" and a named function
    always call (one call: parallel_tool_calls=False) with arguments that fit the schema; "auto"
    calls when the question needs it."""
    def ask(tool_choice):
        return openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What's the weather in Paris?"}], max_tokens=40,
            temperature=0, tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=False).choices[0]

    named = {"type": "function", "function": {"name": "get_weather"}}
    auto, none, required, by_name = concurrently(ask, [{"tool_choice": c} for c in ("auto", "none", "required", named)])
    assert none.message.tool_calls is None and none.finish_reason in ("stop", "length")
    assert none.message.content and "get_weather" not in none.message.content
    for choice in (auto, required, by_name):
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_response_format_takes_effect(openai_client):
    salty = [{"role": "user", "content": 'Reply with the JSON object {"salty": true} and nothing else.'}]
    schema = {"type": "object", "properties": {"salty": {"type": "boolean"}}, "required": ["salty"],
              "additionalProperties": False}

    def ask(response_format=None, messages=salty, max_tokens=30):
        fields = {} if response_format is None else {"response_format": response_format}
        return openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                     temperature=0, **fields).choices[0]

    plain, text, json_object, json_schema = concurrently(ask, [
        {"messages": HELLO, "max_tokens": 8}, {"messages": HELLO, "max_tokens": 8, "response_format": {"type": "text"}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "salty", "schema": schema}}},
    ])
    assert text.message.content == plain.message.content  # "text" is the unconstrained default
    assert json_object.finish_reason == "stop" and isinstance(json.loads(json_object.message.content), dict)
    assert json_schema.finish_reason == "stop"
    jsonschema.validate(json.loads(json_schema.message.content), schema)


def test_metadata_fields_are_accepted_and_change_nothing(openai_client):
    """Fields that only label a request (user, metadata, store, service_tier, prompt_cache_key,
    safety_identifier, modalities) leave the output as it was."""
    plain = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    labelled = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, user="user-1", metadata={"k": "v"}, store=False,
        service_tier="auto", prompt_cache_key="abc", safety_identifier="s1", modalities=["text"])
    assert labelled.service_tier == "default"
    assert labelled.choices[0].message.content == plain.choices[0].message.content
    assert labelled.usage.prompt_tokens == plain.usage.prompt_tokens


def test_sdk_raises_bad_request_with_code(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 1500}],
                                              max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    assert info.value.status_code == 400
