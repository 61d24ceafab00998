"""A GGUF file's tokenizer metadata -> a Hugging Face `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the token strings, their
types, BPE merges (byte-level vocabularies) or scores (SentencePiece vocabularies), special token
ids, and `tokenizer.ggml.pre`, the name of the pre-tokenizer the vocabulary was trained with. We
rebuild what the model's reference tokenizer.json would say from those:

    tokenizer.ggml.model = "gpt2"   byte-level BPE; the split regex comes from `_PRE_TOKENIZERS`
    tokenizer.ggml.model = "llama"  SentencePiece-style BPE with byte fallback, merges ranked by score
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)


class TokenType(enum.IntEnum):
    """llama.cpp's `tokenizer.ggml.token_type` values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (byte-level BPE spells tokens with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_ENCODER: Mapping[int, str] = MappingProxyType(_bytes_to_unicode())
BYTE_DECODER: Mapping[str, int] = MappingProxyType({c: b for b, c in BYTE_ENCODER.items()})


@dataclasses.dataclass(frozen=True, slots=True)
class GGUFVocab:
    """The tokenizer fields of a GGUF file, under llama.cpp's meaning."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre; "default" when the file has none
    tokens: list[str]
    token_types: list[int]  # TokenType per token; all NORMAL when the file has none
    scores: list[float] | None
    merges: list[str] | None  # "left right" pairs, best first
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool | None  # None: the file does not say
    add_space_prefix: bool | None
    chat_template: str | None


TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


def read_gguf_vocab(metadata: Mapping[str, Any]) -> GGUFVocab:
    """The tokenizer fields out of a GGUF file's metadata (key -> plain Python value)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    model = metadata.get("tokenizer.ggml.model")
    if tokens is None or model is None:
        raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    token_types = metadata.get("tokenizer.ggml.token_type")
    scores = metadata.get("tokenizer.ggml.scores")
    return GGUFVocab(
        model=str(model),
        pre=str(metadata.get("tokenizer.ggml.pre") or "default"),
        tokens=list(tokens),
        token_types=[int(t) for t in token_types] if token_types is not None else [TokenType.NORMAL] * len(tokens),
        scores=[float(s) for s in scores] if scores is not None else None,
        merges=metadata.get("tokenizer.ggml.merges"),
        bos_token_id=_optional_int(metadata.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_optional_int(metadata.get("tokenizer.ggml.eos_token_id")),
        unk_token_id=_optional_int(metadata.get("tokenizer.ggml.unknown_token_id")),
        add_bos_token=_optional_bool(metadata.get("tokenizer.ggml.add_bos_token")),
        add_space_prefix=_optional_bool(metadata.get("tokenizer.ggml.add_space_prefix")),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def reader_metadata(reader: gguf.GGUFReader, keys: Sequence[str] = TOKENIZER_KEYS) -> dict[str, Any]:
    """`keys` of an open GGUFReader as plain Python values (absent keys are left out)."""
    return {key: _field_value(reader.fields[key]) for key in keys if key in reader.fields}


def _field_value(field: Any) -> Any:
    """A ReaderField as Python: str, int/float/bool, or a list of those.

    Written against `ReaderField.parts/data/types` (present in every gguf-py we support) rather
    than `ReaderField.contents()`, which older releases lack.
    """
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


# --- byte-level BPE ("gpt2") --------------------------------------------------------------------

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True, slots=True)
class _PreTokenizerSpec:
    """How a byte-level vocabulary splits text before BPE (mirrors its reference tokenizer.json)."""

    split: str | None = None  # regex whose matches are the words; None: GPT-2's regex inside ByteLevel
    individual_digits: bool = False  # every \p{N} is its own word (StarCoder / SmolLM)
    ignore_merges: bool = False  # a word that is itself in the vocabulary is not merged (Llama 3)
    nfc: bool = False  # NFC-normalize first (Qwen2)
    add_bos_token: bool = False  # llama.cpp's default when the file does not say


_DEFAULT = _PreTokenizerSpec()
_DIGITS = _PreTokenizerSpec(individual_digits=True)
_LLAMA3 = _PreTokenizerSpec(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos_token=True)
_QWEN2 = _PreTokenizerSpec(split=_QWEN2_SPLIT, nfc=True)

# tokenizer.ggml.pre -> spec; names and groups follow llama.cpp's `llama_vocab::impl::load`.
_PRE_TOKENIZERS: Mapping[str, _PreTokenizerSpec] = MappingProxyType(
    {
        "default": _DEFAULT,
        "gpt2": _DEFAULT,
        "gpt-2": _DEFAULT,
        "smollm": _DIGITS,
        "starcoder": _DIGITS,
        "refact": _DIGITS,
        "codeshell": _DIGITS,
        "exaone": _DIGITS,
        "minerva-7b": _DIGITS,
        "command-r": _DIGITS,
        "llama-bpe": _LLAMA3,
        "llama3": _LLAMA3,
        "llama-v3": _LLAMA3,
        "falcon3": _LLAMA3,
        "smaug-bpe": _LLAMA3,
        "dbrx": _LLAMA3,
        "qwen2": _QWEN2,
        "deepseek-r1-qwen": _QWEN2,
    }
)


def pre_tokenizer_spec(pre: str) -> _PreTokenizerSpec:
    """The spec for `tokenizer.ggml.pre`; GPT-2's default (with a warning) for names we don't know."""
    spec = _PRE_TOKENIZERS.get(pre)
    if spec is None:
        logger.warning("unknown GGUF pre-tokenizer %r: falling back to GPT-2's split; tokens may differ", pre)
        return _DEFAULT
    return spec


def _build_byte_level(vocab: GGUFVocab) -> HFTokenizer:
    spec = pre_tokenizer_spec(vocab.pre)
    if vocab.merges is None:
        raise ValueError("byte-level GGUF vocabulary without tokenizer.ggml.merges")
    token_to_id: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True)):
        # Added tokens keep their raw text (they are matched in the raw input); a normal token spelled
        # outside the byte alphabet is respelled so that merges can reach it.
        if token_type in (TokenType.NORMAL, TokenType.BYTE) and not all(c in BYTE_DECODER for c in token):
            token = "".join(BYTE_ENCODER[b] for b in token.encode("utf-8"))
        token_to_id[token] = index
    merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
    hf = HFTokenizer(models.BPE(vocab=token_to_id, merges=merges, ignore_merges=spec.ignore_merges))
    if spec.nfc:
        hf.normalizer = normalizers.NFC()
    words: list[pre_tokenizers.PreTokenizer] = []
    if spec.individual_digits:
        words.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split is not None:
        words.append(pre_tokenizers.Split(Regex(spec.split), behavior="isolated", invert=False))
    words.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split is None))
    hf.pre_tokenizer = pre_tokenizers.Sequence(words)
    hf.decoder = decoders.ByteLevel()
    return hf


