from __future__ import annotations

import pytest

from layerserve.engine.llm import LLM


@pytest.fixture(scope="session")
def llm() -> LLM:
    """The default model in the offline engine on the float32 reference path (the tests compare
    it with transformers and require exact agreement across batch shapes), with a small KV pool."""
    return LLM(dtype="float32", num_blocks=512, max_model_len=2048, progress=False)


@pytest.fixture(scope="session")
def chat_ids(llm):
    return llm.encode_chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
