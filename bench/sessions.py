"""LayerScale's streaming workload on layerserve: query TTFT against context size, push latency.

Market ticks ("AAPL 187.44 +0.52% vol 1200", a seeded random walk) are pushed in batches at a steady
rate into one session until the session holds the next context size of `--sizes` (its `data_end`, in
tokens). At each size, once the session is KV-resident, `--questions` questions (different wording
each) are asked three ways, interleaved per question (the order rotates) so load drift hits all:

  (a) the session's `generate` (LayerScale client, streamed): the data is already in KV, only the
      question is new;
  (b) stateless chat on layerserve: the whole history as a system message (one entry a line, the
      session's own rendering) + the question, OpenAI SDK, streamed;
  (c) the same request on llama.cpp's llama-server (one slot, prompt cache on, as users run it).

TTFT = request sent to the first text chunk, max_tokens 8, temperature 0; the median per size.
Push acks: the client-side round trip of each push (10 entries by default) on loopback, during the
tick stream (the engine ingesting) and on an idle engine; time to KV-resident: after an idle push,
GET the session until pending == 0, data_version past the ack's and kv_tokens + 1 >= data_end (the
layerscale client's push(wait=True) predicate, polled every `--poll-ms`). Numbers are reported, never
asserted. A table goes to stdout, JSON (and a PNG plot when matplotlib is installed) to `--out`.

    .venv/bin/python bench/sessions.py                                # sizes 200 .. 6000, 3 questions each
    .venv/bin/python bench/sessions.py --sizes 200,600 --questions 2  # smoke run
    .venv/bin/python bench/sessions.py --skip-llamacpp --every 10 --rate 40 --out bench/out   # a question every 10 ticks
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

_BENCH = pathlib.Path(__file__).resolve().parent
ROOT = _BENCH.parent


def _bench_dir_off_path() -> None:
    """As bench/speed.py: import the siblings as `bench.*`, never bench/ itself first on sys.path."""
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _BENCH]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


_bench_dir_off_path()

from layerscale import LayerScale  # noqa: E402
from openai import OpenAI  # noqa: E402

from bench.common import cpu_model_name, stop_process  # noqa: E402
from bench.multiturn import chat_turn  # noqa: E402
from bench.peers import _free_port, llama_server  # noqa: E402
from layerserve.model_files import default_model_path  # noqa: E402

_bench_dir_off_path()  # bench.multiturn put it back

SYMBOLS = ["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "GOOG", "META", "AMD", "INTC", "NFLX", "ORCL", "IBM"]
QUESTIONS = ["What was the last price of AAPL?", "Which symbol moved the most?", "Is MSFT up or down?",
             "Summarize the latest NVDA tick.", "Which tick had the highest volume?",
             "Which symbols are down right now?", "What was TSLA's last change?", "Name one symbol that went up."]
MAX_TOKENS = 8
HEALTH_TIMEOUT_S = 300.0
RESIDENT_TIMEOUT_S = 300.0
TOKENS_PER_TICK = 23  # a first guess (SmolLM2's tokenizer), until the session's data_end says better


def _log(msg: str) -> None:
    print(f"[sessions {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- workload -------------------------------------------------------------------------------------

def tick_stream(seed: int) -> Iterator[str]:
    """Endless deterministic ticks: a random walk per symbol."""
    rng = random.Random(seed)
    price = {s: rng.uniform(20, 600) for s in SYMBOLS}
    start = dict(price)
    while True:
        sym = rng.choice(SYMBOLS)
        price[sym] *= 1 + rng.gauss(0, 0.002)
        change = (price[sym] / start[sym] - 1) * 100
        yield f"{sym} {price[sym]:.2f} {change:+.2f}% vol {rng.randrange(100, 50000, 100)}"


def stateless_messages(entries: list[str], question: str) -> list[dict]:
    """The session's data rendered as a stateless request: one system message, an entry a line."""
    return [{"role": "system", "content": "\n".join(entries) + "\n"}, {"role": "user", "content": question}]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- host and servers -----------------------------------------------------------------------------

def host_line() -> str:
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    avx = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16"))
    return f"{cpu_model_name()}, {os.cpu_count()} CPUs ({avx}), Python {sys.version.split()[0]}"