# --- SentencePiece-style BPE ("llama") ----------------------------------------------------------

_SPM_SPACE = "\u2581"


def _merges_from_scores(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    ranked by the merged token's score (higher first), as HF's sentencepiece conversion does."""
    if vocab.scores is None:
        raise ValueError("SentencePiece GGUF vocabulary without tokenizer.ggml.scores")
    normal = {
        token: index
        for index, (token, token_type) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True))
        if token_type == TokenType.NORMAL
    }
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[index], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_sentencepiece(vocab: GGUFVocab) -> HFTokenizer:
    token_to_id = {token: index for index, token in enumerate(vocab.tokens)}
    unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
    hf = HFTokenizer(
        models.BPE(
            vocab=token_to_id, merges=_merges_from_scores(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    # llama.cpp puts the space prefix before every raw-text fragment that follows a special token;
    # a normalizer runs per fragment between added tokens, so Prepend does the same.
    add_space_prefix = vocab.add_space_prefix is not False
    replace_spaces = normalizers.Replace(" ", _SPM_SPACE)
    hf.normalizer = (
        normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), replace_spaces]) if add_space_prefix else replace_spaces
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(steps)
    return hf


_BUILDERS: Mapping[str, Callable[[GGUFVocab], HFTokenizer]] = MappingProxyType(
    {"gpt2": _build_byte_level, "llama": _build_sentencepiece}
)


def build_hf_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """A `tokenizers.Tokenizer` equivalent to the reference tokenizer.json of this vocabulary.

    Control and unknown tokens become special added tokens (skipped by `decode(skip_special_tokens)`),
    user-defined ones plain added tokens; both are matched whole in the input text, as llama.cpp does.
    """
    builder = _BUILDERS.get(vocab.model)
    if builder is None:
        raise ValueError(f"unsupported GGUF tokenizer model {vocab.model!r}; supported: {sorted(_BUILDERS)}")
    hf = builder(vocab)
    hf.add_special_tokens(_added_tokens(vocab, (TokenType.CONTROL, TokenType.UNKNOWN), special=True))
    hf.add_tokens(_added_tokens(vocab, (TokenType.USER_DEFINED,), special=False))
    return hf


def _added_tokens(vocab: GGUFVocab, types: Sequence[TokenType], special: bool) -> list[AddedToken]:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_type in zip(vocab.tokens, vocab.token_types, strict=True)
        if token_type in types and token
    ]


def default_add_bos_token(vocab: GGUFVocab) -> bool:
    """Whether prompts start with BOS: the file's flag, else llama.cpp's default for its vocabulary."""
    if vocab.add_bos_token is not None:
        return vocab.add_bos_token
    if vocab.model == "llama":
        return True
    return pre_tokenizer_spec(vocab.pre).add_bos_token
