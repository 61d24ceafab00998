"""The real server, started once per session on a free port with the default model, and helpers
to check what it sends against OpenAI's OpenAPI schema (../shared/spec/openai-subset.yaml)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SPEC_CANDIDATES = [REPO.parent / "shared" / "spec" / "openai-subset.yaml", REPO / "spec" / "openai-subset.yaml"]
MAX_MODEL_LEN = 1024  # small, so context_length_exceeded is cheap to provoke
MAX_BODY_BYTES = 1 << 20  # 1 MiB, so 413 is cheap to provoke
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    log_path: pathlib.Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(log_path: pathlib.Path, *extra: str) -> tuple[subprocess.Popen, Server]:
    port = free_port()
    cmd = [sys.executable, "-m", "layerserve.cli", "serve", "--port", str(port), "--kv-cache-memory", "128MiB",
           "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY_BYTES), "--log-level", "warning",
           *extra]
    env = {**os.environ, "LAYERSERVE_API_KEY": ""}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return proc, server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


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

    with OpenAI(base_url=server.v1, api_key="your-api-key", max_retries=0, timeout=120) as client:
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

    path = next((p for p in SPEC_CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip(f"OpenAI spec subset not found at {[str(p) for p in SPEC_CANDIDATES]}")
    return SchemaChecker(yaml.safe_load(path.read_text()))
