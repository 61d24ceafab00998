"""Request fields -> engine SamplingParams, with the range checks pydantic cannot express."""

from __future__ import annotations

from layerserve.api.errors import InvalidRequestError
from layerserve.api.protocol import SamplingFields
from layerserve.engine.request import SamplingParams


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError(f"Invalid key in 'logit_bias': {key!r} is not a token id.", "logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"Invalid key in 'logit_bias': token id {token_id} is outside the vocabulary (0..{vocab_size - 1}).",
                "logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise InvalidRequestError(
                f"Invalid value in 'logit_bias' for token {token_id}: {value} is not between -100 and 100.", "logit_bias"
            )
        out[token_id] = float(value)
    return out


MAX_STOP_CHARS = 1024  # per stop string (at most 4 of them: the protocol says so)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """Stop sequences; empty strings can never end a completion and are dropped. Each is bounded:
    the engine holds back (and matches against) up to the longest one on every step."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    for i, item in enumerate(items):
        if len(item) > MAX_STOP_CHARS:
            where = "stop" if isinstance(stop, str) else f"stop[{i}]"
            raise InvalidRequestError(f"Invalid '{where}': a stop sequence may be at most {MAX_STOP_CHARS} "
                                      f"characters long; this one has {len(item)}.", where)
    return [s for s in items if s]


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None, max_n: int,
                    vocab_size: int) -> SamplingParams:
    n = req.n if req.n is not None else 1
    if n > max_n:
        raise InvalidRequestError(f"Invalid value for 'n': {n} is above this server's limit of {max_n}.", "n")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                  "stream_options")
    top_k = req.top_k if req.top_k is not None else 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature if req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=max(top_k, 0),
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
        logit_bias=logit_bias(req.logit_bias, vocab_size),
        seed=req.seed,  # any int64; the engine uses all 64 bits
        n=n,
        logprobs=logprobs,
        stop=stop_strings(req.stop),
        ignore_eos=bool(req.ignore_eos),
        skip_special_tokens=req.skip_special_tokens if req.skip_special_tokens is not None else True,
    )