def _wait_healthy(proc: subprocess.Popen, url: str, log: pathlib.Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"layerserve exited with code {proc.returncode}; the end of {log}:\n{tail}")
        with contextlib.suppress(Exception), urllib.request.urlopen(url + "/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"layerserve not healthy after {HEALTH_TIMEOUT_S:.0f} s (log: {log})")


@contextlib.contextmanager
def layerserve(model: pathlib.Path, max_model_len: int, log: pathlib.Path) -> Iterator[str]:
    """`layerserve serve` (default dtype) on a free port with a temporary --session-dir; yields its root URL."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="layerserve-sessions-") as session_dir, open(log, "wb") as out:
        cmd = [sys.executable, "-m", "layerserve.cli", "serve", "--port", str(port), str(model),
               "--max-model-len", str(max_model_len), "--session-dir", session_dir]
        _log(f"starting layerserve: {shlex.join(cmd)} (log: {log})")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, url, log)
            yield url
        finally:
            stop_process(proc)


@contextlib.contextmanager
def llama_cpp(model: pathlib.Path, ctx: int, log: pathlib.Path) -> Iterator[str]:
    """llama-server with one slot of `ctx` tokens (prompt cache on, its default); yields its root URL."""
    _log(f"starting llama-server: 1 slot x {ctx} tokens, 2 threads (log: {log})")
    with llama_server(model, parallel=1, ctx_per_slot=ctx, threads=2, log=log) as server:
        yield server.url


# --- session side ---------------------------------------------------------------------------------

def is_resident(s, after_version: int) -> bool:
    """The layerscale client's push(wait=True) predicate."""
    return s.pending == 0 and s.data_version > after_version and s.kv_tokens + 1 >= s.data_end


def wait_resident(ls: LayerScale, sid: str, after_version: int, poll: float):
    """Poll GET session until what was pushed before an ack of `after_version` is KV-resident."""
    deadline = time.monotonic() + RESIDENT_TIMEOUT_S
    while True:
        s = ls.sessions.get(sid)
        if is_resident(s, after_version):
            return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"session {sid} not KV-resident after {RESIDENT_TIMEOUT_S:.0f} s: {s}")
        time.sleep(poll)


def timed_push(ls: LayerScale, sid: str, entries: list[str]):
    """(ack, round trip in seconds)."""
    t0 = time.perf_counter()
    ack = ls.sessions.push(sid, entries)
    return ack, time.perf_counter() - t0


@dataclass
class Stream:
    """The tick stream into one session: what was pushed, and every push's ack round trip."""

    ls: LayerScale
    sid: str
    ticks: Iterator[str]
    batch: int
    interval: float  # seconds between pushes
    poll: float  # seconds between GETs while waiting for KV residency
    entries: list[str] = field(default_factory=list)
    acks_s: list[float] = field(default_factory=list)
    last_version: int = -1
    dropped: int = 0  # entries the server dropped (pending overflow): the histories would differ

    def estimated_tokens(self) -> float:
        """data_end plus what is still pending, at the tokens per entry seen so far."""
        s = self.ls.sessions.get(self.sid)
        ingested = len(self.entries) - s.pending
        per_entry = s.data_end / ingested if ingested > 0 and s.data_end > 0 else TOKENS_PER_TICK
        return s.data_end + s.pending * per_entry

    def _push(self, n: int, at: float) -> float:
        """Push `n` ticks at time `at` (perf_counter); returns when the next push is due."""
        time.sleep(max(0.0, at - time.perf_counter()))
        batch = [next(self.ticks) for _ in range(n)]
        ack, rtt = timed_push(self.ls, self.sid, batch)
        self.entries += batch
        self.acks_s.append(rtt)
        self.last_version = ack.data_version
        self.dropped = ack.total_dropped
        return at + self.interval * n / self.batch

    def grow_to(self, tokens: int):
        """Push batches at the steady rate until the session will hold `tokens`; then wait until it
        is KV-resident and return the session."""
        next_at = time.perf_counter()
        while self.estimated_tokens() < tokens:
            next_at = self._push(self.batch, next_at)
        return self.settle()

    def feed(self, ticks: int):
        """Push `ticks` more ticks at the steady rate (batches of at most `batch`), then settle."""
        next_at = time.perf_counter()
        for start in range(0, ticks, self.batch):
            next_at = self._push(min(self.batch, ticks - start), next_at)
        return self.settle()

    def settle(self):
        """Wait until everything pushed is KV-resident; the session."""
        s = wait_resident(self.ls, self.sid, self.last_version, self.poll)
        if s.evicted or self.dropped:
            raise RuntimeError(f"the session dropped or evicted entries ({self.dropped} dropped): {s}")
        return s


def session_ttft(ls: LayerScale, sid: str, question: str) -> float:
    """(a): streamed session generate, request sent to the first text chunk (or the end if none)."""
    t0 = time.perf_counter()
    first = None
    for chunk in ls.sessions.generate_stream(sid, prompt=question, max_tokens=MAX_TOKENS, temperature=0):
        if first is None and getattr(chunk, "text", ""):
            first = time.perf_counter() - t0
    return first if first is not None else time.perf_counter() - t0


