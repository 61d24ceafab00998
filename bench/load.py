"""Load test: many concurrent streaming clients against `layerserve serve`, checked for zero errors.

    .venv/bin/python bench/load.py                                  # 64 clients, 300 s, q4 server
    .venv/bin/python bench/load.py --duration 20 --clients 8        # smoke run
    .venv/bin/python bench/load.py --kv-cache-memory 256MiB -- --max-num-seqs 32   # after --: server args
    .venv/bin/python bench/load.py --url http://127.0.0.1:8080 --pid 1234          # a running server

Starts the server as a subprocess on a free port (or targets --url), warms it up, then runs --clients
streaming clients (the OpenAI SDK, `stream=True`, `include_usage`) for --duration seconds; each
sends requests back to back, drawn from a seeded generator: short questions, multi-turn chats and
long system prompts up to ~1,500 tokens, n in 1..3, stop strings, max_tokens 16..128, and a
--disconnect-fraction of streams closed on purpose after a random number of chunks. Requests in
flight when the time is up run to their end. Then it waits for the server to go idle and reads
the KV pool's usage from /metrics. Prints a markdown table (also written to --out/load.md).

Exit status 1 when any request failed (an exception, an HTTP error, an error event, or a stream
that ended without a finish_reason for every choice, the usage chunk and `[DONE]`) or when the
KV pool was not free once idle (running requests hold no blocks; cached ones count as free), or
when the server's RSS grew by more than its KV pool (`layerserve:kv_cache_memory_bytes`, allocated
untouched, so its pages count as blocks are first used) plus 256 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pathlib
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from openai import AsyncOpenAI, DefaultAsyncHttpxClient
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

try:
    import httpx2 as httpx  # the HTTP client of the OpenAI SDK since 3.x
except ImportError:  # older SDKs use httpx
    import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from multiturn import QUESTIONS, TOPICS, _free_port, pct, system_prompt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUEST_HEADER = "x-load-request-id"  # lets the transport tell which stream saw [DONE]
DONE_MARK = b"\ndata: [DONE]"  # JSON escapes newlines, so this never occurs inside an event's data

# /metrics names: the `layerserve:` ones first, then the older names they replace.
RUNNING = ("layerserve:num_requests_running", "layerserve_requests_running")
WAITING = ("layerserve:num_requests_waiting", "layerserve_requests_waiting")
KV_USAGE = ("layerserve:kv_cache_usage_perc", "layerserve_kv_cache_usage")
KV_CACHED = ("layerserve:kv_cache_blocks_cached", "layerserve_kv_blocks_cached")
KV_TOTAL = ("layerserve:kv_cache_blocks_total", "layerserve_kv_blocks_total")
KV_BYTES = ("layerserve:kv_cache_memory_bytes",)
RSS_SLACK_KIB = 256 << 10  # allowed RSS growth beyond the KV pool: allocator caches, compiled grammars
PREEMPTIONS = ("layerserve:num_preemptions_total", "layerserve_preemptions_total")
ABORTED = ("layerserve:aborted_requests_total",)
PREFIX_HITS = ("layerserve:prefix_cache_hits_total", "layerserve_prefix_cache_hits_total")
PREFIX_QUERIES = ("layerserve:prefix_cache_queries_total", "layerserve_prefix_cache_queries_total")

STOPS: list[list[str] | None] = [None, ["\n\n"], ["."], ["!", "?"], ["END", "###"]]
STOP_WEIGHTS = [5, 2, 1, 1, 1]
LONG_WORDS = (330, 1230)  # system_prompt() words: ~400 to ~1,500 tokens with SmolLM2's tokenizer
ANSWERS = ["That is a good question; here is a short answer.", "People have written about that for centuries.",
           "Here are two facts worth knowing, briefly.", "In short: it depends on where you look."]


# ---------------------------------------------------------------- what one request asks and gets

@dataclass(frozen=True, slots=True)
class RequestSpec:
    kind: Literal["short", "chat", "long"]
    messages: list[dict[str, str]]
    n: int
    max_tokens: int
    stop: list[str] | None
    temperature: float
    seed: int
    disconnect_after: int | None  # close the stream after this many chunks (None: read to the end)


@dataclass(slots=True)
class RequestResult:
    kind: str
    outcome: Literal["ok", "disconnect", "error"]
    submitted: float
    done: float
    ttft: float | None = None  # to the first chunk with content or a finish_reason
    itls: list[float] = field(default_factory=list)  # gaps between content chunks of the same choice
    prompt_tokens: int = 0
    completion_tokens: int = 0  # from the usage chunk (so 0 for disconnects and errors)
    error: str | None = None


def make_messages(rng: random.Random) -> tuple[Literal["short", "chat", "long"], list[dict[str, str]]]:
    """A short question, a 2-5 turn chat, or a long system prompt (~400 to ~1,500 tokens)."""
    kind = rng.choices(["short", "chat", "long"], weights=[4, 3, 3])[0]
    question = rng.choice(QUESTIONS).format(t=rng.choice(TOPICS))
    if kind == "short":
        return kind, [{"role": "user", "content": question}]
    if kind == "chat":
        messages = [{"role": "system", "content": "You are a friendly museum guide."}]
        for _ in range(rng.randint(2, 5)):
            messages.append({"role": "user", "content": rng.choice(QUESTIONS).format(t=rng.choice(TOPICS))})
            messages.append({"role": "assistant", "content": rng.choice(ANSWERS)})
        return kind, [*messages, {"role": "user", "content": question}]
    system = system_prompt(rng.randint(*LONG_WORDS))  # shorter ones are prefixes of longer: partial cache hits
    if rng.random() < 0.5:  # half start with a unique line, so the prefix cache cannot serve them
        system = f"Desk {rng.randrange(10**9)}. {system}"
    return kind, [{"role": "system", "content": system}, {"role": "user", "content": question}]


def make_spec(rng: random.Random, disconnect_fraction: float) -> RequestSpec:
    kind, messages = make_messages(rng)
    n = rng.choices([1, 2, 3], weights=[6, 2.5, 1.5])[0]
    return RequestSpec(
        kind=kind, messages=messages, n=n, max_tokens=rng.randint(16, 128),
        stop=rng.choices(STOPS, weights=STOP_WEIGHTS)[0],
        temperature=rng.choice([0.7, 1.0]) if n > 1 else rng.choice([0.0, 0.7]),
        seed=rng.randrange(2**31),
        disconnect_after=rng.randint(2, 24) if rng.random() < disconnect_fraction else None,
    )


# ---------------------------------------------------------------- [DONE] watch (the SDK swallows it)

class _WatchedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, on_done: Callable[[], None]) -> None:
        self._inner = inner
        self._on_done = on_done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tail, seen = b"\n", False
        async for chunk in self._inner:
            if not seen:
                window = tail + chunk
                if DONE_MARK in window:
                    seen = True
                    self._on_done()
                tail = window[-len(DONE_MARK):]
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class DoneWatch(httpx.AsyncBaseTransport):
    """Transport that records which requests (by REQUEST_HEADER) got a `data: [DONE]` event."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self._done: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        rid = request.headers.get(REQUEST_HEADER)
        if rid is not None:
            response.stream = _WatchedStream(response.stream, lambda: self._done.add(rid))
        return response

    def pop(self, rid: str) -> bool:
        """Whether `rid` saw [DONE] (and forget it)."""
        seen = rid in self._done
        self._done.discard(rid)
        return seen

    async def aclose(self) -> None:
        await self._inner.aclose()


