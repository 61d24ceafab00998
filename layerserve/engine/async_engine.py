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

from layerserve.engine.core import INTERNAL_ERROR, EngineCore, EngineStats, InvalidRequest
from layerserve.engine.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger("layerserve.engine")

# Faults outside any batch, one after the other, after which the engine gives up: recovery
# (failing every request in flight) has itself failed that often, so the state cannot be trusted.
MAX_CONSECUTIVE_FAULTS = 3


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
        self.dead_reason: str | None = None  # set when the engine thread has given up

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

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

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    session_id: str | None = None, background: bool = False) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns the iterator of its outputs. Raises InvalidRequest at once
        when the request can never be served (e.g. too long, or sessions hold the KV pool).
        Leaving the iterator early aborts. `session_id`, `background`: see EngineCore.add_request."""
        if not self.running:
            raise EngineDeadError("the engine is not running")
        self.core.validate(prompt_ids, params)
        self.core.check_room(prompt_ids, params, session_id)  # again on the engine thread, authoritatively
        stream: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params, session_id, background))
        return self._iterate(request_id, stream)

    def cancel(self, request_id: str) -> None:
        """Abort at the next step, like `abort`, but the request's iterator still gets its last
        output (finish reason abort, with what it computed)."""
        self._commands.put(("abort", request_id))

    def open_session(self, session_id: str) -> None:
        """Give a session its (empty) held KV context; requests on it may follow at once."""
        self._commands.put(("open_session", session_id))

    def close_session(self, session_id: str) -> None:
        """Free a session's held KV (when the request that has it, if any, ends)."""
        self._commands.put(("close_session", session_id))

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
        """The engine loop. It never dies silently: a fault in one iteration fails the requests in
        flight and the loop goes on; only when recovery itself keeps failing does the engine stop,
        and then every open stream gets an error and `running` turns False (so /health is 503)."""
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    self._iteration()
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("engine loop failed (%d in a row); failing the requests in flight", failures)
                    if failures >= MAX_CONSECUTIVE_FAULTS:
                        raise EngineDeadError(f"{failures} engine faults in a row") from None
                    self._recover()
        except BaseException as exc:
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            log.critical("the engine has stopped: %s", self.dead_reason, exc_info=exc)
            self._post(self._fail_open_streams)
            if not isinstance(exc, Exception):
                raise

    def _iteration(self) -> None:
        core = self.core
        block = not core.has_work()
        outputs: list[RequestOutput] = []
        try:
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
                except Exception:  # outside a batch (batch faults are handled in step): fail all in flight
                    log.exception("engine step failed")
                    outputs += core.fail_all(INTERNAL_ERROR)
        finally:  # what was produced before a fault still reaches its streams
            if outputs:
                self._post(self._dispatch, outputs)

    def _recover(self) -> None:
        """After a fault outside any batch: fail everything in flight (if even that fails, the
        next iteration counts one more fault)."""
        try:
            self._post(self._dispatch, self.core.fail_all(INTERNAL_ERROR))
        except Exception:
            log.exception("failing the requests in flight failed too")

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _apply(self, cmd: tuple) -> list[RequestOutput]:
        if cmd[0] == "add":
            _, request_id, prompt_ids, params, session_id, background = cmd
            try:
                self.core.add_request(request_id, prompt_ids, params, session_id=session_id, background=background)
            except InvalidRequest as exc:
                return [RequestOutput(request_id, [], len(prompt_ids), 0, 0, True, error=str(exc),
                                      error_code=exc.code or "invalid_request")]
            except Exception:
                log.exception("adding request %s failed", request_id)
                self.core.fail([request_id], INTERNAL_ERROR)
                return [RequestOutput(request_id, [], len(prompt_ids), 0, 0, True, error=INTERNAL_ERROR)]
        elif cmd[0] == "open_session":
            self.core.open_session(cmd[1])
        elif cmd[0] == "close_session":
            self.core.close_session(cmd[1])
        elif cmd[0] == "abort":
            try:
                out = self.core.abort(cmd[1], FinishReason.ABORT)
            except Exception:  # only this request is affected: fail it, keep the rest going
                log.exception("aborting request %s failed", cmd[1])
                return self.core.fail([cmd[1]], INTERNAL_ERROR)
            return [out] if out is not None else []
        return []

    def _fail_open_streams(self) -> None:
        """The engine is gone: end every stream with an error instead of leaving it waiting."""
        for request_id, stream in list(self._streams.items()):
            stream.put_nowait(RequestOutput(request_id, [], 0, 0, 0, True, error=INTERNAL_ERROR))
        self._streams.clear()

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
