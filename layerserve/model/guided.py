"""Grammar-constrained decoding on llguidance: JSON schemas, any JSON object, Lark grammars.

One `GrammarCompiler` per tokenizer builds llguidance's tokenizer (a trie over the vocabulary,
~0.3 s) once and caches compiled grammars, so an agent loop that sends the same tools every turn
compiles them once. `compiler.compile(constraint)` (a `Constraint` planned by the tool layer),
`compiler.json_schema(schema)` and friends return a `GrammarFactory`, which is what
`SamplingParams.logits_mask_factory` wants: calling it yields a fresh `GrammarMask` (the engine's
`LogitsMask`) per sample.

Masks are computed by llguidance into a packed bitmask (one bit per token, 32 per int32 word):
~0.1 ms per token on the default model's 49k vocabulary. `GrammarMask.allowed_mask()` (the engine's
`LogitsMask` protocol) unpacks it to a bool tensor for `masked_fill` (~0.05 ms more);
`fill_bitmask()` writes the packed words into a caller's buffer; `allowed_token_ids()` is a
convenience for tests (a Python list: 3-10 ms when most tokens are allowed, never per step).

End of sequence: the llguidance tokenizer is told the model's EOS ids, so the mask allows them
exactly when the grammar is in an accepting state, and `is_finished()` turns true once the grammar
can take nothing but EOS (the engine then stops the sequence with finish_reason "stop").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from layerserve.text.tool_parsers.base import Constraint
from layerserve.text.tool_parsers.schema import json_schema_rule


class GrammarError(ValueError):
    """The schema or grammar cannot be compiled; the message is user-facing (maps to HTTP 400)."""


@dataclass(frozen=True, slots=True)
class _Shared:
    """What every mask of one compiled grammar shares."""

    ll_tokenizer: llguidance.LLTokenizer
    vocab_size: int
    eos_ids: list[int]
    stop_after: bytes | None  # Constraint.stop_after, encoded
    stop_when: Callable[[str], bool] | None


class GrammarMask:
    """`LogitsMask` of one sample, driven by an llguidance matcher."""

    __slots__ = ("_matcher", "_shared", "_words", "_output", "_stopped")

    def __init__(self, matcher: llguidance.LLMatcher, shared: _Shared) -> None:
        self._matcher = matcher
        self._shared = shared
        self._words = np.empty((shared.vocab_size + 31) // 32, dtype=np.int32)
        self._output = bytearray()  # kept only for a stop check
        self._stopped = False  # the constraint's stop check fired

    def allowed_mask(self) -> torch.Tensor:
        """(V,) bool: True where the token may come next (V = the tokenizer's vocabulary size).

        After an error (a token the grammar did not allow was accepted) or a stop check, only
        EOS is allowed, so the sequence ends instead of running on unconstrained.
        """
        if self._stopped or self._matcher.is_error():
            mask = torch.zeros(self._shared.vocab_size, dtype=torch.bool)
            mask[self._shared.eos_ids] = True
            return mask
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._shared.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def fill_bitmask(self, out: torch.Tensor) -> None:
        """Write the packed mask into `out`, a contiguous CPU int32 tensor of ceil(V / 32) words
        (bit j of word i: token 32 * i + j), e.g. one row of a per-batch buffer."""
        if self._stopped or self._matcher.is_error():
            words = out.numpy().view(np.uint32)
            words[:] = 0
            for t in self._shared.eos_ids:
                words[t // 32] |= np.uint32(1 << (t % 32))
            return
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * 4)

    def allowed_token_ids(self) -> list[int]:
        return self.allowed_mask().nonzero().squeeze(1).tolist()

    def accept(self, token_id: int) -> None:
        # A refused token puts the matcher in its error state; allowed_mask() then ends the sequence.
        self._matcher.consume_token(token_id)
        shared = self._shared
        if shared.stop_after is not None and shared.stop_when is not None and not self._stopped:
            self._output += shared.ll_tokenizer.decode_bytes([token_id])
            if self._output.endswith(shared.stop_after):
                self._stopped = shared.stop_when(self._output.decode("utf-8", errors="replace"))

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the grammar admits from here (speculative drafts). 0 under a
        stop check, whose state follows the output bytes and is not rolled back."""
        if self._stopped or self._shared.stop_after is not None or self._matcher.is_error():
            return 0
        return self._matcher.validate_tokens(tokens)

    def draft_masks(self, tokens: list[int]) -> list[torch.Tensor]:
        """The allowed-token masks after each prefix of `tokens` (len(tokens) + 1 of them, the first
        one now), for `tokens` the grammar admits (valid_prefix); the state is left as it was."""
        masks = [self.allowed_mask()]
        for token in tokens:
            self._matcher.consume_token(token)
            masks.append(self.allowed_mask())
        self._matcher.rollback(len(tokens))
        return masks

    def is_finished(self) -> bool:
        return self._stopped or self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """Whether the text so far is a complete match (EOS would be allowed now)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        """Why the matcher failed, or "" when it has not."""
        return self._matcher.get_error()


class GrammarFactory:
    """A compiled grammar; calling it makes a fresh `GrammarMask` (one per sample)."""

    __slots__ = ("_template", "_shared", "source")

    def __init__(self, template: llguidance.LLMatcher, shared: _Shared, source: str) -> None:
        self._template = template  # never advanced; copied per sample (~1 us)
        self._shared = shared
        self.source = source  # the llguidance grammar (JSON text), for logs and tests

    def __call__(self) -> GrammarMask:
        return GrammarMask(self._template.deep_copy(), self._shared)


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe; build one per loaded model.

    `tokenizer` is a `layerserve.text.tokenizer.Tokenizer`. The llguidance tokenizer is built on
    first use, so a server that never sees a constrained request never pays for it.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self._eos_ids = sorted(tokenizer.eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> template matcher
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
        return self._factory(llguidance.LLMatcher.grammar_from_lark(source))

    def compile(self, constraint: Constraint) -> GrammarFactory:
        """A `Constraint` from the tool layer: its Lark grammar and its stop check."""
        grammar = llguidance.LLMatcher.grammar_from_lark(constraint.grammar)
        stop_after = constraint.stop_after.encode("utf-8") if constraint.stop_after else None
        return self._factory(grammar, stop_after, constraint.stop_when)

    def regex(self, pattern: str) -> GrammarFactory:
        return self._factory(llguidance.LLMatcher.grammar_from_regex(pattern))

    def _factory(self, grammar: str, stop_after: bytes | None = None,
                 stop_when: Callable[[str], bool] | None = None) -> GrammarFactory:
        template = self._template(grammar)
        ll_tokenizer = self.ll_tokenizer
        shared = _Shared(ll_tokenizer, ll_tokenizer.vocab_size, self._eos_ids, stop_after, stop_when)
        return GrammarFactory(template, shared, grammar)

    def _template(self, grammar: str) -> llguidance.LLMatcher:
        """The compiled matcher for a grammar, from the cache when it is there."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        # Compiling drops the GIL; two threads compiling the same grammar at once just both do it.
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid grammar: {matcher.get_error()}")
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher
