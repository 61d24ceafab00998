"""What the cluster tests share besides their fixtures."""

from __future__ import annotations

import time

import httpx
from server_process import Server


def replicas_answering(srv: Server) -> int:
    """How many replicas the ingress reaches (its /metrics fan-out)."""
    text = httpx.get(f"{srv.base_url}/metrics", timeout=120).text
    return int(float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("layerserve:cluster_replicas "))))


def wait_for_replicas(srv: Server, n: int, timeout: float = 120.0) -> None:
    """Until the ingress's router knows `n` replicas (it learns them from Ray a little after the
    application reports ready)."""
    deadline = time.monotonic() + timeout
    while replicas_answering(srv) < n:
        assert time.monotonic() < deadline, f"the ingress did not reach {n} replicas in {timeout:.0f}s"
        time.sleep(0.5)
