"""Schemathesis against the real server, over the app's own OpenAPI schema (GET /openapi.json) and
over OpenAI's (tests/fixtures/openai-subset.yaml, in the repo), with positive and negative generated requests.

No request may get a 5xx; every 4xx is OpenAI's error envelope (Anthropic's on /v1/messages);
every stream ends with [DONE] (message_stop on /v1/messages) and carries no error event. Generation is derandomized (the same requests every run) and kept cheap:
a few dozen examples per operation, and completion lengths and choice counts capped, since
each generated token costs tens of milliseconds on a CPU.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis  # a dev dependency: missing is an error, not a skip
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

# OpenAI's published OpenAPI document (a subset), kept in the repo: missing is a failure, never a skip.
OPENAI_SPEC = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "openai-subset.yaml"
MAX_EXAMPLES = 40  # per operation and mode
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "best_of": 2}
MAX_PROMPTS = 2  # prompts in one positive /completions request

APP_OPERATIONS = [
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
    "POST /tokenize",
    "POST /detokenize",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "GET /health",
    "GET /v1/health",
    "GET /healthz",
    "GET /metrics",
    "POST /v1/sessions",
    "GET /v1/sessions",
    "GET /v1/sessions/{session_id}",
    "DELETE /v1/sessions/{session_id}",
    "POST /v1/sessions/{session_id}/push",
    "POST /v1/sessions/{session_id}/warm",
    "POST /v1/sessions/{session_id}/generate",
    "POST /v1/sessions/{session_id}/flash",
    "GET /v1/sessions/{session_id}/flash",
    "DELETE /v1/sessions/{session_id}/flash/{flash_id}",
    "GET /v1/sessions/{session_id}/events",
]
OPENAI_OPERATIONS = ["POST /chat/completions", "POST /completions", "GET /models", "GET /models/{model}"]


@pytest.fixture(scope="module")
def app_schema(server):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


@pytest.fixture(scope="module")
def openai_schema():
    assert OPENAI_SPEC.is_file(), f"test fixture missing: {OPENAI_SPEC} (OpenAI's OpenAPI spec, part of the repo)"
    return schemathesis.openapi.from_path(OPENAI_SPEC)


def _operation(schema: Any, label: str) -> Any:
    method, path = label.split(" ", 1)
    return schema[path][method]


def _cap_cost(case: Any, mode: GenerationMode) -> None:
    """Generated completions may ask for thousands of tokens (or none, meaning the whole context):
    cap what a request may generate. Only integers are touched, so a negative case's wrong
    type or negative number stays as generated."""
    body = case.body
    if not isinstance(body, dict) or not (case.path.endswith("completions") or case.path == "/v1/messages"):
        return
    for key, cap in CAPS.items():
        if type(body.get(key)) is int and body[key] > cap:
            body[key] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = CAPS["max_tokens"]
    prompt = body.get("prompt")
    if mode is GenerationMode.POSITIVE and isinstance(prompt, list) and len(prompt) > MAX_PROMPTS:
        body["prompt"] = prompt[:MAX_PROMPTS]


def _envelope_problem(response: Any, keys: set[str], error_keys: set[str], api: str) -> str | None:
    """An error response not in `api`'s envelope: exactly `keys` at the top, `error_keys` in "error"."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {status} without a JSON body: {response.text[:500]}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != keys or not isinstance(error, dict) or set(error) != error_keys:
        return f"HTTP {status} not in {api}'s error envelope: {response.text[:500]}"
    return None


def _anthropic_problem(response: Any) -> str | None:
    """What is wrong with one response of an Anthropic route, or None."""
    status, content_type = response.status_code, response.headers.get("content-type", [""])[0]
    if status >= 400:
        return _envelope_problem(response, {"type", "error"}, {"type", "message"}, "Anthropic")
    if content_type.startswith("text/event-stream"):
        names = [e.split("\n", 1)[0].removeprefix("event: ") for e in response.text.split("\n\n") if e]
        if not names or names[-1] != "message_stop" or "error" in names:
            return f"stream does not end with message_stop, or carries an error: {response.text[-500:]}"
    return None


def _problem(response: Any, anthropic: bool = False) -> str | None:
    """What is wrong with one response, or None."""
    status, content_type = response.status_code, response.headers.get("content-type", [""])[0]  # lists of values
    if status >= 500:
        return f"HTTP {status}: {response.text[:1000]}"
    if anthropic:
        return _anthropic_problem(response)
    if status >= 400:
        return _envelope_problem(response, {"error"}, {"message", "type", "param", "code"}, "OpenAI")
    if content_type.startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
        if not events or events[-1] != "[DONE]":
            return f"stream does not end with [DONE]: {response.text[-500:]}"
        errors = [e for e in events[:-1] if "error" in json.loads(e)]
        if errors:
            return f"stream carries an error event: {errors[0][:500]}"
    return None


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, log_tail: Callable[[], str]) -> list[int]:
    """Run the generated requests; the statuses they got."""
    problems: list[str] = []
    statuses: list[int] = []

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        _cap_cost(case, mode)
        response = case.call(base_url=base_url, timeout=120)
        statuses.append(response.status_code)
        problem = _problem(response, anthropic=case.path.startswith("/v1/messages"))
        if problem is not None:
            problems.append(f"{problem}\n  request: {case.as_curl_command()[:3000]}")

    try:
        run()
    except Unsatisfiable:
        # a GET or DELETE without a body, with free-form string path parameters, has no invalid requests
        assert mode is GenerationMode.NEGATIVE and operation.method.upper() in ("GET", "DELETE"), operation.label
        return []
    assert statuses
    assert not problems, f"{len(problems)} bad responses of {len(statuses)}:\n" + "\n".join(problems[:5]) + \
        f"\n--- server log ---\n{log_tail()}"
    return statuses


def test_app_schema_declares_every_route_and_its_body(app_schema) -> None:
    labels = sorted(result.ok().label for result in app_schema.get_all_operations())
    assert labels == sorted(APP_OPERATIONS)
    for label in APP_OPERATIONS:
        operation = _operation(app_schema, label)
        assert bool(operation.body) == (operation.method.upper() == "POST"), label


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("label", APP_OPERATIONS)
def test_fuzz_app_schema(app_schema, server, label: str, mode: GenerationMode) -> None:
    statuses = _fuzz(_operation(app_schema, label), mode, server.base_url, server.log_tail)
    if mode is GenerationMode.POSITIVE and "/{" not in label:  # random ids (models, sessions) are 404s
        assert 200 in statuses, statuses  # valid requests get past validation, not only into 400s


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("label", OPENAI_OPERATIONS)
def test_fuzz_openai_schema(openai_schema, server, label: str, mode: GenerationMode) -> None:
    statuses = _fuzz(_operation(openai_schema, label), mode, server.v1, server.log_tail)
    if mode is GenerationMode.POSITIVE and label != "GET /models/{model}":
        assert 200 in statuses, statuses