# ---------------------------------------------------------------- one streamed request

@dataclass(slots=True)
class _StreamState:
    start: float
    first: float | None = None
    last_content: dict[int, float] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    itls: list[float] = field(default_factory=list)
    usage: CompletionUsage | None = None
    chunks: int = 0

    def feed(self, chunk: ChatCompletionChunk, now: float) -> None:
        self.chunks += 1
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            has_content = bool(choice.delta and choice.delta.content)
            if self.first is None and (has_content or choice.finish_reason is not None):
                self.first = now
            if has_content:
                prev = self.last_content.get(choice.index)
                if prev is not None:
                    self.itls.append(now - prev)
                self.last_content[choice.index] = now
            if choice.finish_reason is not None:
                self.finished.add(choice.index)


def incomplete_reason(state: _StreamState, n: int, saw_done: bool) -> str | None:
    """Why a stream that ended on its own is not a complete answer (None: it is)."""
    missing = sorted(set(range(n)) - state.finished)
    if missing:
        return f"stream ended without finish_reason for choice(s) {missing} after {state.chunks} chunks"
    if state.usage is None:
        return "stream ended without the usage chunk (stream_options.include_usage)"
    if not saw_done:
        return "stream ended without [DONE]"
    return None


async def run_request(client: AsyncOpenAI, watch: DoneWatch, spec: RequestSpec, rid: str) -> RequestResult:
    state = _StreamState(start=time.perf_counter())
    outcome: Literal["ok", "disconnect", "error"] = "ok"
    error = None
    try:
        stream = await client.chat.completions.create(
            model="any", messages=spec.messages, n=spec.n, max_tokens=spec.max_tokens, stop=spec.stop,
            temperature=spec.temperature, seed=spec.seed, stream=True, stream_options={"include_usage": True},
            extra_headers={REQUEST_HEADER: rid})
        try:
            async for chunk in stream:
                state.feed(chunk, time.perf_counter())
                if spec.disconnect_after is not None and state.chunks >= spec.disconnect_after:
                    outcome = "disconnect"
                    break
        finally:
            await stream.close()
        if outcome == "ok" and (error := incomplete_reason(state, spec.n, watch.pop(rid))):
            outcome = "error"
    except Exception as exc:  # noqa: BLE001  (every failure is a result to report, not a crash)
        outcome, error = "error", f"{type(exc).__name__}: {exc}"
    watch.pop(rid)
    usage = state.usage
    return RequestResult(
        kind=spec.kind, outcome=outcome, submitted=state.start, done=time.perf_counter(),
        ttft=None if state.first is None else state.first - state.start, itls=state.itls,
        prompt_tokens=usage.prompt_tokens if usage and outcome == "ok" else 0,
        completion_tokens=usage.completion_tokens if usage and outcome == "ok" else 0, error=error)


