"""Stateful inference benchmark: TTFT by turn of long conversations and of an agentic load.

(a) one 30-turn conversation behind a ~1,000-token system prompt: time to first token of every
    turn; (b) 8 sessions x 8 turns sharing a long tool-definition prompt, each turn appending a
    tool result: wall time and p50/p95 TTFT. Run against layerserve with and without the prefix
    cache and against llama.cpp's llama-server, all through the OpenAI SDK, in the same run.

    .venv/bin/python bench/multiturn.py [--turns 30] [--skip-llamacpp] [--out bench/out]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from openai import OpenAI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOPICS = ["rivers", "volcanoes", "bridges", "owls", "tea", "comets", "glaciers", "violins", "deserts", "ferns"]
QUESTIONS = ["Tell me one fact about {t}.", "Why do people like {t}?", "Name a famous example of {t}.",
             "How would you explain {t} to a child?", "What is surprising about {t}?"]


def system_prompt(words: int) -> str:
    rules = [f"Rule {i}: when the user mentions {TOPICS[i % len(TOPICS)]}, answer briefly and stay polite." for i in range(words // 14)]
    return "You are a helpful assistant for a museum. " + " ".join(rules)


def tool_prompt(num_tools: int) -> str:
    lines = ["You are an agent. You can call these tools by answering with JSON:"]
    for i in range(num_tools):
        lines.append(f'- tool_{i}(city: string, unit: "celsius"|"fahrenheit", days: integer): returns forecast number {i} '
                     f"for the city over the given days, with humidity, wind speed and a short summary text.")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def layerserve(extra: list[str], env: dict[str, str] | None = None, log: pathlib.Path | None = None,
               new_session: bool = False, start_timeout: float = 120):
    """`layerserve serve` on a free port (`env`: extra environment variables; `log`: its output);
    yields its /v1 URL. `new_session`: run it in a session of its own and kill what is left of that
    session at the end (a cluster: nothing of Ray outlives it)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "layerserve.cli", "serve", "--port", str(port), "--log-level", "warning", *extra]
    out = log.open("w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=new_session)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(Exception), urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"layerserve {' '.join(extra)} did not start" + (f"; see {log}" if log else ""))
        yield url + "/v1"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        if new_session:
            _kill_session(proc.pid)
        proc.kill()
        proc.wait()
        if log is not None:
            out.close()


def _kill_session(sid: int) -> None:
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    os.kill(int(entry.name), 9)


def chat_turn(client: OpenAI, messages: list[dict], max_tokens: int) -> tuple[float, str, tuple[int, int]]:
    """Stream one turn; returns (TTFT seconds, reply text, (cached, total) prompt tokens as reported)."""
    start = time.perf_counter()
    ttft = None
    text = []
    cached = prompt = 0
    stream = client.chat.completions.create(model="any", messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - start
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", 0) or 0
            prompt = chunk.usage.prompt_tokens
    return (ttft if ttft is not None else time.perf_counter() - start), "".join(text), (cached, prompt)


def conversation(base_url: str, turns: int, sys_words: int, max_tokens: int) -> list[tuple[float, tuple[int, int]]]:
    client = OpenAI(base_url=base_url, api_key="bench")
    messages = [{"role": "system", "content": system_prompt(sys_words)}]
    out = []
    for k in range(turns):
        q = QUESTIONS[k % len(QUESTIONS)].format(t=TOPICS[k % len(TOPICS)])
        messages.append({"role": "user", "content": q})
        ttft, reply, cached = chat_turn(client, messages, max_tokens)
        messages.append({"role": "assistant", "content": reply})
        out.append((ttft, cached))
    return out


def agentic(base_url: str, sessions: int, turns: int, num_tools: int, max_tokens: int,
            salt: str = "", result_chars: int = 0, totals: list[int] | None = None,
            tool_seconds: float = 0.0) -> tuple[float, list[float]]:
    """Parallel sessions sharing one tool system prompt, each turn appending the reply and a tool
    result: (wall seconds, TTFT of every turn). `salt` goes into each session's first message, so
    repeated rounds are new sessions (bench/speed.py); the shared tool prompt stays the same.
    `result_chars`: a tool result carries a report of that many characters; `totals`: [cached,
    prompt] tokens as the responses report them, added up. `tool_seconds`: each tool call takes
    0.5x-1.5x that long before its result is sent (seeded per session), as a real tool would."""
    ttfts: list[float] = []
    lock = threading.Lock()
    tag = f" ({salt})" if salt else ""
    report = ("humidity, wind and cloud cover by hour; " * (result_chars // 40 + 1))[:result_chars]
    counts = totals if totals is not None else [0, 0]

    def session(s: int) -> None:
        client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
        rng = random.Random(s)
        messages = [{"role": "system", "content": tool_prompt(num_tools)},
                    {"role": "user", "content": f"Plan a trip for traveller {s}{tag}: check the weather in "
                                                f"{TOPICS[s % len(TOPICS)]}ville."}]
        for k in range(turns):
            ttft, reply, (cached, prompt) = chat_turn(client, messages, max_tokens)
            with lock:
                ttfts.append(ttft)
                counts[0] += cached
                counts[1] += prompt
            messages.append({"role": "assistant", "content": reply})
            if tool_seconds:
                time.sleep(tool_seconds * rng.uniform(0.5, 1.5))
            result = f', "report": "{report}"' if report else ""
            messages.append({"role": "user", "content": f'Tool result: {{"tool": "tool_{k}", "temp": {10 + k}, '
                                                        f'"humidity": {40 + s}{result}}}'})

    start = time.perf_counter()
    threads = [threading.Thread(target=session, args=(s,)) for s in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, ttfts


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--system-words", type=int, default=700, help="~1,000 tokens")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--agent-turns", type=int, default=8)
    p.add_argument("--tools", type=int, default=24)
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    systems: dict[str, contextlib.AbstractContextManager] = {
        "layerserve": layerserve([]),
        "layerserve --no-prefix-cache": layerserve(["--no-prefix-cache"]),
    }
    if not args.skip_llamacpp:
        from peers import llama_server  # noqa: PLC0415  (bench-only peer)

        from layerserve.model_files import default_model_path

        systems["llama.cpp llama-server"] = (
            _llama_v1(llama_server(default_model_path(), parallel=args.sessions, ctx_per_slot=8192)))
    conv: dict[str, list[tuple[float, int]]] = {}
    agent: dict[str, tuple[float, list[float]]] = {}
    for name, ctx in systems.items():
        with ctx as url:
            print(f"# {name}: conversation", file=sys.stderr, flush=True)
            conv[name] = conversation(url, args.turns, args.system_words, args.max_tokens)
            print(f"# {name}: agentic", file=sys.stderr, flush=True)
            agent[name] = agentic(url, args.sessions, args.agent_turns, args.tools, args.max_tokens)
    report(conv, agent, args)


@contextlib.contextmanager
def _llama_v1(ctx):
    with ctx as server:
        yield server.url + "/v1"


def report(conv, agent, args) -> None:
    names = list(conv)
    lines = [f"### (a) {args.turns}-turn conversation, ~1,000-token system prompt, TTFT (ms)", "",
             "| system | turn 1 | turn 2 | turn 10 | turn 30 (last) | late/early | cached share after turn 1 |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        t = [x[0] * 1000 for x in conv[n]]
        late, early = statistics.mean(t[-5:]), statistics.mean(t[1:4])
        cached = sum(x[1][0] for x in conv[n][1:])
        prompt = sum(x[1][1] for x in conv[n][1:])
        share = f"{cached / prompt:.0%}" if cached else "n/a"
        lines.append(f"| {n} | {t[0]:.0f} | {t[1]:.0f} | {t[min(9, len(t) - 1)]:.0f} | {t[-1]:.0f} | {late / early:.2f}x | {share} |")
    lines += ["", f"### (b) agentic: {args.sessions} sessions x {args.agent_turns} turns, shared {args.tools}-tool prompt", "",
              "| system | wall (s) | TTFT p50 (ms) | TTFT p95 (ms) |", "|---|---|---|---|"]
    for n in names:
        wall, ttfts = agent[n]
        lines.append(f"| {n} | {wall:.1f} | {pct(ttfts, 0.5) * 1000:.0f} | {pct(ttfts, 0.95) * 1000:.0f} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "multiturn.md").write_text(table + "\n")
    _plot(conv, args.out / "multiturn_ttft.png")


def _plot(conv, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, turns in conv.items():
        ax.plot(range(1, len(turns) + 1), [t[0] * 1000 for t in turns], marker="o", markersize=3, label=name)
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("TTFT by turn, SmolLM2-135M, 2 CPU cores")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
