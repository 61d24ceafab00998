"""uvicorn's server with a draining shutdown: on SIGTERM/SIGINT the app is marked as draining
(/health answers 503, new requests on kept-alive connections are refused with 503), uvicorn stops
accepting connections and waits up to --shutdown-timeout for in-flight requests to finish, then
the engine stops and the process exits 0 (uvicorn itself would re-raise the signal and die by it)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import uvicorn

log = logging.getLogger("layerserve")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.app_state = state  # layerserve.api.state.ServerState

    def handle_exit(self, sig, frame) -> None:
        if not self.app_state.draining:
            log.info("signal %s: draining; in-flight requests get up to %gs to finish", sig,
                     self.app_state.config.shutdown_timeout)
        self.app_state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, but a drained shutdown ends the process normally (exit 0)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
