"""Speed next to llama.cpp: layerserve's HTTP server vs `llama-server`, same GGUF, same run.

    .venv/bin/python bench/speed.py                                # 3 interleaved rounds, medians
    .venv/bin/python bench/speed.py --quick                        # smoke run: 1 round, fewer tokens
    .venv/bin/python bench/speed.py --ours-args "--no-compile"     # layerserve with extra serve flags
    .venv/bin/python bench/speed.py --skip-llamacpp --rounds 5 --out bench/out/speed.md

Both servers run for the whole benchmark (idle between measurements) and are reached over localhost
HTTP with the OpenAI SDK: layerserve as `python -m layerserve.cli serve` with its default flags,
llama-server as users run it (`-t 2 -c 32768 -np 16 --jinja`, prompt cache on). Every round measures
each metric on both servers, alternating which goes first; the table shows the median over rounds.
Rows: single-stream decode, TTFT of a ~1,000-token prompt, aggregate tokens/s at 4/16/32 streams, an
agentic workload (parallel sessions sharing a 30-tool system prompt), decode while another process
keeps a core busy, and decode as a share of the weight-bandwidth bound. Numbers are reported, never
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

_BENCH = pathlib.Path(__file__).resolve().parent
ROOT = _BENCH.parent


def _bench_dir_off_path() -> None:
    """Run as a script, Python puts bench/ first on sys.path (bench/multiturn.py adds it too), where a
    bench script named like a stdlib module would shadow it. Import the siblings as `bench.*`."""
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _BENCH]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


_bench_dir_off_path()

import torch  # noqa: E402
from openai import OpenAI  # noqa: E402

from bench.common import PromptMaker, Timing, aggregate_rate, cpu_model_name, stop_process  # noqa: E402
from bench.engine import gguf_weight_bytes  # noqa: E402
from bench.multiturn import TOPICS, chat_turn, tool_prompt  # noqa: E402
from bench.multiturn import agentic as multiturn_agentic  # noqa: E402
from bench.peers import CACHE_DIR, _free_port, build_llama_server  # noqa: E402
from layerserve.model.cpu_load import CpuWatch  # noqa: E402
from layerserve.model_files import default_model_path  # noqa: E402

_bench_dir_off_path()  # bench.multiturn put it back

OURS = "layerserve"
THEIRS = "llama-server"
STORY = "Write a long story about a lighthouse keeper."
LLAMA_SERVER_FLAGS = ("-t", "2", "-c", "32768", "-np", "16", "--jinja")
# Shared tool prompt of the agentic sessions. 40 tools would be 2,055 prompt tokens, over llama-server's
# 2,048-token slots (-c 32768 split among -np 16): it answers 400. 30 tools = 1,559 tokens at turn 1,
# 1,904 + 32 new at turn 6, so all 6 turns fit a slot.
NUM_TOOLS = 30
AGENT_MAX_TOKENS = 32  # per turn, as bench/multiturn.py
LONG_PROMPT_TOKENS = 1000
HEALTH_TIMEOUT_S = 300.0


def _log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    max_tokens: int  # single-stream and concurrent requests
    concurrency: tuple[int, ...]
    sessions: int  # agentic workload
    turns: int
    ttft_repeats: int  # fresh ~1,000-token prompts per round (their median is the round's figure)


def make_plan(quick: bool, rounds: int) -> Plan:
    if quick:
        return Plan(rounds=1, max_tokens=32, concurrency=(4, 16), sessions=2, turns=2, ttft_repeats=1)
    return Plan(rounds=rounds, max_tokens=128, concurrency=(4, 16, 32), sessions=6, turns=6, ttft_repeats=3)


# --- servers --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Server:
    name: str
    url: str  # base address, without /v1
    proc: subprocess.Popen
    client: OpenAI

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def _tail(log: pathlib.Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def _wait_healthy(name: str, proc: subprocess.Popen, url: str, log: pathlib.Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}; the end of {log}:\n{_tail(log)}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(url + "/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{name} not healthy after {HEALTH_TIMEOUT_S:.0f} s; the end of {log}:\n{_tail(log)}")


@contextlib.contextmanager
def _served(name: str, cmd: list[str], log: pathlib.Path, port: int) -> Iterator[Server]:
    """Run `cmd` (a server listening on `port`), its output in `log`, until the block ends."""
    log.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    _log(f"starting {name}: {shlex.join(cmd)} (log: {log})")
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(name, proc, url, log)
            _log(f"{name} healthy after {time.perf_counter() - t0:.1f} s (pid {proc.pid})")
            yield Server(name, url, proc, OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600))
        finally:
            stop_process(proc)


def layerserve_server(model: pathlib.Path, extra: list[str],
                      log: pathlib.Path) -> contextlib.AbstractContextManager[Server]:
    """`layerserve serve` with its default flags (+ `extra`) on a free port."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.is_file() else sys.executable
    port = _free_port()
    cmd = [python, "-m", "layerserve.cli", "serve", "--port", str(port), str(model), *extra]
    return _served(OURS, cmd, log, port)


