"""A real server with sessions for the session tests: the default model, its own session dir
(a temp dir, so nothing leaks between runs) and the --debug routes (a session's held token ids)."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "api"))
from server_process import Server, start_server, stop_server  # noqa: E402


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("sessions")


@pytest.fixture(scope="session")
def session_server(tmp_path_factory: pytest.TempPathFactory, session_dir: pathlib.Path) -> Iterator[Server]:
    proc, srv = start_server(tmp_path_factory.mktemp("session-server") / "server.log", "--session-dir",
                             str(session_dir), "--debug", "--max-sessions", "24",
                             "--kv-cache-memory", "512MiB")
    try:
        yield srv
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def ls(session_server: Server):
    """LayerScale's own client, sync."""
    from layerscale import LayerScale

    with LayerScale(session_server.base_url, timeout=300, max_retries=0) as client:
        yield client
