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


def find_stop_string(text: str, new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """First stop string that ends inside the last `new_chars` characters of `text`.

    Returns (index where the stop string starts, the stop string), or None.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        start = max(0, len(text) - new_chars - len(stop) + 1)
        at = text.find(stop, start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def safe_text_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent now: hold back a tail that could still become a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return len(text) - hold