def idle_pushes(ls: LayerScale, ticks: Iterator[str], pushes: int, batch: int, poll: float) -> dict:
    """Push acks and time to KV-resident on an idle engine, on a session of its own (deleted after)."""
    sid = ls.sessions.create(window=None).id
    acks, resident = [], []
    try:
        for _ in range(pushes):
            t0 = time.perf_counter()
            ack, rtt = timed_push(ls, sid, [next(ticks) for _ in range(batch)])
            wait_resident(ls, sid, ack.data_version, poll)
            resident.append(time.perf_counter() - t0)
            acks.append(rtt)
            time.sleep(0.2)
        end = ls.sessions.get(sid).data_end
    finally:
        ls.sessions.delete(sid)
    return {"ack_ms": [a * 1000 for a in acks], "resident_ms": [r * 1000 for r in resident], "data_end": end}


# --- one context size -----------------------------------------------------------------------------

@dataclass
class Row:
    target: int
    context_tokens: int  # the session's data_end when asked
    session_ms: list[float] = field(default_factory=list)
    ours_ms: list[float] = field(default_factory=list)
    llama_ms: list[float] = field(default_factory=list)
    ours_prompt: list[tuple[int, int]] = field(default_factory=list)  # (cached, prompt) tokens from usage
    llama_prompt: list[tuple[int, int]] = field(default_factory=list)


def ask_round(row: Row, k: int, question: str, entries: list[str], ls: LayerScale, sid: str,
              ours: OpenAI, llama: OpenAI | None) -> None:
    """One question (a), (b), (c), the first of them rotating with `k`."""
    messages = stateless_messages(entries, question)

    def a() -> None:
        row.session_ms.append(session_ttft(ls, sid, question) * 1000)

    def b() -> None:
        ttft, _, usage = chat_turn(ours, messages, MAX_TOKENS)
        row.ours_ms.append(ttft * 1000)
        row.ours_prompt.append(usage)

    def c() -> None:
        ttft, _, usage = chat_turn(llama, messages, MAX_TOKENS)
        row.llama_ms.append(ttft * 1000)
        row.llama_prompt.append(usage)

    order: list[Callable[[], None]] = [a, b] + ([c] if llama is not None else [])
    for fn in order[k % len(order):] + order[:k % len(order)]:
        fn()


def warm_up(ls: LayerScale, ours: OpenAI, llama: OpenAI | None, ticks: Iterator[str], poll: float) -> None:
    """First-request costs out of the way: a scratch session's push + generate, a chat on each server."""
    sid = ls.sessions.create(window=None).id
    try:
        ack, _ = timed_push(ls, sid, [next(ticks) for _ in range(10)])
        wait_resident(ls, sid, ack.data_version, poll)
        session_ttft(ls, sid, "Warm-up: what is the last tick?")
    finally:
        ls.sessions.delete(sid)
    for client in (ours, llama):
        if client is not None:
            chat_turn(client, stateless_messages(["WARM 1.00 +0.00% vol 100"], "Warm-up?"), MAX_TOKENS)


# --- report ---------------------------------------------------------------------------------------

def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _usage(pairs: list[tuple[int, int]]) -> str:
    if not pairs:
        return "—"
    cached, prompt = pairs[-1]
    return f"{prompt:,} ({cached:,} cached)" if cached else f"{prompt:,} (cached n/a)"


def report(rows: list[Row], stream_acks: list[float], idle: dict, header: str) -> str:
    lines = [header, "",
             "| context tokens | session generate TTFT ms | stateless ours ms | stateless llama-server ms | speedup vs llama-server |",
             "|---|---|---|---|---|"]
    for r in rows:
        a, b, c = _med(r.session_ms), _med(r.ours_ms), _med(r.llama_ms)
        speed = f"{c / a:.1f}x" if a and c else "—"
        lines.append(f"| {r.context_tokens:,} | {_ms(a)} | {_ms(b)} | {_ms(c)} | {speed} |")
    if rows and rows[0].session_ms and rows[-1].session_ms:
        flat = _med(rows[-1].session_ms) / _med(rows[0].session_ms)
        lines += ["", f"session generate TTFT at {rows[-1].context_tokens:,} / at {rows[0].context_tokens:,} tokens: {flat:.2f}x"]
    lines += ["", "stateless prompts, last question at each size (prompt tokens, cached as the server reports):", "",
              "| context tokens | ours | llama-server |", "|---|---|---|"]
    lines += [f"| {r.context_tokens:,} | {_usage(r.ours_prompt)} | {_usage(r.llama_prompt)} |" for r in rows]
    stream_ms = [a * 1000 for a in stream_acks]
    lines += ["", "push acks, client-side round trip on loopback (ms):", "",
              "| | pushes | p50 | p95 |", "|---|---|---|---|",
              f"| during the tick stream (engine ingesting) | {len(stream_ms)} | {pct(stream_ms, .5):.2f} | {pct(stream_ms, .95):.2f} |",
              f"| idle engine | {len(idle['ack_ms'])} | {pct(idle['ack_ms'], .5):.2f} | {pct(idle['ack_ms'], .95):.2f} |",
              "", f"time to KV-resident after an idle push (push sent -> GET shows it resident), up to "
                  f"{idle['data_end']:,} tokens: p50 {pct(idle['resident_ms'], .5):.1f} ms, "
                  f"p95 {pct(idle['resident_ms'], .95):.1f} ms"]
    return "\n".join(lines)


