"""The real server, started once per session on a free port with the default model, and helpers
to check what it sends against OpenAI's OpenAPI schema (tests/fixtures/openai-subset.yaml, kept in
the repo so that a fresh clone runs every schema test)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import MAX_BODY_BYTES, MAX_MODEL_LEN, REPO, Server, free_port, start_server  # noqa: F401

OPENAI_SPEC = REPO / "tests" / "fixtures" / "openai-subset.yaml"  # OpenAI's published OpenAPI document (subset)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`layerserve serve` as a user runs it (no API key: any key is accepted)."""
    proc, srv = start_server(tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def openai_client(server: Server):
    from openai import OpenAI

    # timeout: a bound for a hung server, not a speed check (a loaded 2-core machine is slow)
    with OpenAI(base_url=server.v1, api_key="your-api-key", max_retries=0, timeout=300) as client:
        yield client


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


# ---- OpenAI schema ----------------------------------------------------------------------------
class SchemaChecker:
    """Validates objects against components of the OpenAPI document, $refs resolved."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        resource = Resource.from_contents(spec, default_specification=DRAFT202012)
        self._registry = Registry().with_resource("urn:openai-spec", resource)
        self._validators: dict[str, Any] = {}
        self._cls = Draft202012Validator

    def __call__(self, obj: Any, component: str) -> None:
        validator = self._validators.get(component)
        if validator is None:
            schema = {"$ref": f"urn:openai-spec#/components/schemas/{component}"}
            validator = self._validators[component] = self._cls(schema, registry=self._registry)
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            details = "\n".join(f"- {list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5])
            raise AssertionError(f"not a valid {component}:\n{details}\n{json.dumps(obj)[:2000]}")


@pytest.fixture(scope="session")
def schema() -> SchemaChecker:
    import yaml

    # Missing is a failure, never a skip: a skip would let a clone without it pass while checking nothing.
    assert OPENAI_SPEC.is_file(), f"test fixture missing: {OPENAI_SPEC} (OpenAI's OpenAPI spec, part of the repo)"
    return SchemaChecker(yaml.safe_load(OPENAI_SPEC.read_text()))


@pytest.fixture(scope="session")
def anthropic_client(server: Server):
    from anthropic import Anthropic

    # base_url without /v1: the SDK adds it, as against api.anthropic.com
    with Anthropic(base_url=server.base_url, api_key="your-api-key", max_retries=0, timeout=300) as client:
        yield client
