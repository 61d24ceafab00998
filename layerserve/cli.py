"""`layerserve serve [MODEL] ...`: the OpenAI-compatible server on the default (or a given) model."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import ipaddress
import logging
import os
import re
import sys
from pathlib import Path

from layerserve.cluster.launch import ClusterConfig
from layerserve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig, SpeculativeConfig
from layerserve.text.tool_parsers import TOOL_FORMATS

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
_DEFAULT_NAMES = ("default", "smollm2", "SmolLM2-135M-Instruct")
# Defaults come from instances: a slots dataclass has no class-level default values.
_SERVER, _SCHEDULER, _ENGINE = ServerConfig(), SchedulerConfig(), EngineConfig(model="default")
_SPEC, _CLUSTER = SpeculativeConfig(), ClusterConfig()
log = logging.getLogger("layerserve")


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '16MB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1GiB, 512MiB, 16MB, 1048576)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _float_at_least(low: float, strict: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (strict and value == low) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}: {text!r}")
        return value

    return parse


_positive_float = _float_at_least(0.0, strict=True)
_nonnegative_float = _float_at_least(0.0, strict=False)


def default_served_name(model: str | None) -> str:
    if not model or model in _DEFAULT_NAMES:
        return "SmolLM2-135M-Instruct"
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerserve", description="OpenAI-compatible LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API",
        description="Serve MODEL over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models, ...). "
                    "Point any OpenAI SDK at http://HOST:PORT/v1.",
        formatter_class=_HelpFormatter)
    serve.add_argument("model", nargs="?", default="default",
                       help="a GGUF file, a Hugging Face model directory, or 'default' (SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default=_SERVER.host, help="address to listen on (0.0.0.0 for all interfaces)")
    serve.add_argument("--port", type=int, default=_SERVER.port, help="TCP port to listen on")
    serve.add_argument("--api-key", default=None,
                       help="require this key on /v1/* and the tokenizer routes (Authorization: Bearer KEY or "
                            "x-api-key: KEY); default: $LAYERSERVE_API_KEY; unset: any key is accepted")
    serve.add_argument("--served-model-name", default=None,
                       help="model id reported in responses and /v1/models (default: from MODEL); requests may "
                            "name any model")
    serve.add_argument("--max-model-len", type=_positive_int, default=_SCHEDULER.max_model_len,
                       help="longest prompt + completion in tokens (capped by the model and the KV cache size)")
    serve.add_argument("--kv-cache-memory", type=parse_size, default="1GiB",
                       help="memory for the paged KV cache, e.g. 1GiB or 512MiB")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=_SCHEDULER.max_num_seqs,
                       help="most sequences generated at once (continuous batching width)")
    serve.add_argument("--max-num-batched-tokens", type=_positive_int, default=_SCHEDULER.max_num_batched_tokens,
                       help="token budget of one engine step (prefill chunks + decodes)")
    serve.add_argument("--dtype", default=_ENGINE.dtype, choices=["auto", "float32", "bfloat16", "float16", "q4"],
                       help="auto: the fast path -- a quantized GGUF keeps its 4-bit layers (int8 head), each "
                            "layer runs the kernel measured fastest on this CPU (cached), float32 activations and "
                            "KV; top-1 agreement with float32 99.35%% on our test text. float32: exact parity with "
                            "transformers (dense float32 weights); bfloat16; q4: the older int4 + bf16 recipe")
    serve.add_argument("--no-compile", action="store_true",
                       help="with --dtype auto, run every step op by op in eager torch (the reference) instead of "
                            "the compiled C++ step that runs steps of up to 64 rows (decode batches) in one call")
    serve.add_argument("--draft-tokens", type=_nonnegative_int, default=_SPEC.num_draft_tokens,
                       help="prompt-lookup speculative decoding: most tokens drafted per step for a sequence whose "
                            "last tokens occurred earlier in its context, verified in the same forward (output "
                            f"unchanged; only while at most {_SPEC.max_batch} sequences run); 0 turns it off")
    serve.add_argument("--no-prefix-cache", action="store_true",
                       help="disable reuse of cached KV for shared prompt prefixes (earlier turns)")
    serve.add_argument("--max-body-bytes", type=parse_size, default=_SERVER.max_body_bytes,
                       help="reject request bodies larger than this with 413, e.g. 16MiB")
    serve.add_argument("--max-queued-requests", type=_nonnegative_int, default=_SERVER.max_queued_requests,
                       help="sequences (prompts x n) that may wait beyond the --max-num-seqs running ones; past "
                            "it new requests get 429 with Retry-After")
    serve.add_argument("--max-queued-tokens", type=_positive_int, default=_SERVER.max_queued_tokens,
                       help="prompt tokens, summed over every admitted sequence; past it new requests get 429")
    serve.add_argument("--request-timeout", type=_positive_float, default=None,
                       help="seconds a request may run before it is stopped (408, or an error event in a stream); "
                            "default: no bound but the client's own (the OpenAI SDKs announce theirs)")
    serve.add_argument("--shutdown-timeout", type=_nonnegative_float, default=_SERVER.shutdown_timeout,
                       help="on SIGTERM/SIGINT, seconds to let in-flight requests finish before exiting")
    serve.add_argument("--log-prompts", action="store_true",
                       help="include prompt text in the per-request log line (off: only ids, counts, timings)")
    serve.add_argument("--tool-call-format", default=None, choices=TOOL_FORMATS.names(),
                       help="how the model writes tool calls; default: detected from its chat template, "
                            "with 'generic' (tools described in the system prompt) for templates without tools")
    serve.add_argument("--max-sessions", type=_positive_int, default=_SERVER.max_sessions,
                       help="live sessions at once (past it: 409); the KV pool is the real limit")
    serve.add_argument("--session-ttl", type=_positive_float, default=_SERVER.session_ttl,
                       help="seconds a session may sit unused before it is deleted")
    serve.add_argument("--session-dir", default=None,
                       help="where session journals live (default: the user's cache dir, by port and model)")
    serve.add_argument("--debug", action="store_true",
                       help="serve /debug/* routes (a session's held token ids); not for production")
    cluster = serve.add_argument_group("cluster (Ray Serve; needs `pip install layerserve[cluster]`)")
    cluster.add_argument("--replicas", type=_positive_int, default=None,
                         help="serve through Ray Serve with this many engine replicas behind one endpoint, routed "
                              "by session and prefix affinity; unset: a single engine, no Ray")
    cluster.add_argument("--ray-address", default=None,
                         help="join this Ray cluster (e.g. 10.0.0.1:6379, or 'auto'); default: start Ray here")
    cluster.add_argument("--replica-threads", type=_positive_int, default=_CLUSTER.replica_threads,
                         help="torch threads per replica (each also reserves as many Ray CPUs)")
    cluster.add_argument("--router", default=_CLUSTER.router, choices=["affinity", "power-of-two"],
                         help="affinity: sessions to their replica, prompts to the replica holding their prefix; "
                              "power-of-two: Ray Serve's default router (for comparison)")
    cluster.add_argument("--route-imbalance", type=_nonnegative_float, default=_CLUSTER.imbalance_threshold,
                         help="prefix affinity gives way to the least-loaded replica when the preferred one has "
                              "this many more requests in flight than it")
    cluster.add_argument("--max-replicas", type=_positive_int, default=None,
                         help="let Ray Serve autoscale the engine between --replicas and this many replicas, on "
                              "requests in flight (--target-ongoing per replica); sessions move only with their "
                              "journals")
    cluster.add_argument("--target-ongoing", type=_positive_float, default=_CLUSTER.target_ongoing,
                         help="with --max-replicas: requests in flight per replica the autoscaler aims for")
    cluster.add_argument("--detach", action="store_true",
                         help="with --ray-address: deploy (or update a running deployment, e.g. its --replicas) "
                              "and exit, leaving it running on the cluster")
    serve.add_argument("--log-level", default=_SERVER.log_level,
                       choices=["critical", "error", "warning", "info", "debug"], help="logging verbosity")
    return parser


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    engine = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        compile=not args.no_compile,
        speculative=dataclasses.replace(_SPEC, num_draft_tokens=args.draft_tokens) if args.draft_tokens > 0 else None,
        cache=CacheConfig(kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_cache),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len),
    )
    server = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LAYERSERVE_API_KEY") or None,
        served_model_name=args.served_model_name or default_served_name(args.model),
        max_body_bytes=args.max_body_bytes, log_level=args.log_level, tool_call_format=args.tool_call_format,
        max_queued_requests=args.max_queued_requests, max_queued_tokens=args.max_queued_tokens,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout, log_prompts=args.log_prompts,
        max_sessions=args.max_sessions, session_ttl=args.session_ttl, session_dir=args.session_dir, debug=args.debug,
    )
    return engine, server


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from layerserve.api.app import build_app
    from layerserve.api.server import DrainingServer
    from layerserve.model_files import resolve_model_path

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        resolve_model_path(args.model)  # fail now, not after the server is up
    except (FileNotFoundError, ImportError) as exc:
        print(f"layerserve: {exc}", file=sys.stderr)
        return 2
    engine_config, server_config = configs(args)
    if server_config.api_key is None and not is_loopback(server_config.host):
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model "
                    "(set --api-key or $LAYERSERVE_API_KEY, or listen on 127.0.0.1)", server_config.host)
    if args.replicas is not None:
        return _serve_cluster(args, engine_config, server_config)
    if args.ray_address or args.detach or args.max_replicas:
        print("layerserve: --ray-address, --detach and --max-replicas need --replicas", file=sys.stderr)
        return 2
    app = build_app(engine_config, server_config)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level=server_config.log_level,
                            access_log=False, timeout_graceful_shutdown=server_config.shutdown_timeout,
                            ws="websockets-sansio", ws_max_size=WS_MAX_FRAME, ws_ping_interval=WS_PING_S,
                            ws_ping_timeout=2 * WS_PING_S)
    DrainingServer(config, app.state.server).run()
    return 0


def _serve_cluster(args: argparse.Namespace, engine_config: EngineConfig, server_config: ServerConfig) -> int:
    from layerserve.api.state import session_dir

    from layerserve.cluster.launch import serve_cluster

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        print("layerserve: --replicas needs Ray Serve: pip install 'layerserve[cluster]'", file=sys.stderr)
        return 2
    if args.detach and not args.ray_address:
        print("layerserve: --detach needs --ray-address (a cluster that outlives this command)", file=sys.stderr)
        return 2
    # every replica reads and writes the same journals: one absolute directory for all of them
    server_config = dataclasses.replace(server_config, session_dir=str(session_dir(server_config).resolve()))
    cluster = ClusterConfig(replicas=args.replicas, ray_address=args.ray_address, replica_threads=args.replica_threads,
                            router=args.router, imbalance_threshold=args.route_imbalance, detach=args.detach,
                            max_replicas=args.max_replicas, target_ongoing=args.target_ongoing)
    return serve_cluster(engine_config, server_config, cluster)


WS_MAX_FRAME = 16 << 20  # session sockets: a bigger inbound frame drops the connection unread
WS_PING_S = 15.0  # session sockets: a protocol ping this often


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
