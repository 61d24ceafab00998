"""Strings <-> token ids, over a Hugging Face `tokenizers.Tokenizer` built from a GGUF file or a
model directory's tokenizer.json. The server never imports `transformers`."""

from __future__ import annotations

import enum
import json
import os
import pathlib
import re
import secrets
import threading
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

# Placeholders for special-token strings found in request text (see `PromptLiterals`): private-use
# characters, which no template markup and no vocabulary's special token is made of.
_OPEN, _CLOSE = "\ue000", "\ue001"
_NONCE_CHARS = 8  # from U+E002..U+F8FF: about 2^100 nonces


class TokenSpelling(enum.Enum):
    """How a vocabulary writes a token's bytes in its token string."""

    BYTE_LEVEL = "byte_level"  # GPT-2 byte alphabet ("Ġ" is a space byte)
    SENTENCEPIECE = "sentencepiece"  # "▁" is a space, "<0xNN>" is one raw byte
    PLAIN = "plain"  # anything else: ask the decoder


class PromptLiterals:
    """Keeps one request's own text literal through a chat template.

    `hide` is applied to every string the request supplied (message content, names, tool-call ids
    and arguments, tool schemas, chat_template_kwargs values) before the template renders: each
    special-token string in it ("<|im_end|>") becomes a placeholder of private-use characters
    carrying a random per-request nonce. Every special-token string in the rendered text then
    comes from the template itself; `Tokenizer.encode_prompt` makes those control tokens and puts
    the literal text back (`restore`) inside the text it encodes as plain text.

    Guessing a nonce gains nothing: a forged placeholder is restored to literal text, which is
    still encoded as plain text.
    """

    __slots__ = ("_find", "_index", "_tokens", "_open", "_restore")

    def __init__(self, find: re.Pattern[str] | None, tokens: tuple[str, ...], index: dict[str, int]) -> None:
        self._find = find  # matches any of `tokens`
        self._tokens = tokens  # the special-token strings
        self._index = index  # string -> its index in `tokens`
        self._open = _OPEN + "".join(chr(0xE002 + secrets.randbelow(0xF900 - 0xE002)) for _ in range(_NONCE_CHARS))
        self._restore: re.Pattern[str] | None = None  # compiled once something was hidden

    def hide(self, text: str) -> str:
        """`text` with every special-token string replaced by its placeholder."""
        if self._find is None or self._find.search(text) is None:
            return text
        if self._restore is None:
            self._restore = re.compile(re.escape(self._open) + r"(\d+)" + re.escape(_CLOSE))
        return self._find.sub(self._swap, text)

    def _swap(self, match: re.Match[str]) -> str:
        return f"{self._open}{self._index[match.group()]}{_CLOSE}"

    def restore(self, text: str) -> str:
        """`text` with the placeholders turned back into the literal strings they stand for."""
        if self._restore is None:
            return text
        return self._restore.sub(self._unswap, text)

    def _unswap(self, match: re.Match[str]) -> str:
        index = int(match.group(1))
        return self._tokens[index] if index < len(self._tokens) else match.group()

    def restored_length(self, text: str) -> int:
        """len(restore(text)), without building it."""
        if self._restore is None:
            return len(text)
        return len(text) + sum(len(self._unswap(m)) - len(m.group()) for m in self._restore.finditer(text))