def llama_cpp_server(model: pathlib.Path, log: pathlib.Path) -> contextlib.AbstractContextManager[Server]:
    """llama-server as users run it (bench/peers.py's llama_server() has no --jinja and splits the
    context itself, so the command is built here; the binary comes from peers.py's cache)."""
    if not any((CACHE_DIR / "bin").glob("llama-server-*")):
        _log(f"no llama-server binary cached in {CACHE_DIR / 'bin'}: building it (about 17 minutes on 2 cores)")
    binary = build_llama_server()
    port = _free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *LLAMA_SERVER_FLAGS]
    return _served(THEIRS, cmd, log, port)


# --- requests -------------------------------------------------------------------------------------


def _ignore_eos() -> dict:
    return {"ignore_eos": True}


def stream_chat(client: OpenAI, messages: list[dict], max_tokens: int) -> Timing:
    """One greedy streamed chat completion, EOS ignored. first_token / done = arrival of the first /
    last chunk with content; new_tokens = usage.completion_tokens."""
    submitted = time.perf_counter()
    first = last = finished = None
    prompt_tokens = new_tokens = 0
    stream = client.chat.completions.create(
        model="any", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=_ignore_eos())
    for chunk in stream:
        now = time.perf_counter()
        choice = chunk.choices[0] if chunk.choices else None
        if choice is not None and choice.delta.content:
            if first is None:
                first = now
            last = now
        elif choice is not None and choice.finish_reason and finished is None:
            finished = now
        if chunk.usage is not None:
            prompt_tokens, new_tokens = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
    if first is None:  # no text at all (e.g. one special token): the finish chunk stands in
        if finished is None:
            raise RuntimeError("stream ended without content or finish_reason")
        first = last = finished
    return Timing(submitted, first, last, prompt_tokens, new_tokens)


def complete_chat(client: OpenAI, prompt: str, max_tokens: int) -> Timing:
    """One greedy non-streamed chat completion, EOS ignored (no first-token time)."""
    submitted = time.perf_counter()
    resp = client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, extra_body=_ignore_eos())
    return Timing(submitted, None, time.perf_counter(), resp.usage.prompt_tokens, resp.usage.completion_tokens)


def _check_count(t: Timing, asked: int, what: str) -> None:
    if t.new_tokens != asked:
        _log(f"  warning: {what} produced {t.new_tokens} tokens, asked for {asked} (ignore_eos not honoured?)")


def long_messages(reps: int) -> list[dict]:
    """A user message of `reps` copies of a long paragraph behind a unique random first line, so no
    prefix cache (ours or llama-server's) can serve it from an earlier prompt."""
    head = f"Note {uuid.uuid4().hex}: summarise the passage below in one line.\n"
    return [{"role": "user", "content": head + PromptMaker.LONG * reps}]


