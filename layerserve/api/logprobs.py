"""Engine TokenLogprobs -> OpenAI logprobs objects (chat's `content` list and legacy's columns)."""

from __future__ import annotations

from typing import Any

from layerserve.engine.request import TokenLogprob

# OpenAI reports impossible tokens as -9999.0 (JSON has no -Infinity).
FLOOR = -9999.0


def clean(logprob: float) -> float:
    return logprob if logprob >= FLOOR else FLOOR  # also maps NaN (every comparison False) to FLOOR


class TokenText:
    """A token's text and bytes as logprobs show them, cached per id (tokens repeat a lot)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._tokenizer.token_bytes(token_id)
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit


def chat_logprobs(items: list[TokenLogprob], token_text: TokenText) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: token, logprob, bytes and top_logprobs per generated token."""
    out = []
    for item in items:
        text, raw = token_text(item.token_id)
        top = []
        for token_id, logprob in item.top:
            top_text, top_raw = token_text(token_id)
            top.append({"token": top_text, "logprob": clean(logprob), "bytes": top_raw})
        out.append({"token": text, "logprob": clean(item.logprob), "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(items: list[TokenLogprob], token_text: TokenText, text_offset: int) -> dict[str, Any]:
    """Legacy completions' column form; `text_offset` is where the first token starts in the text."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for item in items:
        text, _ = token_text(item.token_id)
        tokens.append(text)
        token_logprobs.append(clean(item.logprob))
        top = {token_text(tid)[0]: clean(lp) for tid, lp in item.top}
        top.setdefault(text, clean(item.logprob))  # OpenAI always lists the sampled token too
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