def plot(rows: list[Row], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)", file=sys.stderr)
        return
    x = [r.context_tokens for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, attr in (("(a) session generate", "session_ms"), ("(b) stateless, layerserve", "ours_ms"),
                        ("(c) stateless, llama-server", "llama_ms")):
        y = [_med(getattr(r, attr)) for r in rows]
        if all(v is not None for v in y):
            ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel("context tokens (session data_end)")
    ax.set_ylabel("median TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title("Query TTFT vs context size, streaming ticks")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


# --- main -----------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="200,500,1000,2000,4000,6000", help="context sizes, tokens of session data")
    p.add_argument("--questions", type=int, default=3, help="questions per size (median TTFT)")
    p.add_argument("--rate", type=float, default=20.0, help="ticks per second pushed")
    p.add_argument("--batch", type=int, default=10, help="ticks per push")
    p.add_argument("--every", type=int, default=0,
                   help="ticks pushed (and made KV-resident) between two questions at a size; 0: none")
    p.add_argument("--poll-ms", type=float, default=10.0, help="GET interval while waiting for KV residency")
    p.add_argument("--idle-pushes", type=int, default=10, help="idle-engine pushes for ack / time-to-resident")
    p.add_argument("--max-model-len", type=int, default=8192, help="layerserve's, and llama-server's slot context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    return args


def run(args: argparse.Namespace, root_url: str, llama_url: str | None) -> tuple[list[Row], list[float], dict]:
    ls = LayerScale(base_url=root_url, max_retries=0, timeout=600)
    ours = OpenAI(base_url=root_url + "/v1", api_key="bench", max_retries=0, timeout=600)
    llama = OpenAI(base_url=llama_url + "/v1", api_key="bench", max_retries=0, timeout=600) if llama_url else None
    ticks = tick_stream(args.seed)
    poll = args.poll_ms / 1000
    _log("warm-up")
    warm_up(ls, ours, llama, ticks, poll)
    _log(f"idle engine: {args.idle_pushes} pushes of {args.batch} ticks")
    idle = idle_pushes(ls, ticks, args.idle_pushes, args.batch, poll)
    stream = Stream(ls, ls.sessions.create(window=None).id, ticks, args.batch, args.batch / args.rate, poll)
    rows, k = [], 0
    for size in args.sizes:
        s = stream.grow_to(size)
        _log(f"session at {s.data_end:,} tokens ({len(stream.entries)} ticks): {args.questions} questions")
        row = Row(size, s.data_end)  # with --every the context grows by its ticks per question
        for q in range(args.questions):
            if q and args.every:  # a question every N ticks: the stateless servers see N new ones
                stream.feed(args.every)
            ask_round(row, k, QUESTIONS[k % len(QUESTIONS)], stream.entries, ls, stream.sid, ours, llama)
            k += 1
        rows.append(row)
    return rows, stream.acks_s, idle


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = default_model_path()
    header = (f"### sessions.py, {datetime.date.today()}: {host_line()}; model `{model.name}`; "
              f"{args.rate:g} ticks/s in pushes of {args.batch}, {args.questions} questions per size, "
              f"max_tokens {MAX_TOKENS}, temperature 0")
    _log(header)
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(layerserve(model, args.max_model_len, args.out / "sessions_server.log"))
        llama = None if args.skip_llamacpp else stack.enter_context(
            llama_cpp(model, args.max_model_len, args.out / "sessions_llama-server.log"))
        rows, stream_acks, idle = run(args, root, llama)
    table = report(rows, stream_acks, idle, header)
    print(table)
    (args.out / "sessions.md").write_text(table + "\n")
    result = {"header": header, "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
              "rows": [asdict(r) for r in rows], "stream_push_ack_ms": [a * 1000 for a in stream_acks], "idle": idle}
    (args.out / "sessions.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"json: {args.out / 'sessions.json'}", file=sys.stderr)
    plot(rows, args.out / "sessions_ttft.png")


if __name__ == "__main__":
    main()
