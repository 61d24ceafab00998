"""Engine requests as the HTTP layer drives them: start, iterate, collect, abort on close.

A `Run` owns one engine request. Whatever ends the HTTP exchange (done, client gone, error),
`close()` aborts the engine request unless it already finished — including when its output
iterator was never started, which the engine's own iterator cannot notice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from layerserve.api.errors import ConflictError, EngineRequestError, InvalidRequestError
from layerserve.api.observe import RequestMetrics
from layerserve.engine.async_engine import AsyncEngine
from layerserve.engine.core import InvalidRequest
from layerserve.engine.request import FinishReason, RequestOutput, SamplingParams, TokenLogprob

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def refusal(message: str, code: str, param: str | None) -> Exception:
    """The API error of a request the engine refused: sessions holding the pool is a conflict
    (409), anything else a bad request (400)."""
    if code == "kv_pool_full":
        return ConflictError(message, param, code)
    return InvalidRequestError(message, param, code)


class Run:
    """One engine request as the HTTP layer sees it; reports its timings and tokens to `metrics`."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 metrics: RequestMetrics | None = None, *, session_id: str | None = None,
                 background: bool = False, on_last: Callable[[RequestOutput], None] | None = None) -> None:
        """`session_id`, `background`: see AsyncEngine.add_request. `on_last(out)` sees the last
        output before it is yielded (a session journals the turn there)."""
        self.engine = engine
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.finished = False
        self.metrics = metrics
        self.started = time.monotonic()
        self._on_last = on_last
        self.first_token_at: float | None = None
        self._last_token_at = 0.0
        self._tokens = 0
        try:
            self._outputs = engine.add_request(request_id, prompt_ids, params,  # may raise InvalidRequest
                                               session_id=session_id, background=background)
        except InvalidRequest as exc:
            if exc.code == "kv_pool_full":
                raise refusal(str(exc), exc.code, exc.param) from None
            raise

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self._outputs:
                self._observe(out)
                if out.error is not None:
                    self.finished = True
                    if out.error_code is not None:  # refused on the engine thread: the message says why
                        raise refusal(out.error, out.error_code, "messages")
                    # The cause is in the server log (by request id), never in the response.
                    raise EngineRequestError(
                        f"The server had an error while generating this response (request id {self.request_id}).")
                self.finished = out.finished
                if out.finished and self._on_last is not None:
                    self._on_last(out)
                yield out
        finally:
            await self._outputs.aclose()

    def _observe(self, out: RequestOutput) -> None:
        m = self.metrics
        if m is None:
            return
        now = time.monotonic()
        new = out.completion_tokens - self._tokens
        if new > 0:
            self._tokens = out.completion_tokens
            m.generation_tokens.inc(new)
            if self.first_token_at is None:
                self.first_token_at = now
                m.ttft.observe(now - self.started)
            else:
                m.itl.observe(now - self._last_token_at)
            self._last_token_at = now
        if out.finished:
            m.prompt_tokens.inc(out.prompt_tokens)
            m.e2e.observe(now - self.started)
            reasons = [d.finish_reason for d in out.deltas if d.finish_reason is not None]
            reason = "error" if out.error is not None else (reasons[-1].value if reasons else "stop")
            m.request_success.labels(reason).inc()

    def cancel(self) -> None:
        """Stop at the next step; the iterator still ends with the last output (finish reason
        abort). Session work uses it: what was computed stays with the session."""
        if not self.finished:
            self.engine.cancel(self.request_id)

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
            if self.metrics is not None:
                self.metrics.aborted.inc()


def close_all(runs: list[Run]) -> None:
    for run in runs:
        run.close()


def start_runs(engine: AsyncEngine, base_id: str, prompts: list[list[int]], params: SamplingParams,
               metrics: RequestMetrics | None = None) -> list[Run]:
    """One Run per prompt; if a later prompt is rejected, the earlier ones are aborted."""
    runs: list[Run] = []
    try:
        for i, prompt_ids in enumerate(prompts):
            runs.append(Run(engine, base_id if len(prompts) == 1 else f"{base_id}-{i}", prompt_ids, params, metrics))
    except BaseException:
        close_all(runs)
        raise
    return runs


async def merged(runs: list[Run]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(run index, output) from several runs as they arrive."""
    if len(runs) == 1:
        async for out in runs[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, run: Run) -> None:
        try:
            async for out in run:
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
    try:
        remaining = len(runs)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class Choice:
    """A finished choice, accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # a session's held KV and the prefix cache together
    held_tokens: int = 0  # of cached_tokens, what a session held
    in_session: bool = False  # a session turn: usage also says how much the prefix cache supplied

    def add(self, out: RequestOutput) -> None:
        self.prompt_tokens += out.prompt_tokens
        self.completion_tokens += out.completion_tokens
        self.cached_tokens += out.cached_tokens
        self.held_tokens += out.held_tokens

    @property
    def prefix_cached_tokens(self) -> int:
        return self.cached_tokens - self.held_tokens

    def prompt_details(self) -> dict[str, int]:
        details = {"cached_tokens": self.cached_tokens}
        if self.in_session and self.prefix_cached_tokens:
            details["prefix_cached_tokens"] = self.prefix_cached_tokens
        return details

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": self.prompt_details(),
            "completion_tokens_details": {"reasoning_tokens": 0},
        }


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's finish_reason; an aborted or failed choice is an error, never a silent 'stop'."""
    name = FINISH_REASONS.get(reason)
    if name is None:
        raise EngineRequestError(f"The request ended unexpectedly ({reason.value}).")
    return name


async def collect(runs: list[Run], n: int) -> tuple[list[Choice], Usage]:
    """Run to completion; choices are ordered prompt-major (prompt i, sample j -> i * n + j)."""
    choices = [Choice() for _ in range(len(runs) * n)]
    last: dict[int, RequestOutput] = {}
    async for index, out in merged(runs):
        last[index] = out
        for delta in out.deltas:
            choice = choices[index * n + delta.index]
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            if delta.logprobs:
                choice.logprobs += delta.logprobs
            if delta.finish_reason is not None:
                choice.finish_reason = finish_reason(delta.finish_reason)
    usage = Usage()
    for out in last.values():
        usage.add(out)
    return choices, usage
