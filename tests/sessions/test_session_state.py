"""What a session holds, checked against what it should hold: KV equal to a recomputation from
scratch, token ids equal to the rendering of its turns and pushes replayed, nothing leaked after
16 sessions of mixed traffic, nothing acked lost by a SIGKILL, idle sessions expiring.

Each test drives the real server with LayerScale's client; `--debug` exposes a session's held
token ids (GET /debug/sessions/{id}/tokens)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid

import httpx
import pytest
from layerscale import AsyncLayerScale, LayerScale, NotFoundError
from server_process import start_server, stop_server


def held(base_url: str, session_id: str) -> dict:
    response = httpx.get(f"{base_url}/debug/sessions/{session_id}/tokens", timeout=30)
    response.raise_for_status()
    return response.json()


def chat_prompt_ids(base_url: str, messages: list[dict]) -> list[int]:
    """The stateless rendering of a conversation (what a request without a session would run)."""
    response = httpx.post(f"{base_url}/tokenize", json={"messages": messages}, timeout=30)
    response.raise_for_status()
    return response.json()["tokens"]


def data_ids(tokenizer, entries: list[str]) -> list[int]:
    """A data section replayed from scratch: the system message's opening, each entry as plain text."""
    return tokenizer.encode_prompt("<|im_start|>system\n") + [t for e in entries for t in tokenizer.encode_plain(e + "\n")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A second server without a prefix cache: every prompt computed from scratch."""
    proc, srv = start_server(tmp_path_factory.mktemp("reference") / "server.log", "--no-prefix-cache",
                             "--session-dir", str(tmp_path_factory.mktemp("ref-sessions")))
    try:
        yield srv
    finally:
        stop_server(proc)


def greedy(base_url: str, prompt_ids: list[int], n: int) -> list[int]:
    body = {"model": "x", "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "logprobs": 1}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


def test_session_kv_matches_a_recomputation(ls: LayerScale, session_server, reference) -> None:
    """Questions over data that was appended, diverged from and slid out of a window answer as a
    from-scratch computation of the same tokens does (greedy, first tokens equal)."""
    sid = f"kv-{uuid.uuid4().hex[:8]}"
    ls.sessions.create(id=sid, window=160)
    try:
        for round_ in range(4):
            ls.sessions.push(sid, [f"tick {round_}.{i}: price {100 + 7 * i + round_} volume {i * 13}" for i in range(6)],
                             wait=True)
            for question in ("What was the last price?", "What was the first volume?"):
                answer = ls.sessions.generate(sid, prompt=question, max_tokens=6, temperature=0)
                state = held(session_server.base_url, sid)
                prompt = state["token_ids"][:answer.usage.prompt_tokens]
                assert prompt[:state["data_end"]] == state["durable"]
                expected = greedy(reference.base_url, prompt, 6)
                assert answer.text[:12] == expected["choices"][0]["text"][:12], (round_, question)
                assert answer.usage.prompt_tokens_details.cached_tokens >= state["data_end"] - 16
        assert ls.sessions.get(sid).evicted > 0  # the window slid
    finally:
        ls.sessions.delete(sid)


def test_turns_resume_held_kv_like_stateless_chat(ls: LayerScale, session_server, reference) -> None:
    sid = ls.sessions.create().id
    messages = [{"role": "user", "content": "Name a fruit."}]
    previous = 0
    try:
        for turn in range(3):
            got = ls.chat.create(messages=messages, session_id=sid, max_tokens=6, temperature=0, logprobs=True)
            want = httpx.post(f"{reference.v1}/chat/completions", timeout=120, json={
                "model": "x", "messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True}).json()
            got_lp = [c.logprob for c in got.choices[0].logprobs.content]
            want_lp = [c["logprob"] for c in want["choices"][0]["logprobs"]["content"]]
            assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
            assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) < 0.05
            assert got.usage.prompt_tokens_details.cached_tokens >= previous  # the last turn's prompt, at least
            previous = got.usage.prompt_tokens
            messages += [{"role": "assistant", "content": got.choices[0].message.content},
                         {"role": "user", "content": f"And another one? ({turn})"}]
    finally:
        ls.sessions.delete(sid)


async def _chat_session(client: AsyncLayerScale, sid: str, deadline: float, rng: random.Random) -> list[dict]:
    messages: list[dict] = []
    sent: list[dict] = []
    while time.monotonic() < deadline:
        if len(messages) > 10:  # a new conversation on the same session: it diverges at its first message
            messages = []
        messages.append({"role": "user", "content": f"Say something about the number {rng.randint(1, 99)}."})
        sent = [dict(m) for m in messages]
        reply = await client.chat.create(messages=sent, session_id=sid, max_tokens=rng.randint(2, 8),
                                         temperature=0.7, seed=rng.randint(0, 1 << 30))
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        if rng.random() < 0.2 and len(messages) > 2:  # an edited history: the session truncates and goes on
            messages[-2]["content"] += " Please."
            messages.pop()
    return sent


async def _data_session(client: AsyncLayerScale, sid: str, deadline: float, rng: random.Random) -> list[str]:
    pushed: list[str] = []
    while time.monotonic() < deadline:
        if rng.random() < 0.6:
            batch = [f"{sid} event {len(pushed) + i} value {rng.randint(0, 999)}" for i in range(rng.randint(1, 3))]
            ack = await client.sessions.push(sid, batch)
            assert ack.dropped == 0
            pushed += batch
        else:
            await client.sessions.generate(sid, prompt="What is the latest value?", max_tokens=rng.randint(1, 6))
    await client.sessions.push(sid, f"{sid} final", wait=True, wait_timeout=120)  # a loaded 2-core machine is slow
    return pushed + [f"{sid} final"]


def replayed(session_dir, sids: list[str]) -> dict:
    """The sessions as a restart would restore them: their journals, copied and replayed."""
    from layerserve.sessions.journal import Journal

    with tempfile.TemporaryDirectory() as copy:
        for sid in sids:
            shutil.copy(session_dir / f"{sid}.jsonl", copy)
        with Journal(pathlib.Path(copy)) as journal:
            return {rec.id: rec for rec in journal.restore()}


async def test_sixteen_sessions_of_mixed_traffic(session_server, session_dir, smollm_tokenizer) -> None:
    """16 sessions, interleaved turns, pushes and questions for a minute: no errors; each session's
    tokens are its turns and pushes replayed, and its journal replays to the same state; nothing
    leaked once they are deleted."""
    base = session_server.base_url
    rng = random.Random(1234)
    deadline = time.monotonic() + 60
    async with AsyncLayerScale(base, timeout=300, max_retries=0) as client:
        sids = [(await client.sessions.create(id=f"mix-{i}-{uuid.uuid4().hex[:6]}")).id for i in range(16)]
        work = [(_chat_session if i % 2 == 0 else _data_session)(client, sid, deadline, random.Random(rng.random()))
                for i, sid in enumerate(sids)]
        results = await asyncio.gather(*work)  # any error fails the test
        journals = replayed(session_dir, sids)
        for i, (sid, result) in enumerate(zip(sids, results)):
            state = held(base, sid)
            live = await client.sessions.get(sid)
            rec = journals[sid]
            assert (rec.durable, rec.pending, rec.evicted, rec.turns) == (
                state["entries"], state["pending"], live.evicted, live.turns), sid
            assert rec.conversation == state["conversation"] and rec.data_version == live.data_version, sid
            assert state["token_ids"][:state["data_end"]] == state["durable"], sid
            assert state["kv_tokens"] + 1 >= state["data_end"]
            if i % 2 == 0:  # a conversation: the last turn's messages rendered, then its reply
                prompt = chat_prompt_ids(base, result)
                assert state["durable"][:len(prompt)] == prompt, sid
                assert (await client.sessions.get(sid)).turns >= 1
            else:  # data: every pushed entry in order (less those the context window let go), as plain text
                evicted = (await client.sessions.get(sid)).evicted
                assert state["entries"] == result[evicted:]
                assert state["durable"] == data_ids(smollm_tokenizer, result[evicted:]), sid
        for sid in sids:
            await client.sessions.delete(sid)
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["kv_pages_free"] == health["kv_pages_total"]  # every session's blocks came back
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert "layerserve:kv_cache_blocks_held 0.0" in metrics


def test_sigkill_loses_nothing_acked(tmp_path) -> None:
    """Pushes acked and turns finished before a SIGKILL are all there after a restart."""
    directory = tmp_path / "sessions"
    proc, srv = start_server(tmp_path / "a.log", "--session-dir", str(directory), "--debug")
    acked: list[str] = []
    try:
        client = LayerScale(srv.base_url, timeout=60, max_retries=0)
        client.sessions.create(id="durable")
        client.sessions.create(id="chatty")
        messages = [{"role": "user", "content": "Hello there."}]
        reply = client.chat.create(messages=messages, session_id="chatty", max_tokens=5)
        before = held(srv.base_url, "chatty")
        stop_pushing = threading.Event()

        def pusher() -> None:
            i = 0
            while not stop_pushing.is_set():
                try:
                    client.sessions.push("durable", [f"entry {i}", f"entry {i + 1}"])
                except Exception:
                    return  # the server is gone
                acked.extend([f"entry {i}", f"entry {i + 1}"])
                i += 2

        thread = threading.Thread(target=pusher)
        thread.start()
        while len(acked) < 100:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop_pushing.set()
        thread.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, srv = start_server(tmp_path / "b.log", "--session-dir", str(directory), "--debug")
    try:
        client = LayerScale(srv.base_url, timeout=60, max_retries=0)
        state = held(srv.base_url, "durable")
        kept = state["entries"] + state["pending"]
        evicted = client.sessions.get("durable").evicted  # the context window let the oldest go, by design
        # every acked entry, in order (an unacked last one may be there too)
        assert len(acked) >= 100 and kept[:len(acked) - evicted] == acked[evicted:]
        chatty = held(srv.base_url, "chatty")
        assert chatty["turns"] == 1 and chatty["durable"] == before["durable"]
        client.sessions.push("durable", "after the restart", wait=True)
        answer = client.chat.create(messages=messages + [{"role": "assistant", "content": reply.choices[0].message.content},
                                                         {"role": "user", "content": "Again?"}],
                                    session_id="chatty", max_tokens=3)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert client.sessions.get("chatty").turns == 2
    finally:
        stop_server(proc)


def test_idle_sessions_expire_but_not_while_watched(tmp_path) -> None:
    proc, srv = start_server(tmp_path / "ttl.log", "--session-dir", str(tmp_path / "s"), "--session-ttl", "2")
    try:
        client = LayerScale(srv.base_url, timeout=60, max_retries=0)
        client.sessions.create(id="idle")
        client.sessions.create(id="watched")
        with client.sessions.events("watched") as stream:
            events = iter(stream)
            assert next(events).type == "connected"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the listing does not restart a session's clock
                if "idle" not in [s.id for s in client.sessions.list().data]:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("the idle session never expired")
            assert [s.id for s in client.sessions.list().data] == ["watched"]  # an open event stream keeps it
        with pytest.raises(NotFoundError):
            client.sessions.get("idle")
    finally:
        stop_server(proc)


def test_a_flooded_prefix_cache_never_takes_a_sessions_kv(tmp_path) -> None:
    """Unrelated traffic cycles a small KV pool through the prefix cache several times; the
    session's next turn still resumes everything the session held."""
    proc, srv = start_server(tmp_path / "flood.log", "--session-dir", str(tmp_path / "s"), "--debug",
                             "--kv-cache-memory", "24MiB", "--max-model-len", "256")
    try:
        client = LayerScale(srv.base_url, timeout=120, max_retries=0)
        sid = client.sessions.create().id
        messages = [{"role": "user", "content": "Write one sentence about the sea."}]
        first = client.chat.create(messages=messages, session_id=sid, max_tokens=8, temperature=0)
        before = held(srv.base_url, sid)
        kept = before["token_ids"][:before["kv_tokens"]]
        pool = httpx.get(f"{srv.base_url}/health", timeout=30).json()["kv_pages_total"] * 16
        flooded, i = 0, 0
        while flooded < 3 * pool:  # unique prompts of ~150 tokens until the pool has turned over 3 times
            text = " ".join(f"w{i}x{j}" for j in range(30))
            response = httpx.post(f"{srv.v1}/completions", timeout=120,
                                  json={"model": "x", "prompt": text, "max_tokens": 1})
            response.raise_for_status()
            flooded += response.json()["usage"]["prompt_tokens"]
            i += 1
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And one about the sky."}]
        prompt = chat_prompt_ids(srv.base_url, messages)
        common = next((i for i, (a, b) in enumerate(zip(kept, prompt)) if a != b), min(len(kept), len(prompt)))
        assert common > 40
        second = client.chat.create(messages=messages, session_id=sid, max_tokens=4, temperature=0)
        assert second.usage.prompt_tokens_details.cached_tokens == common  # all it held that the prompt shares
        assert second.usage.prompt_tokens_details.prefix_cached_tokens is None  # all of it was the session's
    finally:
        stop_server(proc)


def test_push_bounds(ls: LayerScale, session_server) -> None:
    """An entry that can never fit the window is a 400 naming `data`; past 4,096 pending entries the
    oldest pending ones are dropped (counted), the rest ingested; a window slides."""
    from layerscale import BadRequestError

    sid = ls.sessions.create(window=64).id
    try:
        with pytest.raises(BadRequestError) as refused:
            ls.sessions.push(sid, ["short", "x" * 200_000])
        assert "window" in refused.value.message
        ack = ls.sessions.push(sid, [f"e{i}" for i in range(4100)], wait=True, wait_timeout=120)
        assert (ack.pushed, ack.dropped, ack.total_dropped) == (4100, 4, 4)
        state = held(session_server.base_url, sid)
        session = ls.sessions.get(sid)
        assert session.evicted + len(state["entries"]) == 4096 and state["entries"][-1] == "e4099"
        assert len(state["durable"]) <= 64 + 16  # the window (and the data's opening)
    finally:
        ls.sessions.delete(sid)


def test_background_questions_leave_a_warm_turn_alone(ls: LayerScale) -> None:
    """On a pre_decode session with data and a flash query, the background work that follows a
    push (flash answers, the ready position) does not replace what a warm turn prefilled: warming
    the same conversation again is `covered`, and the turn resumes all of it."""
    sid = ls.sessions.create(pre_decode=True).id
    try:
        ls.sessions.flash(sid, "What was the last price?", max_tokens=4)
        ls.sessions.push(sid, [f"tick {i} price {100 + i}" for i in range(8)], wait=True)
        deadline = time.monotonic() + 60
        while not (ls.sessions.get(sid).ready and ls.sessions.list_flash(sid).data[0].fresh):
            assert time.monotonic() < deadline, "the flash answer and the ready position never came"
            time.sleep(0.05)
        messages = [{"role": "user", "content": "Summarise the ticks in one line."}]
        first = ls.sessions.warm(sid, messages=messages)
        assert first.finish_reason == "warmed"
        time.sleep(0.5)  # room for any background work to run (there must be none)
        again = ls.sessions.warm(sid, messages=messages)
        assert again.finish_reason == "covered" and again.cached_tokens == again.prompt_tokens
        turn = ls.chat.create(messages=messages, session_id=sid, max_tokens=4)
        assert turn.usage.prompt_tokens_details.cached_tokens == turn.usage.prompt_tokens - 1
    finally:
        ls.sessions.delete(sid)
