"""The `layerserve serve` command line: flags, sizes, help text, environment."""

from __future__ import annotations

import subprocess
import sys

import argparse

import pytest

from layerserve.cli import build_parser, configs, default_served_name, parse_size

FLAGS = ["--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--kv-cache-memory",
         "--max-num-seqs", "--max-num-batched-tokens", "--dtype", "--no-prefix-cache", "--max-body-bytes",
         "--log-level"]


@pytest.mark.parametrize("text,value", [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("16MB", 16_000_000),
                                        ("1048576", 1 << 20), ("1.5KiB", 1536), ("2g", 2_000_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "1 parsec", "-1GiB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "layerserve.cli", "serve", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout


def test_flags_reach_the_configs(monkeypatch):
    monkeypatch.delenv("LAYERSERVE_API_KEY", raising=False)
    args = build_parser().parse_args([
        "serve", "/models/x.gguf", "--host", "0.0.0.0", "--port", "9000", "--api-key", "k", "--max-model-len", "2048",
        "--kv-cache-memory", "256MiB", "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--dtype",
        "bfloat16", "--no-prefix-cache", "--max-body-bytes", "1MiB", "--log-level", "debug"])
    engine, server = configs(args)
    assert (engine.model, engine.dtype) == ("/models/x.gguf", "bfloat16")
    assert engine.cache.kv_cache_memory == 256 << 20 and not engine.cache.enable_prefix_caching
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens,
            engine.scheduler.max_model_len) == (8, 128, 2048)
    assert (server.host, server.port, server.api_key, server.max_body_bytes, server.log_level) == \
           ("0.0.0.0", 9000, "k", 1 << 20, "debug")
    assert server.served_model_name == "x"


def test_defaults(monkeypatch):
    monkeypatch.delenv("LAYERSERVE_API_KEY", raising=False)
    engine, server = configs(build_parser().parse_args(["serve"]))
    assert server.port == 8080 and server.api_key is None and server.max_body_bytes == 16 << 20
    assert server.served_model_name == "SmolLM2-135M-Instruct"
    assert engine.cache.kv_cache_memory == 1 << 30 and engine.cache.enable_prefix_caching


def test_served_name_from_model():
    assert default_served_name("default") == "SmolLM2-135M-Instruct"
    assert default_served_name("/m/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert default_served_name("/m/llama-q4.gguf") == "llama-q4"


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("LAYERSERVE_API_KEY", "from-env")
    assert configs(build_parser().parse_args(["serve"]))[1].api_key == "from-env"
    assert configs(build_parser().parse_args(["serve", "--api-key", "flag"]))[1].api_key == "flag"


def test_missing_model_exits_nonzero():
    result = subprocess.run([sys.executable, "-m", "layerserve.cli", "serve", "/does/not/exist.gguf"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "/does/not/exist.gguf" in result.stderr
