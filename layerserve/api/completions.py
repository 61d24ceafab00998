"""POST /v1/completions (legacy): a prompt (string, strings, token ids or lists of them) -> text.

Each prompt is its own engine request; choices are numbered prompt-major (prompt i, sample j ->
index i * n + j), as OpenAI does. `echo` and `suffix` are rejected; `max_tokens: 0` is answered
without running the model.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from layerserve.api.connection import (
    DONE,
    STATUS_CLIENT_CLOSED,
    ClientDisconnected,
    EventStreamResponse,
    error_event,
    sse_event,
    until_disconnect,
)
from layerserve.api.errors import InvalidRequestError, NotSupportedError
from layerserve.api.logprobs import completion_logprobs
from layerserve.api.protocol import CompletionRequest, parse_request
from layerserve.api.admission import request_timeout
from layerserve.api.observe import log_fields
from layerserve.api.runs import Choice, Run, Usage, close_all, collect, finish_reason, merged, start_runs
from layerserve.api.sampling import sampling_params
from layerserve.api.state import Runtime, ServerState, server_state

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


async def prompt_ids(req: CompletionRequest, rt: Runtime, max_prompts: int) -> list[list[int]]:
    """Token ids of each prompt, tokenized on a prep thread (off the event loop). A prompt
    string's special-token strings are parsed: here the caller writes the whole prompt, markup
    included, as with every OpenAI-compatible server (chat content never is; see chat_prompt)."""
    return await rt.offload(_prompt_ids, req, rt, max_prompts)


def _prompt_ids(req: CompletionRequest, rt: Runtime, max_prompts: int) -> list[list[int]]:
    prompt = req.prompt
    if prompt is None or prompt == "":
        prompts: list = [""]
    elif isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise InvalidRequestError("'prompt' must not be an empty array.", "prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if len(prompts) > max_prompts:
        raise InvalidRequestError(f"Too many prompts: {len(prompts)} (the limit is {max_prompts}).", "prompt")
    out = []
    tokenizer = rt.tokenizer
    for item in prompts:
        if isinstance(item, str):
            ids = rt.encode_raw(item, add_special_tokens=True, param="prompt")
        else:
            ids = list(item)
        if not ids:  # "as if from the beginning of a new document"
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = [start]
        out.append(ids)
    return out


def check_supported(req: CompletionRequest, n: int) -> None:
    if req.echo:
        raise NotSupportedError("The 'echo' parameter is not supported.", "echo")
    if req.suffix:
        raise NotSupportedError("The 'suffix' parameter is not supported.", "suffix")
    if req.best_of is not None and req.best_of != n:
        if req.best_of < n:
            raise InvalidRequestError(f"'best_of' ({req.best_of}) must be at least 'n' ({n}).", "best_of")
        raise NotSupportedError("'best_of' greater than 'n' is not supported.", "best_of")


@dataclass(slots=True)
class CompletionContext:
    id: str
    created: int
    model: str
    fingerprint: str
    n: int
    logprobs: int | None
    include_usage: bool
    rt: Runtime
    offsets: list[int]  # per choice: where its next token starts in prompt + completion text

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def logprobs_of(self, index: int, items) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        result = completion_logprobs(items or [], self.rt.token_text, self.offsets[index])
        self.offsets[index] += sum(len(t) for t in result["tokens"])
        return result


def make_context(state: ServerState, rt: Runtime, req: CompletionRequest, prompts: list[list[int]], n: int,
                 logprobs: int | None) -> CompletionContext:
    offsets = []
    if logprobs is not None:
        for ids in prompts:
            offsets += [len(rt.tokenizer.decode(ids))] * n
    return CompletionContext(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=state.config.served_model_name,
        fingerprint=rt.fingerprint, n=n, logprobs=logprobs,
        include_usage=bool(req.stream_options and req.stream_options.include_usage), rt=rt, offsets=offsets,
    )


async def create_completion(request: Request) -> Response:
    state = server_state(request)
    rt = state.ready()
    req = parse_request(CompletionRequest, await request.body())
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens or 1, logprobs=req.logprobs, max_n=state.max_n,
                             vocab_size=rt.tokenizer.vocab_size)
    check_supported(req, params.n)
    prompts = await prompt_ids(req, rt, state.config.max_prompts)
    ctx = make_context(state, rt, req, prompts, params.n, params.logprobs)
    if max_tokens == 0:
        return empty_completion(ctx, rt, prompts, bool(req.stream))
    fields = log_fields(request)
    fields["id"] = ctx.id
    timeout = request_timeout(request, state.config.request_timeout)
    # 429 when the queue is full: every prompt runs n sequences, each with a copy of its prompt
    ticket = state.admission.admit(len(prompts) * params.n, params.n * sum(len(ids) for ids in prompts))
    try:
        runs = start_runs(rt.engine, ctx.id, prompts, params, state.metrics)
    except BaseException:
        ticket.release()
        raise

    def close() -> None:
        close_all(runs)
        ticket.release()
        ttft = runs[0].ttft
        fields.update(prompt_tokens=sum(len(ids) for ids in prompts),
                      ttft_ms=f"{ttft * 1000:.1f}" if ttft is not None else "-")

    if req.stream:
        return EventStreamResponse(completion_events(ctx, runs), on_close=close, timeout=timeout)
    try:
        choices, usage = await until_disconnect(request.receive, collect(runs, ctx.n), timeout)
    except ClientDisconnected:
        return Response(status_code=STATUS_CLIENT_CLOSED)
    finally:
        close()
    fields["completion_tokens"] = usage.completion_tokens
    fields["cached_tokens"] = usage.cached_tokens
    return JSONResponse(completion_response(ctx, choices, usage))


def completion_response(ctx: CompletionContext, choices: list[Choice], usage: Usage) -> dict[str, Any]:
    body = ctx.head()
    body["choices"] = [
        {"text": c.text, "index": i, "logprobs": ctx.logprobs_of(i, c.logprobs), "finish_reason": c.finish_reason}
        for i, c in enumerate(choices)
    ]
    body["usage"] = usage.as_dict()
    return body


def empty_completion(ctx: CompletionContext, rt: Runtime, prompts: list[list[int]], stream: bool) -> Response:
    """max_tokens 0: nothing to generate, but the prompts must still be servable."""
    vocab, limit = rt.tokenizer.vocab_size, rt.engine.max_model_len
    for ids in prompts:
        if max(ids) >= vocab:
            raise InvalidRequestError("prompt contains token ids outside the vocabulary", "prompt")
        if len(ids) >= limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {len(ids)} tokens.",
                "prompt", "context_length_exceeded")
    choices = [Choice(finish_reason="length") for _ in range(len(prompts) * ctx.n)]
    usage = Usage(prompt_tokens=sum(len(ids) for ids in prompts))
    body = completion_response(ctx, choices, usage)
    if not stream:
        return JSONResponse(body)
    usage_body = {**ctx.head(), "choices": [], "usage": body.pop("usage")}
    if ctx.include_usage:
        body["usage"] = None

    async def events() -> AsyncIterator[str]:
        yield sse_event(body)
        if ctx.include_usage:
            yield sse_event(usage_body)
        yield DONE

    return EventStreamResponse(events())


async def completion_events(ctx: CompletionContext, runs: list[Run]) -> AsyncIterator[str]:
    usage = Usage()
    try:
        async for index, out in merged(runs):
            events = []
            for d in out.deltas:
                choice = index * ctx.n + d.index
                reason = finish_reason(d.finish_reason) if d.finish_reason is not None else None
                if d.text or reason or (ctx.logprobs is not None and d.logprobs):
                    body = ctx.head()
                    body["choices"] = [{"text": d.text, "index": choice, "logprobs": ctx.logprobs_of(choice, d.logprobs),
                                        "finish_reason": reason}]
                    if ctx.include_usage:
                        body["usage"] = None
                    events.append(sse_event(body))
            if out.finished:
                usage.add(out)
            if events:
                yield "".join(events)
    except Exception as exc:  # the headers are out: report in-band, then end the stream
        yield error_event(exc)  # ends with [DONE]
        return
    if ctx.include_usage:
        yield sse_event({**ctx.head(), "choices": [], "usage": usage.as_dict()})
    yield DONE
