"""Where one decode stream spends its time: cProfile of a single-stream greedy generate, plus
torch's operator profile of the same run.

    .venv/bin/python bench/profile_decode.py [--tokens 64] [--dtype float32] [--no-compile] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

_BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _BENCH]  # bench/http.py shadows http

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from layerserve.engine.llm import LLM  # noqa: E402
from layerserve.engine.request import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-compile", action="store_true", help="eager steps only (the reference)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()

    llm = LLM(dtype=args.dtype, compile=not args.no_compile, progress=False)
    prompt = llm.encode_chat([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up

    t0 = time.perf_counter()
    llm.generate([prompt], params)
    plain = time.perf_counter() - t0
    print(f"{args.tokens} tokens in {plain:.2f} s without a profiler: {args.tokens / plain:.1f} tok/s "
          f"(prefill of {len(prompt)} tokens included)\n")

    prof = cProfile.Profile()
    prof.enable()
    llm.generate([prompt], params)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    print("## cProfile, by own time\n" + buf.getvalue())

    with profile(activities=[ProfilerActivity.CPU]) as tprof:
        llm.generate([prompt], params)
    print("## torch operators, by self CPU time")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