# ---------------------------------------------------------------- the load

@dataclass(frozen=True, slots=True)
class LoadConfig:
    clients: int
    duration: float
    seed: int
    disconnect_fraction: float
    request_timeout: float
    api_key: str


def make_client(base_url: str, cfg: LoadConfig) -> tuple[AsyncOpenAI, DoneWatch]:
    limits = httpx.Limits(max_connections=2 * cfg.clients + 8, max_keepalive_connections=cfg.clients + 8)
    watch = DoneWatch(httpx.AsyncHTTPTransport(limits=limits))
    http = DefaultAsyncHttpxClient(transport=watch, timeout=cfg.request_timeout)
    client = AsyncOpenAI(base_url=base_url, api_key=cfg.api_key, max_retries=0, timeout=cfg.request_timeout,
                         http_client=http)
    return client, watch


async def client_loop(cid: int, cfg: LoadConfig, client: AsyncOpenAI, watch: DoneWatch, deadline: float,
                      results: list[RequestResult]) -> None:
    rng = random.Random(f"{cfg.seed}:{cid}")  # per client, so a run's request sequence is reproducible
    k = 0
    while time.perf_counter() < deadline:
        result = await run_request(client, watch, make_spec(rng, cfg.disconnect_fraction), f"{cid}-{k}")
        results.append(result)
        k += 1
        if result.outcome == "error":
            await asyncio.sleep(1.0)  # a dead server must not turn the clients into a busy loop