def long_prompt_reps(client: OpenAI, target: int) -> int:
    """Copies of the paragraph that make a ~`target`-token chat prompt (measured through usage)."""
    p4 = stream_chat(client, long_messages(4), 1).prompt_tokens
    p12 = stream_chat(client, long_messages(12), 1).prompt_tokens
    per = (p12 - p4) / 8
    return max(1, round(4 + (target - p4) / per))


# --- metrics --------------------------------------------------------------------------------------

Sample = dict[str, float]


@dataclass(frozen=True, slots=True)
class Context:
    plan: Plan
    reps: int  # paragraph copies in the ~1,000-token prompt


def decode(srv: Server, ctx: Context, r: int) -> Sample:
    t = stream_chat(srv.client, [{"role": "user", "content": STORY}], ctx.plan.max_tokens)
    _check_count(t, ctx.plan.max_tokens, "decode")
    return {"decode": t.decode_rate}


def ttft_long(srv: Server, ctx: Context, r: int) -> Sample:
    runs = [stream_chat(srv.client, long_messages(ctx.reps), 1) for _ in range(ctx.plan.ttft_repeats)]
    return {"ttft": statistics.median(t.ttft for t in runs),
            "ttft_prompt": statistics.median(t.prompt_tokens for t in runs)}


def concurrent_rate(client: OpenAI, n: int, max_tokens: int, salt: str) -> float:
    """n distinct short prompts sent together (one thread each): all completion tokens over the wall
    time from the first submit to the last finish."""
    barrier = threading.Barrier(n)

    def one(i: int) -> Timing:
        barrier.wait()
        return complete_chat(client, f"Write a short story about {TOPICS[i % len(TOPICS)]}, number {i} ({salt}).",
                             max_tokens)

    with ThreadPoolExecutor(n) as pool:
        timings = list(pool.map(one, range(n)))
    for t in timings:
        _check_count(t, max_tokens, f"{n} concurrent")
    return aggregate_rate(timings)


def concurrency(n: int) -> Callable[[Server, Context, int], Sample]:
    def measure(srv: Server, ctx: Context, r: int) -> Sample:
        return {f"agg{n}": concurrent_rate(srv.client, n, ctx.plan.max_tokens, f"round {r}")}

    measure.__name__ = f"{n} concurrent"
    return measure


def agentic(srv: Server, ctx: Context, r: int) -> Sample:
    wall, ttfts = multiturn_agentic(srv.v1, ctx.plan.sessions, ctx.plan.turns, NUM_TOOLS, AGENT_MAX_TOKENS,
                                    salt=f"round {r}")
    if len(ttfts) != ctx.plan.sessions * ctx.plan.turns:
        raise RuntimeError(f"{len(ttfts)} of {ctx.plan.sessions * ctx.plan.turns} agentic turns finished")
    return {"agent_wall": wall, "agent_ttft": statistics.median(ttfts)}


