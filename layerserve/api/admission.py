"""Backpressure: a bound on the sequences and prompt tokens in flight, and request deadlines.

The engine runs up to `max_num_seqs` sequences at once; up to `max_queued_requests` more may wait,
and the prompt tokens of all of them are bounded by `max_queued_tokens`. A request that does not
fit gets 429 with a Retry-After header at once, instead of piling up in memory; one that could
never fit gets 400. Everything here runs on the event loop (no locks).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from layerserve.api.errors import InvalidRequestError, TooManyRequestsError

# The OpenAI SDKs send their own timeout (seconds) in this header: past it the client has given up.
CLIENT_TIMEOUT_HEADER = "x-stainless-timeout"


class Ticket:
    """One admitted request's share of the bound; `release()` (idempotent) gives it back."""

    __slots__ = ("_admission", "sequences", "tokens")

    def __init__(self, admission: Admission, sequences: int, tokens: int) -> None:
        self._admission: Admission | None = admission
        self.sequences = sequences
        self.tokens = tokens

    def release(self) -> None:
        if self._admission is not None:
            self._admission.sequences -= self.sequences
            self._admission.tokens -= self.tokens
            self._admission.requests -= 1
            self._admission = None


@dataclass(slots=True)
class Admission:
    """Counts what the engine will hold, not HTTP requests: one /v1/completions request with 100
    prompts and n=16 is 1,600 sequences, each with its own copy of its prompt's tokens."""

    running_capacity: int  # sequences the engine runs at once (--max-num-seqs)
    max_queued: int  # sequences that may wait beyond those (--max-queued-requests)
    max_tokens: int  # prompt tokens, summed over the sequences admitted (--max-queued-tokens)
    sequences: int = 0
    tokens: int = 0
    requests: int = 0

    @property
    def limit(self) -> int:
        return self.running_capacity + self.max_queued

    def admit(self, sequences: int, tokens: int) -> Ticket:
        """A ticket for a request of `sequences` sequences holding `tokens` prompt tokens in all.
        429 when it does not fit in what may wait now; 400 when it never could (retrying is futile)."""
        if sequences > self.limit or tokens > self.max_tokens:
            raise InvalidRequestError(
                f"This request needs {sequences} sequences (prompts x n) and {tokens} prompt tokens; the server "
                f"admits at most {self.limit} sequences (--max-num-seqs + --max-queued-requests) and "
                f"{self.max_tokens} prompt tokens (--max-queued-tokens) at once. Send fewer prompts or a smaller n.",
                "n", "request_too_large")
        if self.sequences + sequences > self.limit or self.tokens + tokens > self.max_tokens:
            raise TooManyRequestsError(
                f"The server is at capacity: {self.sequences} of {self.limit} sequences admitted "
                f"({self.running_capacity} running, {self.max_queued} waiting: --max-queued-requests) and "
                f"{self.tokens} of {self.max_tokens} prompt tokens (--max-queued-tokens); this request needs "
                f"{sequences} and {tokens}. Retry shortly.", retry_after=1)
        self.sequences += sequences
        self.tokens += tokens
        self.requests += 1
        return Ticket(self, sequences, tokens)


def request_timeout(request: Request, server_limit: float | None) -> float | None:
    """Seconds this request may run: the server's --request-timeout, shortened by the client's own
    timeout when its SDK announces one (past it, nobody is waiting for the answer)."""
    limits = [server_limit] if server_limit else []
    header = request.headers.get(CLIENT_TIMEOUT_HEADER)
    if header:
        try:
            client = float(header)
        except ValueError:
            client = 0.0
        if client > 0:
            limits.append(client)
    return min(limits) if limits else None
