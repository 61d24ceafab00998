"""Reference tokenizer from Hugging Face transformers (a test-only dependency), loaded once."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(default_model_path: pathlib.Path) -> Any:
    """transformers' own tokenizer for the default GGUF (AutoTokenizer with gguf_file=)."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)
