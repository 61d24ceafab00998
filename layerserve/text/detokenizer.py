"""Token ids -> text, one token at a time, for streaming.

Decoding one token alone is wrong in two ways: a token may carry only part of a UTF-8 character
(emoji and CJK are often split across tokens), and some decoders depend on the neighbouring token
(SentencePiece drops the leading space of the first token). So each step decodes a short window of
recent tokens twice and emits the difference:

    ids:   ... | prefix_offset ........ read_offset ......... len(ids)
                 [ already emitted    ][ not yet emitted     ]
    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])            -> emit new_text[len(prefix_text):]

Text ending in U+FFFD is held back until the character completes. The window stays a few tokens
long, so each step costs O(1), not O(length of the output).
"""

from __future__ import annotations

from collections.abc import Sequence

from layerserve.text.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decoding context: enough for a SentencePiece space or a split character.
_PROMPT_CONTEXT_TOKENS = 5
# Most tokens held back waiting for text: a UTF-8 character is at most 4 bytes, so past this the
# window is not an unfinished character but a stream that never completes one (invalid bytes, or
# special tokens that decode to nothing), and it is emitted as it decodes (U+FFFD included). Without
# the bound such a stream grew the window by a token per step: O(length^2) on the engine thread.
MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, never emitting half a character.

    Invariant: the pieces returned by `add` (plus `flush` at the end) concatenate to
    `tokenizer.decode(generated_ids, skip_special_tokens)`, when decoding without prompt context
    or with a byte-level vocabulary. With `prompt_ids` under a SentencePiece vocabulary the first
    token keeps its leading space, as it has in the full sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context  # decoding context + generated ids; only the tail is ever decoded
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" when it completes none)."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return the text still held back (an unfinished character, as U+FFFD) at end of output."""
        return self._emit(final=True)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        window = self._ids[self._prefix_offset :]
        prefix_text = decode(window[: self._read_offset - self._prefix_offset], self._skip_special_tokens)
        new_text = decode(window, self._skip_special_tokens)
        holding = len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)
        if not final and holding and len(self._ids) - self._read_offset < MAX_PENDING_TOKENS:
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # The window only needs ids from prefix_offset on; drop the rest to keep memory flat.
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        if delta:
            self._pieces.append(delta)
        return delta
