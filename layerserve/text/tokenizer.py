"""Strings <-> token ids, over a Hugging Face `tokenizers.Tokenizer` built from a GGUF file or a
model directory's tokenizer.json. The server never imports `transformers`."""

from __future__ import annotations

import enum
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer

from layerserve.text.gguf_metadata import read_gguf_metadata
from layerserve.text.gguf_vocab import (
    BYTE_DECODER,
    build_hf_tokenizer,
    default_add_bos_token,
    read_gguf_vocab,
    reader_metadata,
)

if TYPE_CHECKING:
    import gguf

# End-of-turn tokens that stop generation besides EOS, when the vocabulary has them as special
# tokens (the same list llama.cpp uses for its end-of-generation set).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "<｜end▁of▁sentence｜>",
)

_SPM_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenSpelling(enum.Enum):
    """How a vocabulary writes a token's bytes in its token string."""

    BYTE_LEVEL = "byte_level"  # GPT-2 byte alphabet ("Ġ" is a space byte)
    SENTENCEPIECE = "sentencepiece"  # "▁" is a space, "<0xNN>" is one raw byte
    PLAIN = "plain"  # anything else: ask the decoder


class Tokenizer:
    """A model's tokenizer: text <-> ids, special tokens, chat template and BOS/EOS conventions."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None,
        add_bos_token: bool,
        spelling: TokenSpelling,
        vocab_size: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._hf = hf
        self._spelling = spelling
        added = hf.get_added_tokens_decoder()
        self._added = {index: token.content for index, token in added.items()}
        self._special_ids = frozenset(index for index, token in added.items() if token.special)
        self.vocab_size: int = vocab_size if vocab_size is not None else hf.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.bos_token: str = self._token_text(bos_token_id)
        self.eos_token: str = self._token_text(eos_token_id)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        end_ids = {hf.token_to_id(token) for token in END_OF_TURN_TOKENS}
        self.eos_token_ids: frozenset[int] = frozenset(
            {i for i in end_ids if i is not None and i in self._special_ids}
            | ({eos_token_id} if eos_token_id is not None else set())
            | set(extra_eos_token_ids)
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], reader: gguf.GGUFReader | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file describes.

        Pass `reader` to reuse an already open file; without it only the metadata section is read
        (much faster than opening a `gguf.GGUFReader`).
        """
        metadata = read_gguf_metadata(path) if reader is None else reader_metadata(reader)
        vocab = read_gguf_vocab(metadata)
        return cls(
            build_hf_tokenizer(vocab),
            bos_token_id=vocab.bos_token_id,
            eos_token_id=vocab.eos_token_id,
            chat_template=vocab.chat_template,
            add_bos_token=default_add_bos_token(vocab),
            spelling=TokenSpelling.BYTE_LEVEL if vocab.model == "gpt2" else TokenSpelling.SENTENCEPIECE,
            vocab_size=len(vocab.tokens),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json (and, when present, chat_template.jinja and
        generation_config.json's extra EOS ids) from a Hugging Face model directory."""
        directory = pathlib.Path(path)
        tokenizer_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
        hf = HFTokenizer.from_str(tokenizer_json)
        config = _read_json(directory / "tokenizer_config.json")
        bos_id = _token_id(hf, config.get("bos_token"))
        eos_id = _token_id(hf, config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # No flag: a post-processor that adds BOS (Llama 3) says so itself.
            add_bos = bos_id is not None and hf.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id")
        return cls(
            hf,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            chat_template=_dir_chat_template(directory, config),
            add_bos_token=add_bos,
            spelling=_spelling_of(json.loads(tokenizer_json)),
            extra_eos_token_ids=_int_list(generation_eos),
        )

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for grammar libraries that take one; don't mutate)."""
        return self._hf

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text ("<|im_start|>") become those tokens.

        With `add_special_tokens`, BOS is prepended when the model wants one (`add_bos_token`) and
        the text does not already start with it.
        """
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 comes out as U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes this one token stands for (possibly part of a UTF-8 character)."""
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._hf.id_to_token(token_id)
        if token is None:
            return b""
        if self._spelling is TokenSpelling.BYTE_LEVEL:
            if all(c in BYTE_DECODER for c in token):
                return bytes(BYTE_DECODER[c] for c in token)
            return token.encode("utf-8")
        if self._spelling is TokenSpelling.SENTENCEPIECE:
            match = _SPM_BYTE_TOKEN.fullmatch(token)
            if match is not None:
                return bytes([int(match.group(1), 16)])
            return token.replace("\u2581", " ").encode("utf-8")
        return self._hf.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def token_str(self, token_id: int) -> str:
        """`token_bytes` as text, undecodable bytes replaced (OpenAI's logprobs `token`)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        """Whether this is a special (control) token, which `decode` skips by default."""
        return token_id in self._special_ids

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._added.get(token_id) or self._hf.id_to_token(token_id) or ""


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _token_id(hf: HFTokenizer, token: Any) -> int | None:
    """Id of a tokenizer_config token entry: a string, an AddedToken dict, or null."""
    if isinstance(token, dict):
        token = token.get("content")
    return hf.token_to_id(token) if isinstance(token, str) else None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _dir_chat_template(directory: pathlib.Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja if present, else tokenizer_config's (a string or a list of named ones)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def _spelling_of(tokenizer_json: dict[str, Any]) -> TokenSpelling:
    decoder = tokenizer_json.get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {step.get("type") for step in steps if isinstance(step, dict)}
    if "ByteLevel" in types:
        return TokenSpelling.BYTE_LEVEL
    if types & {"ByteFallback", "Metaspace"} or (tokenizer_json.get("model") or {}).get("byte_fallback"):
        return TokenSpelling.SENTENCEPIECE
    return TokenSpelling.PLAIN
