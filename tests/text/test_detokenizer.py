"""IncrementalDetokenizer fed one token at a time."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from layerserve.text.detokenizer import IncrementalDetokenizer
from layerserve.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷 ❤️ end",
    "😀😀😀",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "naïve café — “quotes” … ½ ² €100",
    "def f(x):\n    return {'a': [1, 2]}\n",
    "Ελληνικά русский العربية हिन्दी 🇯🇵",
]


def _stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    return [detok.add(i) for i in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_reproduce_decode(smollm_tokenizer: Tokenizer, text: str) -> None:
    ids = smollm_tokenizer.encode(text)
    detok = IncrementalDetokenizer(smollm_tokenizer)
    pieces = _stream(detok, ids)
    assert "".join(pieces) == smollm_tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert detok.flush() == ""
    assert detok.text == text


def test_multibyte_character_is_held_until_complete(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("a😀")
    detok = IncrementalDetokenizer(smollm_tokenizer)
    pieces = _stream(detok, ids)
    assert pieces[0] == "a"
    assert pieces[-1].endswith("😀") and all(p == "" for p in pieces[1:-1])


def test_flush_emits_an_unfinished_character(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("ok😀")[:-1]  # stop mid-character
    detok = IncrementalDetokenizer(smollm_tokenizer)
    streamed = "".join(_stream(detok, ids)) + detok.flush()
    assert streamed == smollm_tokenizer.decode(ids)
    assert streamed.startswith("ok") and streamed.endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(smollm_tokenizer: Tokenizer, skip: bool) -> None:
    ids = smollm_tokenizer.encode("Sure! 日本 😀<|im_end|>\n<|im_start|>user")
    detok = IncrementalDetokenizer(smollm_tokenizer, skip_special_tokens=skip)
    assert "".join(_stream(detok, ids)) + detok.flush() == smollm_tokenizer.decode(ids, skip_special_tokens=skip)


def test_prompt_context_is_not_emitted(smollm_tokenizer: Tokenizer) -> None:
    prompt = smollm_tokenizer.encode("<|im_start|>user\nhi 😀<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm_tokenizer.encode("Hello 日本 🎉")
    detok = IncrementalDetokenizer(smollm_tokenizer, prompt_ids=prompt)
    assert "".join(_stream(detok, ids)) == smollm_tokenizer.decode(ids)


class _CountingTokenizer:
    """Duck-typed tokenizer that records how many ids each decode call sees."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.window_sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def test_work_per_token_is_constant(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("streaming 😀 日本語 text " * 100)
    counting = _CountingTokenizer(smollm_tokenizer)
    detok = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    _stream(detok, ids)
    assert len(ids) > 500
    assert max(counting.window_sizes) <= 8
    assert detok.text == smollm_tokenizer.decode(ids)


class CountingTokenizer:
    """Counts the token ids each decode call is given (the detokenizer's work per step)."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.inner.decode(ids, skip_special_tokens)


@pytest.mark.parametrize("kind", ["continuation_byte", "special_token"])
def test_a_stream_that_never_completes_text_costs_constant_work_per_token(smollm_tokenizer: Tokenizer, kind):
    """A lone UTF-8 continuation byte forever (U+FFFD), or a skipped special token forever (""):
    the held-back window used to grow by one token per step, so each step decoded all of it."""
    tok = smollm_tokenizer
    if kind == "continuation_byte":
        token = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\x80")
    else:
        token = next(i for i in range(tok.vocab_size) if tok.is_special(i))
    counting = CountingTokenizer(tok)
    detok = IncrementalDetokenizer(counting)
    steps = 3000
    pieces = [detok.add(token) for _ in range(steps)]
    assert counting.decoded <= steps * 4 * 16  # bounded window: O(1) per token, not O(steps)
    text = "".join(pieces) + detok.flush()
    assert text == tok.decode([token] * steps) or kind == "continuation_byte" and set(text) == {"\ufffd"}
