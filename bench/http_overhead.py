"""HTTP overhead: the same work through `layerserve serve` (OpenAI SDK, streaming) and the offline engine.

    .venv/bin/python bench/http_overhead.py [--dtype q4] [--tokens 64] [--streams 32] [--rounds 3]

Prints aggregate tokens/s at N concurrent streams and one request's time to first token, for the
offline engine (in this process) and the server (a subprocess on localhost), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import time

from openai import AsyncOpenAI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from multiturn import layerserve  # noqa: E402

from layerserve.engine.llm import LLM  # noqa: E402
from layerserve.engine.request import SamplingParams  # noqa: E402

QUESTION = "Write a story about a lighthouse keeper number {i}."
# Each timed single request arrives at an idle engine, offline and through the server alike: back to
# back, the OpenMP workers are still spinning from the last request and the first costs less
# (measured: 122-125 ms back to back vs 130-147 ms after 10 ms idle, float32).
IDLE_BEFORE_TTFT = 0.1


def offline(dtype: str, streams: int, tokens: int, repeats: int) -> tuple[float, float]:
    llm = LLM(dtype=dtype, progress=False, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [llm.encode_chat([{"role": "user", "content": QUESTION.format(i=i)}]) for i in range(streams)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    ttfts = []
    for r in range(repeats):
        core = llm.core
        time.sleep(IDLE_BEFORE_TTFT)
        start = time.perf_counter()
        ids = llm.encode_chat([{"role": "user", "content": QUESTION.format(i=1000 + r)}])
        core.add_request(f"ttft-{r}", ids, SamplingParams(max_tokens=1))
        while core.has_work():
            core.step()
        ttfts.append(time.perf_counter() - start)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    rate = sum(len(o.token_ids) for res in results for o in res.outputs) / (time.perf_counter() - start)
    return rate, statistics.median(ttfts)


async def served(url: str, streams: int, tokens: int, repeats: int) -> tuple[float, float]:
    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    async def one(i: int, max_tokens: int) -> tuple[float, int]:
        start = time.perf_counter()
        first = None
        count = 0
        stream = await client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": QUESTION.format(i=i)}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:  # the role chunk carries ""
                first = first or time.perf_counter() - start
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return first or time.perf_counter() - start, count

    await asyncio.gather(one(0, 4), one(1, 4))  # warm-up
    ttfts = []
    for r in range(repeats):
        await asyncio.sleep(IDLE_BEFORE_TTFT)
        ttfts.append((await one(1000 + r, 1))[0])
    start = time.perf_counter()
    done = await asyncio.gather(*(one(i, tokens) for i in range(streams)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(c for _, c in done) / elapsed, statistics.median(ttfts)


def offline_in_child(args: argparse.Namespace) -> tuple[float, float]:
    """The offline engine in a fresh process: a model loaded and freed in this process would stay
    behind (allocator, thread pools) and slow the HTTP client that runs here afterwards."""
    cmd = [sys.executable, __file__, "--offline-only", "--dtype", args.dtype, "--streams", str(args.streams),
           "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["rate"], result["ttft"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="q4")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="single requests timed for TTFT (median)")
    p.add_argument("--rounds", type=int, default=3, help="offline/server rounds, interleaved (median)")
    p.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="environment variables for the server process only (A/B experiments)")
    p.add_argument("--skip-offline", action="store_true", help="only the server column")
    p.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.offline_only:
        rate, ttft = offline(args.dtype, args.streams, args.tokens, args.repeats)
        print(json.dumps({"rate": rate, "ttft": ttft}))
        return
    env = dict(item.split("=", 1) for item in args.server_env)
    rounds: list[tuple[float, float, float, float]] = []
    with layerserve(["--dtype", args.dtype, "--no-prefix-cache"], env) as url:  # idle while offline runs
        for r in range(args.rounds):
            off_rate, off_ttft = (float("nan"), float("nan")) if args.skip_offline else offline_in_child(args)
            http_rate, http_ttft = asyncio.run(served(url, args.streams, args.tokens, args.repeats))
            rounds.append((off_rate, http_rate, off_ttft, http_ttft))
            print(f"# round {r + 1}: offline {off_rate:.1f} tok/s, TTFT {off_ttft * 1000:.0f} ms; "
                  f"server {http_rate:.1f} tok/s, TTFT {http_ttft * 1000:.0f} ms", file=sys.stderr, flush=True)
    off_rate, http_rate, off_ttft, http_ttft = (statistics.median(col) for col in zip(*rounds))
    print(f"| {args.dtype}, {args.streams} streams x {args.tokens} tokens, median of {args.rounds} rounds "
          "| offline engine | HTTP server (SDK, streaming) | ratio / delta |")
    print("|---|---|---|---|")
    print(f"| aggregate tokens/s | {off_rate:.1f} | {http_rate:.1f} | {http_rate / off_rate:.2f}x |")
    print(f"| TTFT, one request, ms | {off_ttft * 1000:.0f} | {http_ttft * 1000:.0f} | {1000 * (http_ttft - off_ttft):+.0f} ms |")
    print("(tokens: the usage chunk's completion_tokens through the server, generated tokens offline; "
          "each offline round in a fresh process, the server idle meanwhile)")


if __name__ == "__main__":
    main()
