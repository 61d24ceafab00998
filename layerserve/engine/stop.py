"""Stop conditions as pure functions: EOS / stop ids, max_tokens, context length, stop strings."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from layerserve.engine.request import FinishReason, SamplingParams


def check_token_stop(
    token_id: int,
    num_output_tokens: int,
    num_tokens: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    max_model_len: int,
) -> tuple[FinishReason, int | None] | None:
    """Finish reason (and the stop token id) after appending `token_id`, or None to go on."""
    if token_id in params.stop_token_ids:
        return FinishReason.STOP, token_id
    if not params.ignore_eos and token_id in eos_token_ids:
        return FinishReason.STOP, None
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        return FinishReason.LENGTH, None
    if num_tokens >= max_model_len:
        return FinishReason.LENGTH, None
    return None


def _failure(pattern: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of pattern[:i + 1] that
    is also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    """Finds stop strings in text that arrives piece by piece, in O(new text) per piece.

    One KMP automaton per stop string; its state is the length of the longest prefix of that stop
    string the text ends with. So the text to hold back (it could still become a stop string) is
    the largest state, and nothing ever rescans or slices what came before. Building costs
    O(total stop length) once per sequence.
    """

    __slots__ = ("stops", "_fail", "_state", "steps")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.steps = 0  # automaton transitions taken (amortized <= 2 per character per stop string)

    def feed(self, offset: int, piece: str) -> tuple[int, str] | None:
        """Advance over `piece`, which starts at index `offset` of the text.

        Returns (index where it starts, the stop string) of the earliest-starting stop string that
        is completed inside `piece`, or None.
        """
        best: tuple[int, str] | None = None
        for k, stop in enumerate(self.stops):
            fail, q, m = self._fail[k], self._state[k], len(stop)
            for i, c in enumerate(piece):
                while q and stop[q] != c:
                    q = fail[q - 1]
                    self.steps += 1
                if stop[q] == c:
                    q += 1
                self.steps += 1
                if q == m:
                    start = offset + i + 1 - m
                    if best is None or start < best[0]:
                        best = (start, stop)
                    q = fail[q - 1]  # the sequence ends here; keep the state a proper prefix
                    break
            self._state[k] = q
        return best

    def held(self) -> int:
        """Characters at the end of the text that are the beginning of some stop string."""
        return max(self._state, default=0)
