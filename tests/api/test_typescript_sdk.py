"""The official OpenAI and Anthropic TypeScript SDKs under node, against the real server
(tests/ts/sdk_check.mjs, tools_check.mjs, messages_check.mjs).

Installs tests/ts's dependencies with `npm install` when node_modules is missing."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import pytest

TS_DIR = pathlib.Path(__file__).resolve().parents[1] / "ts"


@pytest.fixture(scope="module")
def node_sdk() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the TypeScript SDK test")
    if not all((TS_DIR / "node_modules" / name).is_dir() for name in ("openai", "@anthropic-ai/sdk")):
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=TS_DIR, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"npm install failed:\n{result.stdout}\n{result.stderr}"
    return node


def run_script(node: str, script: str, base_url: str) -> dict:
    result = subprocess.run([node, script], cwd=TS_DIR, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "BASE_URL": base_url})
    assert result.returncode == 0, f"node failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_typescript_sdk(server, node_sdk):
    summary = run_script(node_sdk, "sdk_check.mjs", server.v1)
    assert summary["ok"] and summary["streamedChars"] > 0


def test_typescript_sdk_tool_round_trip(server, node_sdk):
    summary = run_script(node_sdk, "tools_check.mjs", server.v1)
    assert summary["ok"] and summary["answerChars"] > 0 and summary["streamedCalls"] == 1


def test_anthropic_typescript_sdk(server, node_sdk):
    summary = run_script(node_sdk, "messages_check.mjs", server.base_url)  # no /v1: the SDK adds it
    assert summary["ok"] and summary["streamedChars"] > 0 and summary["answerChars"] > 0
