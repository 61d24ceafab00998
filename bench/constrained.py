"""Cost of grammar-constrained decoding per token, against the same run unconstrained.

    .venv/bin/python bench/constrained.py [--dtype float32] [--tokens 64] [--batch 1 16]

Every row generates the same number of tokens (ignore_eos; grammars that never end), greedily,
from the same prompts, through the offline engine, so the difference is what the grammar costs:
llguidance's mask per sample and token, plus applying it in the sampler.
- free text: `start: /(?s:.*)/`, a mask with every token allowed (the costliest to apply);
- JSON string: a quote, then a string body, a mask that refuses the tokens holding a quote,
  backslash or newline (what argument and json_schema values mostly are).
Rows run interleaved and the best of the repeats is kept, so drift on a busy machine hits every
row alike.
"""

from __future__ import annotations

import argparse
import time

from layerserve.engine.llm import LLM
from layerserve.engine.request import SamplingParams
from layerserve.model.guided import GrammarCompiler

GRAMMARS = {
    "unconstrained": None,
    "free text grammar": "start: /(?s:.*)/\n",
    "JSON string": 'start: "\\"" /[^"\\\\\\n]*/\n',
}


def step_ms(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    """Milliseconds per decode step (wall / tokens of one sequence)."""
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    steps = max(len(o.token_ids) for r in results for o in r.outputs)
    assert steps == params.max_tokens, steps
    return elapsed / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype, progress=False, enable_prefix_caching=False)
    compiler = GrammarCompiler(llm.tokenizer)
    prompts = [llm.encode_chat([{"role": "user", "content": f"Write a long story about lighthouse {i}."}])
               for i in range(max(args.batch))]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    params = {name: SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True,
                                   logits_mask_factory=compiler.lark(grammar) if grammar else None)
              for name, grammar in GRAMMARS.items()}
    table = {name: [float("inf")] * len(args.batch) for name in GRAMMARS}
    for _ in range(args.repeats):  # rows interleaved, best of the repeats: drift hits every row alike
        for j, b in enumerate(args.batch):
            for name, p in params.items():
                table[name][j] = min(table[name][j], step_ms(llm, prompts[:b], p))
    base = table["unconstrained"]
    print(f"\nms per decode step ({args.dtype}, {args.tokens} tokens, best of {args.repeats}):\n")
    print("| | " + " | ".join(f"batch {b}" for b in args.batch) + " |")
    print("|---|" + "---|" * len(args.batch))
    for name, row in table.items():
        cells = [f"{ms:.1f}" if name == "unconstrained" else f"{ms:.1f} ({ms - b:+.2f} ms, {ms / b - 1:+.0%})"
                 for ms, b in zip(row, base)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
