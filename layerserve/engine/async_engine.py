"""asyncio front of the engine: add_request() -> async iterator of outputs; abort().

One background thread owns the EngineCore and runs its steps; the event loop only queues
commands and receives outputs, so a forward pass never blocks HTTP handling. (torch releases
the GIL inside its kernels.)

`AsyncEngine.launch(build)` builds the core on that same thread. libgomp keeps one OpenMP worker
team per thread that starts parallel work: a model loaded on one thread and run on another leaves
two teams for the cores, libgomp then throttles its spin-wait, and the workers sleep on a futex
between kernels. On 2 cores that made every step 15-20% slower than in the offline engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from layerserve.engine.core import EngineCore, EngineStats
from layerserve.engine.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger("layerserve.engine")


class EngineDeadError(RuntimeError):
    """The engine thread is not running."""


class AsyncEngine:
    def __init__(self) -> None:
        """Use `await AsyncEngine.launch(build)`: the core is built on the engine thread."""
        self.core: EngineCore | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @classmethod
    async def launch(cls, build: Callable[[], tuple[EngineCore, Any]]) -> tuple["AsyncEngine", Any]:
        """Run `build` on a new engine thread, then the engine on that thread; returns the engine
        and what `build` returned beside the core. An exception from `build` is raised here.
        Call from the event loop that will consume the outputs."""
        engine = cls()
        engine._loop = loop = asyncio.get_running_loop()
        built: asyncio.Future = loop.create_future()
        engine._thread = threading.Thread(target=engine._build_and_run, args=(build, built),
                                          name="layerserve-engine", daemon=True)
        engine._thread.start()
        return engine, await built

    def _build_and_run(self, build: Callable[[], tuple[EngineCore, Any]], built: asyncio.Future) -> None:
        try:
            self.core, extra = build()
        except BaseException as exc:  # reported to launch(); the thread ends
            self._loop.call_soon_threadsafe(_settle, built, None, exc)
            return
        self._loop.call_soon_threadsafe(_settle, built, extra, None)
        self._run()

    async def stop(self) -> None:
        self._stopping.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._thread = None

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns the iterator of its outputs. Raises InvalidRequest at once
        when the request can never be served (e.g. too long). Leaving the iterator early aborts."""
        if not self.running:
            raise EngineDeadError("the engine is not running")
        self.core.validate(prompt_ids, params)
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params))
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort at the next step; the request's blocks are freed then."""
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ---- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        while not self._stopping.is_set():
            block = not core.has_work()
            outputs: list[RequestOutput] = []
            try:
                while True:
                    cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                    block = False
                    outputs += self._apply(cmd)
            except queue.Empty:
                pass
            if core.has_work():
                try:
                    outputs += core.step()
                except Exception as exc:  # outside a batch (batch faults are handled in step): fail all in flight
                    log.exception("engine step failed")
                    outputs += core.fail_all(f"internal engine error: {type(exc).__name__}: {exc}")
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _apply(self, cmd: tuple) -> list[RequestOutput]:
        if cmd[0] == "add":
            _, request_id, prompt_ids, params = cmd
            try:
                self.core.add_request(request_id, prompt_ids, params)
            except Exception as exc:
                return [RequestOutput(request_id, [], len(prompt_ids), 0, 0, True, error=str(exc))]
        elif cmd[0] == "abort":
            out = self.core.abort(cmd[1], FinishReason.ABORT)
            return [out] if out is not None else []
        return []

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]


def _settle(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # launch() was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
