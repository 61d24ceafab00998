"""Tokenizer built from GGUF metadata: parity with transformers, special tokens, token bytes."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from layerserve.text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing  ",
    "def f(x):\n\treturn x**2  # square\n\n\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "naïve café résumé Ångström",
    "日本語のテキスト、中文文本。한국어",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷 ❤️",
    "numbers 1234567 3.14159 -0.5e10 1,000,000",
    "tabs\t\tand\r\nnewlines\n\n  \n",
    "multiple     spaces    here",
    "don't you'll I'M WE'VE",
    "ｆｕｌｌｗｉｄｔｈ",
    "Ελληνικά русский العربية हिन्दी",
    "\u200b zero\u00a0width",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a" * 64,
    " ",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(smollm_tokenizer: Tokenizer, hf_smollm_tokenizer: Any, text: str) -> None:
    ids = smollm_tokenizer.encode(text)
    assert ids == hf_smollm_tokenizer.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert smollm_tokenizer.decode(ids, skip_special_tokens=skip) == hf_smollm_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_numeric_characters_are_isolated_like_llama_cpp_smollm(smollm_tokenizer: Tokenizer) -> None:
    # tokenizer.ggml.pre = "smollm": llama.cpp isolates every \p{N} first, as SmolLM2's tokenizer.json
    # does with Digits(individual_digits=True). transformers' GGUF loader (5.x) skips that step and
    # gives [3351, 138] ("Ġ½" split differently) here, so this is checked against known ids instead.
    assert smollm_tokenizer.encode(" ½") == [216, 16738]
    assert smollm_tokenizer.encode(" 12") == [216, 33, 34]
    assert smollm_tokenizer.encode("x²") == [104, 19133]


def test_special_token_attributes(smollm_tokenizer: Tokenizer) -> None:
    tok = smollm_tokenizer
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.bos_token) == (1, "<|im_start|>")
    assert (tok.eos_token_id, tok.eos_token) == (2, "<|im_end|>")
    assert tok.eos_token_ids == frozenset({0, 2})  # <|im_end|>, <|endoftext|>
    assert tok.add_bos_token is False
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.is_special(1) and tok.is_special(16)
    assert not tok.is_special(17) and not tok.is_special(19556)


def test_special_strings_become_special_tokens(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [1, 4093, 198, 6004, 2]
    assert smollm_tokenizer.decode(ids) == "user\nhi"
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_add_special_tokens_respects_add_bos_token(smollm_tokenizer: Tokenizer) -> None:
    assert smollm_tokenizer.encode("hi", add_special_tokens=True) == smollm_tokenizer.encode("hi")


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_token_bytes_concatenate_to_utf8(smollm_tokenizer: Tokenizer, text: str) -> None:
    ids = smollm_tokenizer.encode(text)
    assert b"".join(smollm_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_token_bytes_of_split_character(smollm_tokenizer: Tokenizer) -> None:
    ids = smollm_tokenizer.encode("😀")  # F0 9F 98 80: one character over three tokens
    assert ids == [10813, 242, 218]
    assert [smollm_tokenizer.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\x98", b"\x80"]
    assert [smollm_tokenizer.token_str(i) for i in ids] == ["\ufffd"] * 3


def test_token_bytes_and_str_of_plain_and_special_tokens(smollm_tokenizer: Tokenizer) -> None:
    (world,) = smollm_tokenizer.encode(" world")
    assert smollm_tokenizer.token_bytes(world) == b" world"
    assert smollm_tokenizer.token_str(world) == " world"
    assert smollm_tokenizer.token_bytes(1) == b"<|im_start|>"


def test_from_dir_matches_from_gguf(smollm_tokenizer: Tokenizer, tmp_path: pathlib.Path) -> None:
    smollm_tokenizer.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>"},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": smollm_tokenizer.chat_template}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.eos_token_ids == frozenset({0, 2, 7})
    assert tok.chat_template == smollm_tokenizer.chat_template
    for text in TEXTS:
        assert tok.encode(text) == smollm_tokenizer.encode(text)
    assert tok.encode("hi", add_special_tokens=True) == [1, *smollm_tokenizer.encode("hi")]
    assert tok.encode("<|im_start|>hi", add_special_tokens=True)[:2] == [1, 6004]  # no double BOS
    (world,) = tok.encode(" world")
    assert tok.token_bytes(world) == b" world"