async def progress(results: list[RequestResult], start: float, every: float = 10.0) -> None:
    while True:
        await asyncio.sleep(every)
        c = Counter(r.outcome for r in results)
        print(f"# {time.perf_counter() - start:5.0f} s: {c['ok']} done, {c['error']} errors, "
              f"{c['disconnect']} disconnects", file=sys.stderr, flush=True)


async def warm_up(client: AsyncOpenAI, watch: DoneWatch) -> None:
    """A short and a long request, so start-up costs stay out of the figures; both must succeed."""
    long = [{"role": "system", "content": system_prompt(LONG_WORDS[1])}, {"role": "user", "content": "Hi!"}]
    specs = [RequestSpec("short", [{"role": "user", "content": "Say hello."}], 2, 16, None, 0.7, 1, None),
             RequestSpec("long", long, 1, 16, None, 0.0, 1, None)]
    for i, spec in enumerate(specs):
        result = await run_request(client, watch, spec, f"warm-up-{i}")
        if result.outcome != "ok":
            raise RuntimeError(f"warm-up request failed: {result.error}")


async def load_phase(client: AsyncOpenAI, watch: DoneWatch, cfg: LoadConfig) -> tuple[list[RequestResult], float]:
    results: list[RequestResult] = []
    start = time.perf_counter()
    reporter = asyncio.create_task(progress(results, start))
    try:
        await asyncio.gather(*(client_loop(c, cfg, client, watch, start + cfg.duration, results)
                               for c in range(cfg.clients)))
    finally:
        reporter.cancel()
    return results, max((r.done for r in results), default=start) - start


# ---------------------------------------------------------------- the server: process, RSS, /metrics

@dataclass(frozen=True, slots=True)
class Server:
    root: str  # http://host:port
    pid: int | None
    log: pathlib.Path | None


@contextlib.contextmanager
def start_server(dtype: str, kv_cache_memory: str | None, extra: list[str], log: pathlib.Path) -> Iterator[Server]:
    port = _free_port()
    cmd = [sys.executable, "-m", "layerserve.cli", "serve", "--port", str(port), "--dtype", dtype,
           "--log-level", "warning"]
    if kv_cache_memory:
        cmd += ["--kv-cache-memory", kv_cache_memory]
    cmd += extra  # later flags win, so these may override the ones above
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", proc.pid, log)
    try:
        wait_ready(server, proc)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(server: Server, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = server.log.read_text()[-2000:] if server.log else ""
            raise RuntimeError(f"server exited with {proc.returncode} while starting:\n{tail}")
        with contextlib.suppress(Exception), urllib.request.urlopen(server.root + "/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s (log: {server.log})")


@dataclass(frozen=True, slots=True)
class Rss:
    current_kib: int  # VmRSS
    peak_kib: int  # VmHWM: the largest VmRSS since the process started


def read_rss(pid: int | None) -> Rss | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    return Rss(int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0]))


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def pick(values: dict[str, float], names: tuple[str, ...]) -> tuple[str, float] | None:
    return next(((n, values[n]) for n in names if n in values), None)


@dataclass(frozen=True, slots=True)
class KvCheck:
    ok: bool
    detail: str  # what to print in the table
    metric: str | None = None
    values: dict[str, float] = field(default_factory=dict)  # the idle server's /metrics samples


