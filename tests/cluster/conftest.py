"""A real cluster for the cluster tests: `layerserve serve --replicas 2` on a Ray cluster it starts
on this machine (loopback only, usage stats off), two replicas of the default model with one torch
thread each, --debug (responses name the replica and its pid); one per module (test_cluster.py),
stopped when it ends, so its processes do not sit beside the rest of the suite.

Where Ray cannot start here the tests are skipped with the reason; under CI=true that is a failure.
Every process of the cluster runs in the CLI's own session, and teardown kills what is left of it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "api"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "sessions"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from server_process import Server, start_server, stop_server  # noqa: E402

from cluster_helpers import wait_for_replicas  # noqa: E402

REPLICAS = 2


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the cluster tests cannot run here ({reason}); under CI=true that is a failure")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cluster-sessions")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_dir: pathlib.Path) -> Iterator[Server]:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        unavailable("Ray Serve is not installed (pip install 'layerserve[cluster]')")
    log = tmp_path_factory.mktemp("cluster") / "cluster.log"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        proc, srv = start_server(log, "--replicas", str(REPLICAS), "--replica-threads", "1", "--debug",
                                 "--session-dir", str(cluster_dir), "--max-sessions", "24",
                                 "--kv-cache-memory", "256MiB", "--shutdown-timeout", "5", new_session=True)
    except RuntimeError as exc:
        text = str(exc)
        if "ray" in text.lower() and "Traceback" in text and "layerserve/cluster" not in text:
            unavailable(f"Ray could not start here: {text[-600:]}")
        raise
    try:
        wait_for_replicas(srv, REPLICAS)
        yield srv
    finally:
        stop_server(proc, timeout=60, new_session=True)  # the CLI deletes the app and stops Ray


@pytest.fixture(scope="module")
def session_server(cluster: Server) -> Server:
    """The cluster, under the name the session tests' fixtures use."""
    return cluster


@pytest.fixture(scope="module")
def ls(cluster: Server):
    from layerscale import LayerScale

    with LayerScale(cluster.base_url, timeout=300, max_retries=0) as client:
        yield client
