"""`layerserve serve --replicas N`: the app as a Ray Serve application, on a Ray cluster it joins
(`--ray-address`) or starts on this machine.

    proxy (Ray Serve, HOST:PORT) -> ingress (1 replica, ingress.py) -> engine (N replicas, replica.py)

The engine deployment routes with AffinityRouter (router.py), or Ray's power-of-two router with
`--router power-of-two` (for comparison; it honours only the pins that redirects and sockets need). Sessions live in one journal directory that every
replica reads and writes: on one machine the default cache dir, on many a shared mount given as
--session-dir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from dataclasses import dataclass

from layerserve.config import EngineConfig, ServerConfig

log = logging.getLogger("layerserve.cluster")

APP_NAME = "layerserve"
STOP_GRACE_S = 20.0
MAX_ONGOING = 1024  # per replica: streams and sockets hold a slot while open; the engine's own queue bound gives 429s


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    replicas: int = 2
    ray_address: str | None = None  # None: start Ray on this machine
    replica_threads: int = 1  # torch threads (and Ray CPUs) per replica
    router: str = "affinity"  # or "power-of-two" (Ray's default router)
    imbalance_threshold: float = 2.0  # prefix affinity yields to the least loaded past this queue difference
    detach: bool = False  # deploy and exit, leaving the application running on the cluster
    max_replicas: int | None = None  # above `replicas`: Ray Serve autoscales between them on requests in flight
    target_ongoing: float = 8.0  # requests in flight per replica the autoscaler aims for


def build_application(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig):
    """The bound Serve application: the ingress in front of the engine deployment."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from layerserve.cluster.ingress import IngressSettings, ingress_deployment
    from layerserve.cluster.replica import EngineReplica

    from layerserve.cluster.router import AffinityRouter, PinnedPowerOfTwoRouter

    if cluster.router == "affinity":
        router = RequestRouterConfig(request_router_class=AffinityRouter,
                                     request_router_kwargs={"imbalance_threshold": cluster.imbalance_threshold})
    else:
        router = RequestRouterConfig(request_router_class=PinnedPowerOfTwoRouter)
    engine = dataclasses.replace(engine, num_threads=cluster.replica_threads)
    logs = {"log_level": server.log_level.upper(), "enable_access_log": server.log_level == "debug"}
    options = dict(name="engine", num_replicas=cluster.replicas, max_ongoing_requests=MAX_ONGOING,
                   logging_config=logs, ray_actor_options={"num_cpus": cluster.replica_threads}, health_check_period_s=2.0,
                   health_check_timeout_s=30.0, graceful_shutdown_timeout_s=server.shutdown_timeout)
    options["request_router_config"] = router
    if cluster.max_replicas is not None and cluster.max_replicas > cluster.replicas:
        del options["num_replicas"]
        options["autoscaling_config"] = {"min_replicas": cluster.replicas, "max_replicas": cluster.max_replicas,
                                         "initial_replicas": cluster.replicas,
                                         "target_ongoing_requests": cluster.target_ongoing}
    replicas = serve.deployment(EngineReplica, **options).bind(engine, server)
    settings = IngressSettings(debug=server.debug, max_body_bytes=server.max_body_bytes,
                               replicas=max(cluster.replicas, cluster.max_replicas or 0))
    ingress = serve.deployment(ingress_deployment(settings), name="ingress", num_replicas=1,
                               max_ongoing_requests=MAX_ONGOING * max(cluster.replicas, 1),
                               ray_actor_options={"num_cpus": 0}, logging_config=logs)
    return ingress.bind(replicas)


def start_ray(server: ServerConfig, cluster: ClusterConfig) -> bool:
    """Connect to the cluster, or start one here (True when this process started it). Before Ray is
    imported: it reads these settings from the environment at import."""
    from layerserve.cli import is_loopback

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not cluster.ray_address and is_loopback(server.host):
        # a cluster of this machine alone: Ray's processes talk over 127.0.0.1 (ray.init maps a loopback
        # node address to the host's own; with clusters off it keeps the node on the loopback address)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if cluster.ray_address:
        ray.init(address=cluster.ray_address, logging_level=logging.WARNING)
        return False
    cpus = max(os.cpu_count() or 1, cluster.replicas * cluster.replica_threads)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def serve_cluster(engine: EngineConfig, server: ServerConfig, cluster: ClusterConfig) -> int:
    import ray
    from ray import serve

    started = start_ray(server, cluster)
    serve.start(http_options={"host": server.host, "port": server.port})
    log.info("deploying %d replica(s) of %s on Ray (%s), router %s", cluster.replicas, engine.model,
             cluster.ray_address or "started here", cluster.router)
    serve.run(build_application(engine, server, cluster), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("serving on http://%s:%d (sessions in %s)", server.host, server.port, server.session_dir)
    print(f"layerserve: {cluster.replicas} replica(s) ready on http://{server.host}:{server.port}", flush=True)
    if cluster.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: deleting the application")
    # a bounded stop: replicas get --shutdown-timeout to finish their requests, and a cluster whose
    # processes are already gone must not hang this one
    done = threading.Thread(target=_stop, args=(started,), daemon=True)
    done.start()
    done.join(server.shutdown_timeout + STOP_GRACE_S)
    if done.is_alive():
        log.warning("the application did not stop within %.0fs; exiting anyway", server.shutdown_timeout + STOP_GRACE_S)
        if started:
            ray.shutdown()
    return 0


def _stop(started: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if started:
            serve.shutdown()
    finally:
        if started:
            ray.shutdown()
