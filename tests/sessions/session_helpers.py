"""What the session tests share: reading a blocking event stream with a timeout."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

WAIT_S = 90.0  # a bound for a hung server, not a speed check (a loaded 2-core machine is slow)


class Pump:
    """Iterates a blocking iterable (an event stream) on a thread, so that reading it has a
    timeout: a missing event fails the test instead of hanging it."""

    _END = object()

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._q: queue.Queue = queue.Queue()
        self.seen: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
        self._thread.start()

    def _run(self, iterable: Iterable[Any]) -> None:
        try:
            for item in iterable:
                self._q.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self._q.put(exc)
        finally:
            self._q.put(self._END)

    def next(self, timeout: float = WAIT_S) -> Any:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no event within {timeout}s (seen so far: {self.seen})")
        if item is self._END:
            pytest.fail(f"the stream ended (seen: {self.seen})")
        if isinstance(item, BaseException):
            raise item
        self.seen.append(item)
        return item

    def until(self, pred: Callable[[Any], bool], timeout: float = WAIT_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(max(deadline - time.monotonic(), 0.01))
            if pred(item):
                return item

    def wait_end(self, timeout: float = 30.0) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def refused_by(calls: list[tuple[str, Callable[[], Any]]], error: type[Exception], status: int) -> list[tuple[str, str]]:
    """Run each named call; those that did not raise `error` with `status` (to report together)."""
    wrong = []
    for name, call in calls:
        try:
            call()
            wrong.append((name, "succeeded"))
        except error as exc:
            if exc.status_code != status:
                wrong.append((name, f"status {exc.status_code}"))
        except Exception as exc:  # noqa: BLE001 - collected, reported together
            wrong.append((name, repr(exc)))
    return wrong
