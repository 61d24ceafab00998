"""What every route that runs a chat turn does around it, whichever API it speaks: the request's
log fields, its timeout, an admission ticket sized by its prompt, and the ChatTurn itself, with
one `close` that releases them all (called when the response or the stream ends)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from layerserve.api.admission import request_timeout
from layerserve.api.chat_turn import ChatTurn
from layerserve.api.errors import InvalidRequestError
from layerserve.api.observe import log_fields
from layerserve.sessions.turn import SessionTurn

SESSION_HEADER = "x-layerscale-session-id"  # runs a chat turn in a session, on either chat surface


@dataclass(slots=True)
class OpenTurn:
    turn: ChatTurn
    timeout: float | None  # seconds the request may run (None: no bound)
    close: Callable[[], None]


def open_turn(request: Request, state, rt, turn_id: str, prompt_ids: list[int], n: int,
              make: Callable[[], ChatTurn]) -> OpenTurn:
    """Admit `n` sequences of `prompt_ids` (the queue bound raises when full), then `make()` the
    turn; a failure in between gives the ticket back."""
    fields = log_fields(request)
    fields["id"] = turn_id
    if state.config.log_prompts:
        fields["prompt"] = json.dumps(rt.tokenizer.decode(prompt_ids, skip_special_tokens=False)[-2000:])
    timeout = request_timeout(request, state.config.request_timeout)
    ticket = state.admission.admit(n, n * len(prompt_ids))
    try:
        turn = make()
    except BaseException:
        ticket.release()
        raise

    def close() -> None:
        turn.close()
        ticket.release()
        fields.update(turn.log_fields())

    return OpenTurn(turn, timeout, close)


async def open_session_turn(request: Request, store) -> SessionTurn | None:
    """The request's session turn when it names a session in the header (404 for an unknown one,
    409 while a turn or question is on it), claimed and with background work out of its way."""
    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None:
        return None
    if store is None:
        raise InvalidRequestError("Sessions are not available on this server.", SESSION_HEADER)
    turn = SessionTurn(store, store.get(session_id))
    await turn.open()
    return turn
