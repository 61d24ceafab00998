"""Prompt-lookup speculative decoding on and off: offline engine, a copying and a non-copying prompt.

    .venv/bin/python bench/speculative.py [--rounds 3] [--tokens 128] [--dtype auto]

Two engines on the default model, `draft_tokens=0` and the default, measured in interleaved rounds
(greedy, EOS honoured, up to --tokens): decode tokens/s (median), how many draft tokens were made
and kept, and whether the two outputs are the same token for token. Numbers are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

_BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _BENCH]  # bench/http.py shadows http
sys.path.insert(0, str(_BENCH.parent))

from bench.common import cpu_model_name  # noqa: E402
from layerserve.engine.llm import LLM  # noqa: E402
from layerserve.engine.request import SamplingParams  # noqa: E402

RECORD = {"city": "Paris", "temperature_celsius": 21, "humidity_percent": 40,
          "wind": {"speed_kmh": 12, "direction": "north-west"}, "forecast": ["sunny", "cloudy", "rain"]}
PROMPTS = {
    "copying (echo a tool result)": f"Repeat this JSON exactly: {json.dumps(RECORD)}",
    "non-copying (a story)": "Write a long story about a lighthouse keeper.",
}


def run(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[float, list[int], int, int]:
    """(tokens/s, output ids, draft tokens made, kept) of one generate."""
    before = llm.core.stats()
    t0 = time.perf_counter()
    out = llm.generate([prompt], params)[0].outputs[0].token_ids
    seconds = time.perf_counter() - t0
    after = llm.core.stats()
    return (len(out) / seconds, out, after.spec_draft_tokens - before.spec_draft_tokens,
            after.spec_accepted_tokens - before.spec_accepted_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    engines = {"off": LLM(dtype=args.dtype, draft_tokens=0, progress=False), "on": LLM(dtype=args.dtype, progress=False)}
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    print(f"{cpu_model_name()}; --dtype {args.dtype}; greedy, up to {args.tokens} tokens; medians of {args.rounds} "
          f"interleaved rounds\n")
    print("| prompt | drafting off, tok/s | drafting on, tok/s | speed-up | drafts kept | same output |")
    print("|---|---|---|---|---|---|")
    for name, text in PROMPTS.items():
        ids = engines["off"].encode_chat([{"role": "user", "content": text}])
        for llm in engines.values():  # warm-up
            llm.generate([ids], SamplingParams(max_tokens=4, temperature=0.0))
        rates: dict[str, list[float]] = {"off": [], "on": []}
        outputs: dict[str, list[int]] = {}
        made = kept = 0
        for r in range(args.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                rate, out, d, a = run(engines[mode], ids, params)
                rates[mode].append(rate)
                outputs[mode] = out
                made, kept = made + d, kept + a
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(f"| {name} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {kept}/{made} | "
              f"{'yes' if outputs['on'] == outputs['off'] else 'no'} |")


if __name__ == "__main__":
    main()