async def check_kv_idle(root: str, timeout: float) -> KvCheck:
    """Poll /metrics until nothing runs or waits, then the KV pool's usage must be 0."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            try:
                response = await http.get(root + "/metrics")
                response.raise_for_status()
                values = parse_metrics(response.text)
            except Exception as exc:  # noqa: BLE001
                return KvCheck(False, f"cannot read /metrics: {type(exc).__name__}: {exc}")
            running, waiting, usage = pick(values, RUNNING), pick(values, WAITING), pick(values, KV_USAGE)
            if running is None or waiting is None or usage is None:
                return KvCheck(False, f"/metrics lacks {RUNNING[0]}, {WAITING[0]} or {KV_USAGE[0]} (or their old names)")
            if running[1] == 0 and waiting[1] == 0:
                detail = f"{usage[1]:g} ({'free' if usage[1] == 0 else 'NOT free'}{cached_blocks(values)})"
                return KvCheck(usage[1] == 0, detail, usage[0], values)
            if time.monotonic() > deadline:
                return KvCheck(False, f"not idle after {timeout:.0f} s: {running[1]:g} running, {waiting[1]:g} waiting")
            await asyncio.sleep(0.5)


def cached_blocks(values: dict[str, float]) -> str:
    cached, total = pick(values, KV_CACHED), pick(values, KV_TOTAL)
    return f"; {cached[1]:,.0f} of {total[1]:,.0f} blocks cached" if cached and total else ""


def server_counters(values: dict[str, float]) -> str:
    """Preemptions, aborts and prefix-cache hits since the server started, where /metrics has them."""
    parts = []
    for label, names in (("preemptions", PREEMPTIONS), ("aborted requests", ABORTED)):
        if found := pick(values, names):
            parts.append(f"{found[1]:,.0f} {label}")
    hits, queries = pick(values, PREFIX_HITS), pick(values, PREFIX_QUERIES)
    if hits and queries and queries[1]:
        parts.append(f"prefix cache hits {hits[1] / queries[1]:.0%} of prompt tokens")
    return ", ".join(parts) or "n/a"


# ---------------------------------------------------------------- report

@dataclass(frozen=True, slots=True)
class LoadReport:
    cfg: LoadConfig
    label: str
    results: list[RequestResult]
    wall: float
    rss_start: Rss | None
    rss_end: Rss | None
    kv: KvCheck

    def of(self, outcome: str) -> list[RequestResult]:
        return [r for r in self.results if r.outcome == outcome]

    @property
    def kv_pool_kib(self) -> int | None:
        found = pick(self.kv.values, KV_BYTES)
        return int(found[1]) // 1024 if found else None

    @property
    def rss_ok(self) -> bool:
        """RSS may grow by the KV pool (its pages are touched as blocks are first used) and a little more."""
        if self.rss_start is None or self.rss_end is None or self.kv_pool_kib is None:
            return True  # not measurable here: reported as n/a
        return self.rss_end.current_kib - self.rss_start.current_kib <= self.kv_pool_kib + RSS_SLACK_KIB

    @property
    def failed(self) -> bool:
        return bool(self.of("error")) or not self.kv.ok or not self.rss_ok


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{pct(values, 0.5) * 1000:,.0f} / {pct(values, 0.95) * 1000:,.0f}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def _rss_row(rep: LoadReport) -> str:
    start, end = rep.rss_start, rep.rss_end
    if start is None or end is None:
        return "n/a (with --url, pass --pid; or the process is gone)"
    row = (f"{_mib(start.current_kib)} / {_mib(end.current_kib)} / {_mib(end.peak_kib)} "
           f"({(end.current_kib - start.current_kib) / 1024:+,.0f})")
    if rep.kv_pool_kib is not None:
        row += (f"; KV pool {_mib(rep.kv_pool_kib)} MiB: growth "
                f"{'within' if rep.rss_ok else 'BEYOND'} pool + {RSS_SLACK_KIB >> 10} MiB")
    return row


def format_report(rep: LoadReport) -> str:
    ok, errors, disconnects = rep.of("ok"), rep.of("error"), rep.of("disconnect")
    answered = ok + disconnects
    tokens = sum(r.completion_tokens for r in ok)
    prompts = [float(r.prompt_tokens) for r in ok]
    kinds = Counter(r.kind for r in rep.results)
    cfg = rep.cfg
    rows = [
        ("server", rep.label),
        ("clients x duration, s", f"{cfg.clients} x {cfg.duration:g} (load phase incl. drain: {rep.wall:.1f} s)"),
        ("seed", str(cfg.seed)),
        ("requests sent: short / chat / long", f"{kinds['short']} / {kinds['chat']} / {kinds['long']}"),
        ("requests done (complete streams)", str(len(ok))),
        ("errors", str(len(errors))),
        ("intended disconnects", f"{len(disconnects)} (fraction {cfg.disconnect_fraction:g})"),
        ("TTFT p50 / p95, ms", _ms([r.ttft for r in answered if r.ttft is not None])),
        ("ITL p50 / p95, ms", _ms([x for r in answered for x in r.itls])),
        ("output tokens/s (aggregate, complete streams)", f"{tokens / rep.wall:.1f} ({tokens:,} tokens)" if rep.wall else "n/a"),
        ("prompt tokens p50 / max", f"{pct(prompts, 0.5):.0f} / {max(prompts):.0f}" if prompts else "n/a"),
        ("server RSS start / end / peak, MiB (growth)", _rss_row(rep)),
        (f"KV pool when idle (`{rep.kv.metric or KV_USAGE[0]}`)", rep.kv.detail),
        ("server counters since start", server_counters(rep.kv.values)),
    ]
    lines = ["| load test | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if errors:
        lines += ["", f"### Errors ({len(errors)})", ""]
        lines += [f"- {count} x {msg}" for msg, count in Counter(r.error for r in errors).most_common()]
    lines += ["", "result: " + ("FAIL" if rep.failed else "PASS")]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the server's: everything after `--`."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients (default 64)")
    p.add_argument("--duration", type=float, default=300, help="seconds of new requests (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request generator (default 0)")
    p.add_argument("--disconnect-fraction", type=float, default=0.1, help="streams closed early on purpose (0.1)")
    p.add_argument("--dtype", default="q4", help="server --dtype when this script starts it (default q4)")
    p.add_argument("--kv-cache-memory", default=None, help="server --kv-cache-memory (default: the server's)")
    p.add_argument("--url", default=None, help="test a running server (http://host:port) instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for RSS")
    p.add_argument("--api-key", default="load", help="API key sent by the clients")
    p.add_argument("--request-timeout", type=float, default=600, help="per-request timeout, s (default 600)")
    p.add_argument("--idle-timeout", type=float, default=120, help="how long to wait for the server to go idle")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out", help="where load.md (and the log) go")
    args = p.parse_args(ours)
    if args.url and extra:
        p.error("server arguments after -- need a server started by this script (no --url)")
    return args, extra


async def measure(server: Server, cfg: LoadConfig, label: str, idle_timeout: float) -> LoadReport:
    base_url = server.root + "/v1"
    client, watch = make_client(base_url, cfg)
    async with client:
        await warm_up(client, watch)
        rss_start = read_rss(server.pid)
        print(f"# warmed up; {cfg.clients} clients for {cfg.duration:g} s", file=sys.stderr, flush=True)
        results, wall = await load_phase(client, watch, cfg)
    kv = await check_kv_idle(server.root, idle_timeout)
    return LoadReport(cfg, label, results, wall, rss_start, read_rss(server.pid), kv)


def run(args: argparse.Namespace, extra: list[str], cfg: LoadConfig) -> LoadReport:
    if args.url:
        server = Server(args.url.rstrip("/").removesuffix("/v1"), args.pid, None)
        return asyncio.run(measure(server, cfg, args.url, args.idle_timeout))
    label = " ".join(["--dtype", args.dtype, *(["--kv-cache-memory", args.kv_cache_memory]
                                               if args.kv_cache_memory else []), *extra])
    log = args.out / "load_server.log"
    print(f"# starting layerserve serve {label} (log: {log})", file=sys.stderr, flush=True)
    with start_server(args.dtype, args.kv_cache_memory, extra, log) as server:
        return asyncio.run(measure(server, cfg, f"layerserve serve {label}", args.idle_timeout))


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = LoadConfig(args.clients, args.duration, args.seed, args.disconnect_fraction, args.request_timeout,
                     args.api_key)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, extra, cfg)
    except RuntimeError as exc:  # the server did not start, or the warm-up failed: no load was run
        print(f"load test not run: {exc}", file=sys.stderr)
        return 2
    text = format_report(report)
    print(text)
    (args.out / "load.md").write_text(text + "\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
