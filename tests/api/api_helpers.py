"""Helpers for the API tests: SSE parsing with framing checks, the error-envelope assertion."""

from __future__ import annotations

import json
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


# ---- SSE --------------------------------------------------------------------------------------
def read_sse(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an event stream, checking the framing on the way: every event is
    exactly one `data: ` line followed by a blank line."""
    body = response.read().decode("utf-8")
    assert body.endswith("\n\n"), body[-200:]
    events = body[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert "\n" not in event, f"multi-line event: {event!r}"
        assert event.startswith("data: "), f"not a data line: {event!r}"
        payloads.append(event[len("data: "):])
    return payloads


def stream_chunks(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streaming request; the JSON chunks (asserting the stream ends with [DONE])."""
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = read_sse(response)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(response: httpx.Response, status: int, param: str | None = ..., code: str | None = ...) -> dict:
    """The response is OpenAI's error envelope with this status (and param/code when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_body(content: str = "Say hello.", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def metrics(http: httpx.Client) -> dict[str, float]:
    """GET /metrics as {sample name: value}; labelled samples as `name{label="value",...}`."""
    text = http.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
