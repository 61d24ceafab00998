"""Grammar-constrained decoding on llguidance: JSON schemas, any JSON object, Lark grammars.

One `GrammarCompiler` per tokenizer builds llguidance's tokenizer (a trie over the vocabulary,
~0.3 s) once and caches compiled grammars, so an agent loop that sends the same tools every turn
compiles them once. `compiler.json_schema(schema)` (and friends) return a `GrammarFactory`, which
is what `SamplingParams.logits_mask_factory` wants: calling it yields a fresh `GrammarMask` (the
engine's `LogitsMask`) per sample.

Masks are computed by llguidance into a packed bitmask (one bit per token, 32 per int32 word) in
tens of microseconds. `GrammarMask.allowed_mask()` unpacks it to a bool tensor the sampler can
`masked_fill` with; `allowed_token_ids()` (a Python list) exists for the generic protocol but is
~100x slower on a 49k vocabulary when most tokens are allowed (free text).

End of sequence: the llguidance tokenizer is told the model's EOS ids, so the mask allows them
exactly when the grammar is in an accepting state, and `is_finished()` turns true once the grammar
can take nothing but EOS (the engine then stops the sequence with finish_reason "stop").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import llguidance
import numpy as np
import torch

from layerserve.text.tool_parsers.base import Constraint
from layerserve.text.tool_parsers.schema import json_schema_rule


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled; the message is user-facing (maps to HTTP 400)."""


class GrammarMask:
    """`LogitsMask` of one sample, driven by an llguidance matcher."""

    __slots__ = ("_matcher", "_vocab_size", "_eos_ids", "_words", "_stop_on_repeat", "_repeated")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: list[int],
                 stop_on_repeat: tuple[str, str] | None = None) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._words = np.empty((vocab_size + 31) // 32, dtype=np.int32)
        self._stop_on_repeat = stop_on_repeat
        self._repeated = False

    def allowed_mask(self) -> torch.Tensor:
        """(V,) bool: True where the token may come next (V = the tokenizer's vocabulary size).

        After an error (a token the grammar did not allow was accepted) or a stop, only EOS is
        allowed, so the sequence ends instead of running on unconstrained.
        """
        if self._repeated or self._matcher.is_error():
            mask = torch.zeros(self._vocab_size, dtype=torch.bool)
            mask[self._eos_ids] = True
            return mask
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the packed mask into `out`, a contiguous CPU int32 tensor of ceil(V / 32) words
        (bit j of word i: token 32 * i + j), e.g. one row of a per-batch buffer."""
        if self._repeated or self._matcher.is_error():
            words = out.numpy().view(np.uint32)
            words[:] = 0
            for t in self._eos_ids:
                words[t // 32] |= np.uint32(1 << (t % 32))
            return
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def allowed_token_ids(self) -> list[int]:
        return self.allowed_mask().nonzero().squeeze(1).tolist()

    def accept(self, token_id: int) -> None:
        # A refused token puts the matcher in its error state; allowed_mask() then ends the sequence.
        self._matcher.consume_token(token_id)
        if self._stop_on_repeat is not None and not self._repeated:
            self._repeated = _repeats(self._matcher, *self._stop_on_repeat)

    def is_finished(self) -> bool:
        return self._repeated or self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete match (EOS would be allowed now)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        """Why the matcher failed, or "" when it has not."""
        return self._matcher.get_error()


def _repeats(matcher: llguidance.LLMatcher, item: str, boundary: str) -> bool:
    """Whether the last item closed by a boundary capture equals an earlier closed item.

    llguidance records a capture each time its rule could end (a call with optional arguments
    "ends" after every argument), so an item is only known complete at the next boundary; its
    final text is the last `item` capture before that boundary."""
    closed: list[bytes] = []
    last = None
    for name, value in matcher.get_captures():
        if name == item:
            last = value
        elif name == boundary and last is not None:
            closed.append(last)
            last = None
    return len(closed) > 1 and closed[-1] in closed[:-1]


class GrammarFactory:
    """A compiled grammar; calling it makes a fresh `GrammarMask` (one per sample)."""

    __slots__ = ("_template", "_vocab_size", "_eos_ids", "_stop_on_repeat", "source")

    def __init__(self, template: llguidance.LLMatcher, vocab_size: int, eos_ids: list[int], source: str,
                 stop_on_repeat: tuple[str, str] | None = None) -> None:
        self._template = template  # never advanced; copied per sample (~1 us)
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._stop_on_repeat = stop_on_repeat
        self.source = source  # the llguidance grammar (JSON text), for logs and tests

    def __call__(self) -> GrammarMask:
        return GrammarMask(self._template.deep_copy(), self._vocab_size, self._eos_ids, self._stop_on_repeat)


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe; build one per loaded model.

    `tokenizer` is a `layerserve.text.tokenizer.Tokenizer`. The llguidance tokenizer is built on
    first use, so a server that never sees a constrained request never pays for it.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self._eos_ids = sorted(tokenizer.eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, tuple[str, str] | None], GrammarFactory] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                tok = self._tokenizer
                self._ll_tokenizer = llguidance.LLTokenizer(
                    tok.hf_tokenizer.to_str(), n_vocab=tok.vocab_size, eos_token=self._eos_ids
                )
            return self._ll_tokenizer

    def json_schema(self, schema: dict[str, Any]) -> GrammarFactory:
        """Output is exactly one JSON value valid under `schema` (compact, json.dumps separators).

        Objects that do not say otherwise get no properties beyond those they list, which every
        valid output of the original schema still satisfies and which keeps small models on track.
        """
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        return self.lark("start: " + json_schema_rule(schema))

    def json_object(self) -> GrammarFactory:
        """Output is any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"})

    def lark(self, source: str) -> GrammarFactory:
        """Output matches a Lark grammar in llguidance's dialect (`%json {...}` inline schemas,
        `<[token id]>` tokens, lazy lexemes)."""
        return self._compile(llguidance.LLMatcher.grammar_from_lark(source))

    def compile(self, constraint: Constraint) -> GrammarFactory:
        """A `Constraint` from the tool layer: its Lark grammar, and the end of output when a
        capture repeats an earlier one (`Constraint.stop_on_repeat`)."""
        grammar = llguidance.LLMatcher.grammar_from_lark(constraint.grammar)
        return self._compile(grammar, constraint.stop_on_repeat)

    def regex(self, pattern: str) -> GrammarFactory:
        return self._compile(llguidance.LLMatcher.grammar_from_regex(pattern))

    def _compile(self, grammar: str, stop_on_repeat: tuple[str, str] | None = None) -> GrammarFactory:
        key = (grammar, stop_on_repeat)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        ll_tokenizer = self.ll_tokenizer
        # Compiling drops the GIL; two threads compiling the same grammar at once just both do it.
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        factory = GrammarFactory(matcher, ll_tokenizer.vocab_size, self._eos_ids, grammar, stop_on_repeat)
        with self._lock:
            self._cache[key] = factory
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return factory
