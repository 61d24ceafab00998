"""API-key check for the /v1 routes: `Authorization: Bearer KEY` or `x-api-key: KEY`.

Keys are compared as SHA-256 digests with `hmac.compare_digest`, so the time taken says nothing
about how much of a guess was right, not even its length. Without a configured key every
request passes (any `api_key` the SDK sends is fine).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from layerserve.api.errors import AuthenticationError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def supplied_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")


class ApiKeyCheck:
    """A FastAPI dependency; raises AuthenticationError (401) unless the request carries the key."""

    def __init__(self, api_key: str | None) -> None:
        self._digest = _digest(api_key) if api_key else None

    async def __call__(self, request: Request) -> None:
        if self._digest is None:
            return
        key = supplied_key(request)
        if key is None:
            raise AuthenticationError(
                "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY) or in an x-api-key header."
            )
        if not hmac.compare_digest(_digest(key), self._digest):
            raise AuthenticationError("Incorrect API key provided.")
