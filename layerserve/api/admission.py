"""Backpressure: a bound on generation requests in flight, and their deadlines.

The engine runs up to `max_num_seqs` requests at once; up to `max_queued_requests` more may wait.
Past that, new requests get 429 with a Retry-After header at once, instead of piling up in
memory. Everything here runs on the event loop (no locks).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from layerserve.api.errors import TooManyRequestsError

# The OpenAI SDKs send their own timeout (seconds) in this header: past it the client has given up.
CLIENT_TIMEOUT_HEADER = "x-stainless-timeout"


class Ticket:
    """One admitted request; `release()` (idempotent) frees its place."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.admitted -= 1
            self._admission = None


@dataclass(slots=True)
class Admission:
    running_capacity: int  # requests the engine runs at once
    max_queued: int  # requests that may wait beyond those
    admitted: int = 0

    @property
    def limit(self) -> int:
        return self.running_capacity + self.max_queued

    def admit(self) -> Ticket:
        if self.admitted >= self.limit:
            raise TooManyRequestsError(
                f"The server is at capacity: {self.running_capacity} requests running and {self.max_queued} "
                f"waiting (--max-queued-requests). Retry shortly.", retry_after=1)
        self.admitted += 1
        return Ticket(self)


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
