"""Scale-out benchmark: the agentic multi-session workload through a cluster of 1 replica, 2
replicas with layerserve's affinity router, and 2 replicas with Ray Serve's default
power-of-two router, each `layerserve serve --replicas N` on a loopback Ray cluster of this
machine, in the same run.

The workload (bench/multiturn.py's agentic): S parallel sessions x T turns sharing one
tool-definition system prompt, each turn's tool call taking 0.5x-1.5x --tool-seconds before its
result is appended, streamed through the OpenAI SDK. Reported per setup (median over rounds; each round new sessions): wall time, TTFT
p50/p95, and the prefix-cache hit rate (cached / prompt tokens, as the responses report them).
The same CPU budget everywhere: 1 replica runs 2 torch threads, 2 replicas run 1 each; every
replica has the default 1 GiB KV pool. A short warm-up workload runs first on each cluster.

    .venv/bin/python bench/cluster.py [--sessions 8] [--turns 8] [--tool-seconds 1] [--rounds 3] [--out bench/out]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import cpu_model_name  # noqa: E402
from multiturn import agentic, layerserve, pct  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUPS = {  # name -> serve flags
    "1 replica (2 threads)": ["--replicas", "1", "--replica-threads", "2"],
    "2 replicas, affinity router": ["--replicas", "2", "--replica-threads", "1", "--router", "affinity"],
    "2 replicas, Ray power-of-two": ["--replicas", "2", "--replica-threads", "1", "--router", "power-of-two"],
}


def cluster(flags: list[str], log: pathlib.Path, session_dir: pathlib.Path):
    """A cluster on a free port, in a session of its own (nothing of Ray outlives it); yields /v1."""
    return layerserve(["--session-dir", str(session_dir), "--shutdown-timeout", "5", *flags],
                      env={"RAY_USAGE_STATS_ENABLED": "0"}, log=log, new_session=True, start_timeout=300)


def workload(base_url: str, sessions: int, turns: int, num_tools: int, max_tokens: int, result_chars: int,
             salt: str, tool_seconds: float = 0.0) -> tuple[float, list[float], int, int]:
    """(wall seconds, TTFT of every turn, cached prompt tokens, prompt tokens)."""
    totals = [0, 0]
    wall, ttfts = agentic(base_url, sessions, turns, num_tools, max_tokens, salt, result_chars, totals, tool_seconds)
    return wall, ttfts, totals[0], totals[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tools", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--result-chars", type=int, default=1500, help="size of each tool result appended")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tool-seconds", type=float, default=1.0,
                   help="each tool call takes 0.5x-1.5x this long before its result is sent (0: none)")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[float, float, float, float]]] = {}
    for name, flags in SETUPS.items():
        print(f"# {name}: starting", file=sys.stderr, flush=True)
        tag = uuid.uuid4().hex[:8]
        with cluster(flags, args.out / f"cluster-{tag}.log", args.out / f"cluster-sessions-{tag}") as url:
            workload(url, 4, 2, args.tools, 4, 200, f"{tag}-warm-up")  # every replica's kernels and plans warm
            for r in range(args.rounds):
                wall, ttfts, cached, prompt = workload(url, args.sessions, args.turns, args.tools, args.max_tokens,
                                                       args.result_chars, f"{tag}-{r}", args.tool_seconds)
                row = (wall, pct(ttfts, 0.5) * 1000, pct(ttfts, 0.95) * 1000, cached / max(prompt, 1))
                print(f"# {name} round {r}: wall {row[0]:.1f}s, TTFT p50 {row[1]:.0f} ms, p95 {row[2]:.0f} ms, "
                      f"hit rate {row[3]:.1%}", file=sys.stderr, flush=True)
                rows.setdefault(name, []).append(row)
    lines = [f"Agentic workload: {args.sessions} sessions x {args.turns} turns, a shared {args.tools}-tool prompt, "
             f"{args.result_chars}-char tool results taking ~{args.tool_seconds:g} s each, {args.max_tokens} tokens "
             f"per reply; median of {args.rounds} "
             f"rounds; {cpu_model_name()}, {os.cpu_count()} CPUs", "",
             "| setup | wall s | TTFT p50 ms | TTFT p95 ms | prefix-cache hit rate |", "|---|---|---|---|---|"]
    for name, values in rows.items():
        wall, p50, p95, hit = (statistics.median(col) for col in zip(*values))
        lines.append(f"| {name} | {wall:.1f} | {p50:.0f} | {p95:.0f} | {hit:.1%} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "cluster.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
