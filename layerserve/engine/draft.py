"""Prompt-lookup drafting: propose the tokens that followed the last occurrence of a sequence's suffix.

Agentic and tool-call turns copy their context (a tool result's field names, a file being edited,
JSON keys of a schema); when the last `n` tokens appeared before, the tokens that followed them
there are a good guess for what comes next. The scheduler asks for a draft for each decoding
sequence, the runner computes the draft's rows in the same forward as the real token and samples
every row as it would have without the draft (same noise key per output position, same masks and
penalties); the draft is kept up to its first token that differs from what was sampled, and the
sampled token there is kept too. So output is what it would have been without drafting, token for
token wherever the logits are the same (the row count changes float rounding only).

The index maps every n-gram of the sequence (n = min_ngram..max_ngram) to the position after its
latest occurrence, updated incrementally as tokens are appended: O(new tokens) per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerserve.config import SpeculativeConfig


@dataclass(slots=True)
class NgramIndex:
    """Per sequence: n-gram -> end of its latest occurrence, for every end before `indexed`."""

    ends: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # positions < indexed have had their n-grams ending there recorded
    backoff: int = 0  # steps to skip after the next fully rejected draft (doubles while they fail)
    skip: int = 0  # steps left without drafting


@dataclass(slots=True)
class DraftStats:
    drafted: int = 0  # draft tokens computed
    accepted: int = 0  # of which kept
    steps: int = 0  # sequence-steps that carried a draft


class PromptLookup:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.stats = DraftStats()

    def propose(self, tokens: list[int], index: NgramIndex, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest matching
        suffix of `tokens` (n from max_ngram down to min_ngram); [] when none matches."""
        c = self.config
        end = len(tokens)
        # record n-grams ending at positions up to end - 1 (the suffix itself ends at `end`)
        for e in range(max(index.indexed, c.min_ngram), end):
            for n in range(c.min_ngram, min(c.max_ngram, e) + 1):
                index.ends[tuple(tokens[e - n:e])] = e
        index.indexed = max(index.indexed, end)
        if limit <= 0:
            return []
        for n in range(min(c.max_ngram, end - 1), c.min_ngram - 1, -1):
            start = index.ends.get(tuple(tokens[end - n:]))
            if start is not None:
                return tokens[start:start + limit]
        return []

    def record(self, index: NgramIndex, drafted: int, accepted: int) -> None:
        """After a verification: a sequence whose drafts are all rejected drafts again only after 1,
        2, 4 ... 16 steps (text that does not copy its context stops paying for rows it throws
        away); one kept token resets that."""
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.steps += 1
        if accepted:
            index.backoff = 0
        else:
            index.backoff = min(2 * index.backoff or 1, 16)
            index.skip = index.backoff

    @staticmethod
    def waiting(index: NgramIndex) -> bool:
        """Whether the sequence sits out this step (after rejected drafts); counts the step."""
        if index.skip > 0:
            index.skip -= 1
            return True
        return False
