"""What the router needs to know of a request, read off it at the ingress: the `Route` travels as
the first argument of every call to a replica, where `AffinityRouter.choose_replicas` reads it."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

SESSION_HEADER = "x-layerscale-session-id"
SESSION_PATH = re.compile(r"/v1/sessions/([^/]+)(?:/.*)?")
PREFIX_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens")
MAX_PREFIX_CHARS = 64 << 10  # the router keys on at most this much of a prompt's text


@dataclass(frozen=True, slots=True)
class Route:
    """kind: "session" (to the replica holding `session_id`, placed on the least-loaded one when
    none does), "place" (a new session: least loaded), "prefix" (the replica most likely to hold
    `prefix`'s KV, unless its queue is too long), "rank" (the `rank`-th replica by id: fan-out),
    or "any" (least loaded). `pin` names a replica to prefer over all of that (a redirect, or the
    second half of a socket)."""

    kind: str = "any"
    session_id: str | None = None
    prefix: str = ""
    rank: int = 0
    pin: str | None = None
    load: bool = True  # counts as load while in flight (not a stream that mostly waits: events, a socket)


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(12)  # the form SessionStore.create gives one


def route_for(method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[Route, bytes]:
    """The route of one HTTP request, and its body (a session create without an id gets one here,
    so that the router knows the new session's id when it places it)."""
    header = headers.get(SESSION_HEADER)
    if header:
        return Route("session", session_id=header), body
    match = SESSION_PATH.fullmatch(path)
    if match:
        return Route("session", session_id=match.group(1), load=not path.endswith("/events")), body
    if path == "/v1/sessions" and method == "POST":
        doc = _json(body)
        if isinstance(doc, dict):
            if doc.get("id") is None:
                doc["id"] = new_session_id()
                body = json.dumps(doc).encode()
            if isinstance(doc["id"], str):
                return Route("place", session_id=doc["id"]), body
        return Route("any"), body
    if method == "POST" and path in PREFIX_PATHS:
        return Route("prefix", prefix=prompt_text(_json(body))), body
    return Route("any"), body


def prompt_text(doc: Any) -> str:
    """The text a request's prompt starts with, in the order a chat template renders it: tools and
    system first, then each message's role and content (OpenAI or Anthropic shapes), or the
    legacy `prompt`. Not the exact rendering, only a key whose prefixes track the prompt's."""
    if not isinstance(doc, dict):
        return ""
    parts: list[str] = []
    if doc.get("tools"):
        parts.append(json.dumps(doc["tools"], sort_keys=True))
    if doc.get("system") is not None:
        parts.append("system:" + _text(doc["system"]))
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                parts.append(f"{message.get('role')}:{_text(message.get('content'))}"
                             f"{_text(message.get('tool_calls'))}")
    elif doc.get("prompt") is not None:
        parts.append(_text(doc["prompt"]))
    return "\n".join(parts)[:MAX_PREFIX_CHARS]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        if "content" in value:
            return _text(value["content"])
        return json.dumps(value, sort_keys=True)
    return str(value)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