class Tokenizer:
    """A model's tokenizer: text <-> ids, special tokens, chat template and BOS/EOS conventions.

    Two ways in: `encode` parses special-token strings in the text (for a raw prompt, which its
    caller writes whole), and `encode_prompt` encodes a chat template's output, where only the
    template's own markup may become control tokens (see `PromptLiterals`).
    """

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
        specials = {token.content: index for index, token in added.items() if token.special and token.content}
        self.special_tokens: tuple[str, ...] = tuple(sorted(specials, key=lambda t: (-len(t), t)))
        self._special_index = {token: i for i, token in enumerate(self.special_tokens)}
        self._special_to_id = specials
        # Longest first: the same leftmost-longest match the tokenizer's added vocabulary makes.
        self._find_special = re.compile("|".join(map(re.escape, self.special_tokens))) if specials else None
        self._split_special = _split_pattern([added[i] for i in specials.values()])
        self._plain: tuple[HFTokenizer, HFTokenizer] | None = None  # built on first use (~0.3 s)
        self._plain_lock = threading.Lock()
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

        This is for text whose author writes the whole prompt (a legacy /v1/completions prompt,
        as every OpenAI-compatible server treats it); a chat template's output goes through
        `encode_prompt`, so that what users wrote stays text.

        With `add_special_tokens`, BOS is prepended when the model wants one (`add_bos_token`) and
        the text does not already start with it.
        """
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_special_tokens else ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with every special-token string in it spelled as text."""
        return self._plain_tokenizers()[0].encode(text, add_special_tokens=False).ids

    def literals(self) -> PromptLiterals:
        """A fresh `PromptLiterals` for one request's rendering."""
        return PromptLiterals(self._find_special, self.special_tokens, self._special_index)

    def encode_prompt(self, text: str, literals: PromptLiterals | None = None,
                      add_special_tokens: bool = False) -> list[int]:
        """Token ids of a chat template's output: the special-token strings in `text` become control
        tokens, everything between them is plain text (with `literals`' placeholders restored to
        the request's literal text first).

        Without placeholders this equals `encode(text)`: the text is split where the tokenizer's
        added vocabulary splits it, and each piece is encoded as the tokenizer encodes it in place
        (a SentencePiece "first" space prefix only at the very start). `add_special_tokens`: as
        in `encode`.
        """
        ids: list[int] = []
        pos = 0
        split = self._split_special
        if split is not None:
            for match in split.finditer(text):
                if match.start() > pos:
                    ids += self._encode_piece(text[pos:match.start()], pos, literals)
                ids.append(self._special_to_id[match.group(match.lastindex)])
                pos = match.end()
        if pos < len(text):
            ids += self._encode_piece(text[pos:], pos, literals)
        return self._with_bos(ids) if add_special_tokens else ids

    def _encode_piece(self, text: str, start: int, literals: PromptLiterals | None) -> list[int]:
        if literals is not None:
            text = literals.restore(text)
        first, rest = self._plain_tokenizers()
        return (first if start == 0 else rest).encode(text, add_special_tokens=False).ids

    def _plain_tokenizers(self) -> tuple[HFTokenizer, HFTokenizer]:
        plain = self._plain
        if plain is None:
            with self._plain_lock:
                if self._plain is None:
                    self._plain = _plain_tokenizers(self._hf)
                plain = self._plain
        return plain

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_token_id
        if self.add_bos_token and bos is not None and ids[:1] != [bos]:
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


def _split_pattern(tokens: Sequence[Any]) -> re.Pattern[str] | None:
    """A regex matching the special tokens (`tokenizers.AddedToken`s) as the added vocabulary
    does: longest first, with the whitespace an `lstrip`/`rstrip` token takes, and a
    `single_word` token only between non-word characters. Each alternative has one group, the
    token's content (`match.group(match.lastindex)`)."""
    if not tokens:
        return None
    parts = []
    for token in sorted(tokens, key=lambda t: (-len(t.content), t.content)):
        part = re.escape(token.content)
        if token.single_word:
            part = rf"(?<!\w){part}(?!\w)"
        parts.append(("\\s*" if token.lstrip else "") + f"({part})" + ("\\s*" if token.rstrip else ""))
    return re.compile("|".join(parts))


def _plain_tokenizers(hf: HFTokenizer) -> tuple[HFTokenizer, HFTokenizer]:
    """Copies of `hf` that encode special-token strings as text (never toggled on the shared
    tokenizer: encoding runs on several threads). The second is for text that does not start the
    prompt: a SentencePiece pre-tokenizer that prefixes a space only to the first piece
    (`prepend_scheme: first`) does not prefix it there, just as when the whole prompt is encoded."""
    spec = json.loads(hf.to_str())
    first = HFTokenizer.from_str(json.dumps(spec))
    first.encode_special_tokens = True
    if not _never_prepend(spec.get("pre_tokenizer")):
        return first, first
    rest = HFTokenizer.from_str(json.dumps(spec))
    rest.encode_special_tokens = True
    return first, rest


def _never_prepend(node: Any) -> bool:
    """Turn every `prepend_scheme: first` Metaspace in a tokenizer.json component into `never`;
    whether there was one."""
    found = False
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
            found = True
        for value in node.values():
            found |= _never_prepend(value)
    elif isinstance(node, list):
        for value in node:
            found |= _never_prepend(value)
    return found


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
