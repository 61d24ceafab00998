"""POST /v1/completions through the SDK and raw HTTP: prompt forms, n, logprobs, max_tokens 0."""

from __future__ import annotations

import pytest

from api_helpers import COMPLETIONS


def test_sdk_completion(openai_client, schema):
    response = openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test",
                                                max_tokens=7, temperature=0)
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.choices[0].text
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 7
    schema(response.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")


def test_sdk_completion_stream(openai_client):
    chunks = list(openai_client.completions.create(model="x", prompt="Say this is a test", max_tokens=5,
                                                   temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    whole = openai_client.completions.create(model="x", prompt="Say this is a test", max_tokens=5, temperature=0)
    assert streamed == whole.choices[0].text


def test_prompt_forms_agree(http):
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    texts = []
    for prompt in ("The capital of France is", ["The capital of France is"], ids, [ids]):
        body = http.post(COMPLETIONS, json={"model": "x", "prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
        texts.append(body["choices"][0]["text"])
        assert body["usage"]["prompt_tokens"] == len(ids)
    assert len(set(texts)) == 1


def test_several_prompts_and_n(http, schema):
    body = http.post(COMPLETIONS, json={"model": "x", "prompt": ["One, two,", "Red, green,"], "n": 2,
                                        "max_tokens": 3, "temperature": 0}).json()
    schema(body, "CreateCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # greedy: both samples of a prompt agree; the prompts differ (prompt-major order)
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    assert body["usage"]["completion_tokens"] == 12


def test_logprobs(http, schema):
    body = http.post(COMPLETIONS, json={"model": "x", "prompt": "Hello", "max_tokens": 3, "logprobs": 2,
                                        "temperature": 0}).json()
    schema(body, "CreateCompletionResponse")
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"][0] == len("Hello")
    assert all(tok in top for tok, top in zip(lp["tokens"], lp["top_logprobs"]))


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero(http, stream):
    body = {"model": "x", "prompt": "Hello there", "max_tokens": 0, "stream": stream}
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 200
    if not stream:
        data = response.json()
        assert data["choices"][0]["text"] == "" and data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 0 and data["usage"]["prompt_tokens"] > 0
    else:
        assert response.text.endswith("data: [DONE]\n\n")


def test_empty_prompt_starts_a_document(http):
    body = http.post(COMPLETIONS, json={"model": "x", "prompt": "", "max_tokens": 2}).json()
    assert body["usage"]["prompt_tokens"] == 1
