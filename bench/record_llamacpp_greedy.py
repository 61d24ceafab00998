"""Record llama.cpp's greedy continuations of 8 prompts on the default GGUF into a test fixture.

    .venv/bin/python bench/record_llamacpp_greedy.py [--tokens 32] [--out tests/fixtures/llamacpp_greedy.json]

Each prompt is rendered and tokenized by layerserve (the chat template, or plain text), sent to
llama-server's /completion as token ids (so both sides start from the same tokens), and answered
with temperature 0 / top_k 1. The fixture keeps the prompt ids, llama-server's continuation ids and
how many leading tokens layerserve's default path (offline engine, greedy) agreed on when it was
recorded, with the host. tests/model/test_llamacpp_agreement.py replays layerserve against it.
Run it once on a quiet machine; rerun only when the default path's numerics change on purpose.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

_BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

from bench.peers import llama_server  # noqa: E402

CHATS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain what a prime number is to a child.",
    "Translate 'good morning, how are you?' into Spanish.",
]
TEXTS = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the mountains, there lived",
]


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompts(llm) -> list[dict]:
    out = [{"kind": "chat", "text": t, "ids": llm.encode_chat([{"role": "user", "content": t}])} for t in CHATS]
    tok = llm.tokenizer
    out += [{"kind": "text", "text": t, "ids": tok.encode(t, add_special_tokens=tok.add_bos_token)} for t in TEXTS]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=pathlib.Path, default=_BENCH.parent / "tests" / "fixtures" / "llamacpp_greedy.json")
    args = p.parse_args()

    from layerserve.engine.llm import LLM
    from layerserve.engine.request import SamplingParams
    from layerserve.model_files import default_model_path

    model = default_model_path()
    llm = LLM(progress=False)
    cases = prompts(llm)
    with llama_server(model, parallel=1, ctx_per_slot=4096) as srv:
        for case in cases:
            body = {"prompt": case["ids"], "n_predict": args.tokens, "temperature": 0.0, "top_k": 1,
                    "cache_prompt": False, "return_tokens": True, "ignore_eos": True}
            resp = srv.post("/completion", body)
            if "tokens" not in resp:
                raise SystemExit(f"llama-server returned no token ids (keys: {sorted(resp)})")
            case["llamacpp"] = resp["tokens"][: args.tokens]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    for case in cases:
        ours = llm.generate([case["ids"]], params)[0].outputs[0].token_ids
        case["layerserve_agreement"] = leading_agreement(ours, case["llamacpp"])
        print(f"{case['layerserve_agreement']:3d}/{args.tokens} leading tokens agree: {case['text'][:50]!r}")
    with open("/proc/cpuinfo") as f:
        flags = sorted({w for line in f if line.startswith("flags") for w in line.split() if w.startswith(("avx", "amx"))})
    fixture = {
        "about": "llama-server's greedy continuations on the default GGUF (see bench/record_llamacpp_greedy.py)",
        "model": model.name, "tokens": args.tokens, "recorded": time.strftime("%Y-%m-%d"),
        "host": f"{platform.processor() or platform.machine()}; {' '.join(flags)}",
        "cases": cases,
    }
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    total = sum(c["layerserve_agreement"] for c in cases)
    print(f"total {total}/{args.tokens * len(cases)}; wrote {args.out}")


if __name__ == "__main__":
    main()
