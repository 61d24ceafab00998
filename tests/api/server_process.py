"""Starting the real server as a subprocess on a free port (the session fixture and tests that
need a server of their own, e.g. one to SIGTERM, share this)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

REPO = pathlib.Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 1024  # small, so context_length_exceeded is cheap to provoke
MAX_BODY_BYTES = 1 << 20  # 1 MiB, so 413 is cheap to provoke
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    log_path: pathlib.Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(log_path: pathlib.Path, *extra: str, new_session: bool = False) -> tuple[subprocess.Popen, Server]:
    port = free_port()
    if "--session-dir" not in extra:  # session journals next to the log, never in the user's cache dir
        extra = ("--session-dir", str(log_path.parent / f"sessions-{port}"), *extra)
    cmd = [sys.executable, "-m", "layerserve.cli", "serve", "--port", str(port), "--kv-cache-memory", "128MiB",
           "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY_BYTES), "--log-level", "warning",
           *extra]
    env = {**os.environ, "LAYERSERVE_API_KEY": ""}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)
    server = Server(f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if new_session:
                kill_session(proc.pid)
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return proc, server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    if new_session:
        kill_session(proc.pid)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def session_pids(sid: int) -> list[int]:
    """Processes in session `sid` (a server started with new_session=True, and all it started)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def kill_session(sid: int, grace_s: float = 10.0) -> None:
    """Wait up to `grace_s` for session `sid`'s processes to exit, then SIGKILL those left."""
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(sid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def stop_server(proc: subprocess.Popen, timeout: float = 20.0, new_session: bool = False) -> None:
    """SIGTERM, then SIGKILL if it does not exit within `timeout` s; with `new_session` (a server
    started so), then SIGKILL whatever else of its session is left."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if new_session:
        kill_session(proc.pid)