@contextlib.contextmanager
def busy_core(watch: CpuWatch) -> Iterator[None]:
    """Another process spinning on one core (counted as ours by `watch`), started ~1 s before."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    watch.pids.append(burner.pid)
    try:
        time.sleep(1.0)
        yield
    finally:
        watch.pids.remove(burner.pid)
        burner.kill()
        burner.wait()


def decode_busy(watch: CpuWatch) -> Callable[[Server, Context, int], Sample]:
    def measure(srv: Server, ctx: Context, r: int) -> Sample:
        with busy_core(watch):
            return {"busy": decode(srv, ctx, r)["decode"]}

    measure.__name__ = "decode, one core busy"
    return measure


# --- the run --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # server -> key -> per round
    others: dict[str, float] = field(default_factory=dict)  # server -> worst other-process CPU, cores
    failures: list[str] = field(default_factory=list)

    def add(self, server: str, sample: Sample, others: float) -> None:
        for key, value in sample.items():
            self.samples.setdefault(server, {}).setdefault(key, []).append(value)
        self.others[server] = max(self.others.get(server, 0.0), others)

    def median(self, server: str, key: str) -> float | None:
        values = self.samples.get(server, {}).get(key)
        return statistics.median(values) if values else None


def warm_up(srv: Server, plan: Plan) -> None:
    """First-request costs out of the way: short streams, a batch as wide as the widest run, and the
    shared tool prompt (so every round, the first included, finds it cached)."""
    for _ in range(2):
        stream_chat(srv.client, [{"role": "user", "content": STORY}], 8)
    concurrent_rate(srv.client, max(plan.concurrency), 4, "warm-up")
    chat_turn(srv.client, [{"role": "system", "content": tool_prompt(NUM_TOOLS)},
                           {"role": "user", "content": "Which tools do you have?"}], 4)


def run_rounds(servers: list[Server], ctx: Context, watch: CpuWatch) -> Results:
    metrics = [decode, ttft_long, *(concurrency(n) for n in ctx.plan.concurrency), agentic, decode_busy(watch)]
    res = Results()
    for r in range(1, ctx.plan.rounds + 1):
        order = servers if r % 2 else servers[::-1]
        _log(f"round {r}/{ctx.plan.rounds}: {' then '.join(s.name for s in order)}")
        for metric in metrics:
            for srv in order:
                watch.start()
                try:
                    sample = metric(srv, ctx, r)
                except Exception as e:  # a failed cell is n/a, not the end of the run
                    traceback.print_exc()
                    res.failures.append(f"round {r}, {metric.__name__}, {srv.name}: {type(e).__name__}: {e}")
                    continue
                others = watch.stop()
                res.add(srv.name, sample, others)
                shown = ", ".join(f"{k} {v:,.3g}" for k, v in sample.items())
                _log(f"  {metric.__name__:>22} {srv.name:>12}: {shown} (others {others:.2f} cores)")
    return res


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums over an `nbytes` float32 tensor, all threads."""
    t = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1)
    t.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def cpu_flags() -> list[str]:
    """The CPU's AVX and AMX flags (what `grep -o 'avx[^ ]*' /proc/cpuinfo | sort -u` lists, + amx)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags.update(w for w in line.split(":", 1)[1].split() if "avx" in w or "amx" in w)
    return sorted(flags)


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


# --- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    higher_is_better: bool
    scale: float = 1.0
    digits: int = 1


def _num(value: float, row: Row) -> str:
    return f"{value * row.scale:,.{row.digits}f}"


def _cell(res: Results, server: str, row: Row) -> str:
    value = res.median(server, row.key)
    if value is None:
        return "n/a"
    text = _num(value, row)
    if row.key == "ttft":
        text += f" ({res.median(server, 'ttft_prompt'):,.0f} prompt tok)"
    elif row.key == "busy" and res.median(server, "decode"):
        text += f" ({value / res.median(server, 'decode'):.0%} of quiet)"
    return text


def _ratio(ours: float | None, theirs: float | None, higher_is_better: bool) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "–"
    return f"{ours / theirs:.2f}x {'↑' if higher_is_better else '↓'}"


def render(res: Results, plan: Plan, header: list[str], bound: float | None) -> str:
    rows = [Row("decode", f"single-stream decode, tok/s ({plan.max_tokens} tokens)", True),
            Row("ttft", f"TTFT, ~{LONG_PROMPT_TOKENS:,}-token prompt, ms", False, 1e3, 0),
            *(Row(f"agg{n}", f"aggregate, {n} concurrent, tok/s", True) for n in plan.concurrency),
            Row("agent_wall", f"agentic, {plan.sessions} sessions x {plan.turns} turns, wall s", False, 1.0, 2),
            Row("agent_ttft", "agentic, median TTFT per turn, ms", False, 1e3, 0),
            Row("busy", "single-stream decode, one core busy, tok/s", True)]
    lines = header + ["", f"| | {OURS} | {THEIRS} | ratio ({OURS} / {THEIRS}) |", "|---|---|---|---|"]
    for row in rows:
        ours, theirs = res.median(OURS, row.key), res.median(THEIRS, row.key)
        lines.append(f"| {row.label} | {_cell(res, OURS, row)} | {_cell(res, THEIRS, row)} | "
                     f"{_ratio(ours, theirs, row.higher_is_better)} |")
    if bound:
        share = {s: (d / bound if (d := res.median(s, "decode")) else None) for s in (OURS, THEIRS)}
        cells = [f"{v:.0%}" if v is not None else "n/a" for v in share.values()]
        lines.append(f"| single-stream decode, % of the weight-bandwidth bound ({bound:,.0f} tok/s) | "
                     f"{cells[0]} | {cells[1]} | {_ratio(share[OURS], share[THEIRS], True)} |")
    others = [f"{res.others[s]:.2f}" if s in res.others else "n/a" for s in (OURS, THEIRS)]
    lines.append(f"| other processes' CPU, worst measurement, cores | {others[0]} | {others[1]} | |")
    lines += ["", f"Median over {plan.rounds} round(s). Ratio = {OURS} / {THEIRS}: ↑ higher is better, "
                  "↓ lower is better."]
    if res.failures:
        lines += ["", "Failed measurements (n/a or fewer rounds in the median):"]
        lines += [f"- {f}" for f in res.failures]
    return "\n".join(lines) + "\n"


def _glued_ours_args(argv: list[str]) -> list[str]:
    """`--ours-args "--no-compile"` as `--ours-args=--no-compile`: argparse takes a value that starts
    with a dash for an option of its own."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        out.append(f"{arg}={next(it, '')}" if arg == "--ours-args" else arg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 32 tokens, 4 and 16 streams, agentic 2 sessions x 2 turns")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--ours-args", default="", help="extra `layerserve serve` flags, one string")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out" / "speed.md")
    args = p.parse_args(_glued_ours_args(sys.argv[1:]))
    plan = make_plan(args.quick, args.rounds)
    model = default_model_path()
    out_dir = args.out.parent
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        _log(f"warning: load average {load_before:.1f} before the run; other processes will skew the figures")

    bandwidth = read_bandwidth()
    nbytes = gguf_weight_bytes(str(model))
    bound = bandwidth / nbytes
    _log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {nbytes / 1e6:.0f} MB of weights per token -> "
         f"bound {bound:.0f} tok/s")

    watch = CpuWatch()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(layerserve_server(model, shlex.split(args.ours_args),
                                                         out_dir / "speed_server.log"))]
        if not args.skip_llamacpp:
            servers.append(stack.enter_context(llama_cpp_server(model, out_dir / "speed_llama-server.log")))
        watch.pids += [s.proc.pid for s in servers]
        for srv in servers:
            _log(f"warming up {srv.name}")
            warm_up(srv, plan)
        reps = long_prompt_reps(servers[0].client, LONG_PROMPT_TOKENS)
        res = run_rounds(servers, Context(plan, reps), watch)

    flags = cpu_flags()
    ours_cmd = "`layerserve serve`" + (f" `{args.ours_args}`" if args.ours_args else " (default flags)")
    header = [
        f"Model `{model.name}`; {cpu_model_name()}, {os.cpu_count()} CPUs; flags: "
        f"{' '.join(flags) if flags else 'no AVX'}{'' if any('amx' in f for f in flags) else ' (no AMX)'}.",
        f"{OURS} {_git_revision()}, {ours_cmd}; {THEIRS} "
        f"{'skipped' if args.skip_llamacpp else f'`{shlex.join(LLAMA_SERVER_FLAGS)}`'} "
        f"(llama-cpp-python's vendored llama.cpp); Python {platform.python_version()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Both over localhost HTTP (OpenAI SDK), greedy, EOS ignored except in the agentic turns; "
        f"{plan.max_tokens} tokens per request. Read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 1 GiB, "
        f"best of 5); {nbytes / 1e6:.0f} MB of GGUF weights read per token -> bound {bound:,.0f} tok/s. "
        f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        f"wall time {time.perf_counter() - started:.0f} s.",
    ]
    table = render(res, plan, header, bound)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
