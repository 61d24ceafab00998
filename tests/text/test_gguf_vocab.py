"""GGUF vocabularies other than the default model's: a tiny SentencePiece ("llama") file and a tiny
byte-level file with a Llama 3 pre-tokenizer, written with gguf-py."""

from __future__ import annotations

import pathlib

import gguf
import pytest

from layerserve.text.detokenizer import IncrementalDetokenizer
from layerserve.text.gguf_metadata import read_gguf_metadata
from layerserve.text.gguf_vocab import TOKENIZER_KEYS, TokenType, reader_metadata
from layerserve.text.tokenizer import Tokenizer

# (token, score); merges are implied by the scores
SPM_PIECES = [
    ("▁", -1.0), ("h", -2.0), ("e", -2.0), ("l", -2.0), ("o", -2.0), ("w", -2.0), ("r", -2.0), ("d", -2.0),
    ("▁h", -3.0), ("▁he", -4.0), ("ll", -3.0), ("llo", -4.0), ("▁hello", -5.0),
    ("▁w", -3.0), ("or", -3.0), ("▁wor", -4.0), ("ld", -3.0), ("▁world", -5.0),
]  # fmt: skip


def _write_gguf(path: pathlib.Path, fill: callable) -> pathlib.Path:  # type: ignore[valid-type]
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in SPM_PIECES]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(SPM_PIECES)
    scores = [0.0] * 259 + [s for _, s in SPM_PIECES]

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types([int(t) for t in types])
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)

    return _write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", fill)


@pytest.fixture(scope="module")
def spm_tokenizer(spm_path: pathlib.Path) -> Tokenizer:
    return Tokenizer.from_gguf(spm_path)


def test_fast_metadata_reader_agrees_with_gguf_reader(spm_path: pathlib.Path) -> None:
    reader = gguf.GGUFReader(spm_path)
    fast = read_gguf_metadata(spm_path)
    assert reader_metadata(reader) == {k: v for k, v in fast.items() if k in TOKENIZER_KEYS}
    assert fast["general.architecture"] == "llama"
    assert Tokenizer.from_gguf(spm_path, reader=reader).encode("hello hé") == Tokenizer.from_gguf(spm_path).encode(
        "hello hé"
    )


def _id(tok: Tokenizer, piece: str) -> int:
    token_id = tok.hf_tokenizer.token_to_id(piece)
    assert token_id is not None
    return token_id


def test_sentencepiece_encode_decode(spm_tokenizer: Tokenizer) -> None:
    tok = spm_tokenizer
    ids = tok.encode("hello world")
    assert ids == [_id(tok, "▁hello"), _id(tok, "▁world")]
    assert tok.decode(ids) == "hello world"
    assert tok.add_bos_token is True  # llama.cpp's default for SentencePiece files that don't say
    assert tok.encode("hello", add_special_tokens=True) == [1, _id(tok, "▁hello")]
    assert (tok.bos_token, tok.eos_token, tok.eos_token_ids) == ("<s>", "</s>", frozenset({2}))


def test_sentencepiece_byte_fallback_and_token_bytes(spm_tokenizer: Tokenizer) -> None:
    tok = spm_tokenizer
    ids = tok.encode("hé")  # é is not in the vocabulary: two byte tokens
    assert ids == [_id(tok, "▁h"), _id(tok, "<0xC3>"), _id(tok, "<0xA9>")]
    assert tok.decode(ids) == "hé"
    assert [tok.token_bytes(i) for i in ids] == [b" h", b"\xc3", b"\xa9"]
    assert tok.token_str(ids[1]) == "\ufffd"


def test_sentencepiece_special_tokens_in_text(spm_tokenizer: Tokenizer) -> None:
    tok = spm_tokenizer
    # llama.cpp puts the space prefix on every fragment after a special token.
    assert tok.encode("<s>hello") == [1, _id(tok, "▁hello")]
    assert tok.decode([1, _id(tok, "▁hello")]) == "hello"


def test_sentencepiece_incremental_detokenizer(spm_tokenizer: Tokenizer) -> None:
    ids = spm_tokenizer.encode("hello world hé")
    detok = IncrementalDetokenizer(spm_tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == spm_tokenizer.decode(ids) == "hello world hé"
    assert not any("\ufffd" in p for p in pieces)


def test_byte_level_llama3_pre_tokenizer(tmp_path: pathlib.Path) -> None:
    # Llama 3 splits numbers in groups of three and ignores merges for whole-vocabulary words.
    tokens = [str(d) for d in range(10)] + ["Ġ", "a", "b", "ab", "34", "<|eot_id|>"]

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types([int(TokenType.CONTROL if t.startswith("<|") else TokenType.NORMAL) for t in tokens])
        writer.add_token_merges(["a b", "3 4"])
        writer.add_eos_token_id(len(tokens) - 1)

    tok = Tokenizer.from_gguf(_write_gguf(tmp_path / "bl.gguf", fill))
    assert tok.add_bos_token is True and tok.bos_token_id is None
    # "ab", " ", "123", "45": the "3 4" merge cannot apply across the group boundary
    assert tok.encode("ab 12345") == [13, 10, 1, 2, 3, 4, 5]
    assert tok.encode("345") == [14, 5]
    assert tok.decode(tok.encode("ab 12345<|eot_id|>"), skip_special_tokens=False) == "ab 12345<|eot_id|>"
    assert tok.eos_token_ids == frozenset({len(tokens) - 1})
