"""The cluster end to end: `layerserve serve --replicas 2` on a loopback Ray cluster, driven by the
real SDKs through the one endpoint. Which replica answered is read off the --debug headers, and
the prefix cache's `cached_tokens` proves that a turn found its KV where it landed.

First, LayerScale's session surface: the single-server session tests, imported here and run
unchanged through the cluster (conftest.py gives them the cluster as `session_server` and a client
on it as `ls`). Left out: the --max-sessions test (the limit is per replica, so two hold twice as
many) and the --api-key server (it starts a single server of its own).

The replica-kill test runs last: it SIGKILLs one replica and waits for Ray to bring it back.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid

import anthropic
import httpx
import openai
import pytest
from layerscale import LayerScale, NotFoundError, WsConnected, WsPushAck
from cluster_helpers import wait_for_replicas
from server_process import Server
from session_helpers import Pump
from test_session_sockets import (sid, test_async_socket,  # noqa: F401
                                  test_invalid_frames_get_error_events_and_the_socket_stays_open,
                                  test_refused_upgrades_are_typed_errors,
                                  test_sync_socket_push_ack_before_data_updated_ping_errors_close)
from test_sessions_client import (test_async_client_lifecycle_push_generate_events,  # noqa: F401
                                  test_bad_ids_and_duplicates, test_bad_push_and_generate_bodies,
                                  test_chat_turns_resume_from_the_session,
                                  test_create_default_and_custom_ids_window_pre_decode,
                                  test_delete_then_get_and_delete_again_are_404,
                                  test_events_connected_data_updated_flash_ready_and_replay,
                                  test_fast_answer_is_speculative_or_a_normal_answer,
                                  test_flash_answer_after_push_and_flash_hit,
                                  test_flash_clamps_max_tokens_and_caps_at_20,
                                  test_list_is_sorted_by_creation_and_get_reports_last_used,
                                  test_push_then_generate_is_ephemeral_and_cached,
                                  test_second_request_while_a_turn_is_in_flight_is_409,
                                  test_unknown_session_is_404_on_every_route,
                                  test_warm_then_covered_then_turn_resumes)

REPLICA = "x-layerserve-replica"
PID = "x-layerserve-pid"
BLOCK = 16  # the engine's KV block: a cached prefix is a whole number of blocks
WAIT_S = 120.0


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def chat_raw(cluster: Server, messages: list[dict], **extra) -> tuple[dict, httpx.Headers]:
    r = httpx.post(f"{cluster.v1}/chat/completions", timeout=WAIT_S,
                   json={"messages": messages, "max_tokens": 12, "temperature": 0, **extra.pop("body", {})},
                   headers=extra.pop("headers", None))
    assert r.status_code == 200, r.text
    return r.json(), r.headers


def test_a_ten_turn_conversation_stays_on_one_replica(cluster: Server) -> None:
    client = openai.OpenAI(base_url=cluster.v1, api_key="unused", max_retries=0, timeout=WAIT_S)
    messages = [{"role": "system", "content": f"You are a terse assistant for conversation {uid('c')}."}]
    replicas, prev_prompt = set(), 0
    for turn in range(10):
        messages.append({"role": "user", "content": f"Question {turn}: name a colour."})
        raw = client.chat.completions.with_raw_response.create(
            model="default", messages=messages, max_tokens=6, temperature=0)
        reply = raw.parse()
        replicas.add(raw.headers[REPLICA])
        cached = reply.usage.prompt_tokens_details.cached_tokens
        if turn:  # the whole earlier prompt (to its last full block) came from this replica's cache
            assert cached >= prev_prompt // BLOCK * BLOCK, (turn, cached, prev_prompt)
        prev_prompt = reply.usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert len(replicas) == 1, replicas


def test_unrelated_prefixes_spread_and_each_comes_back(cluster: Server) -> None:
    topics = ["volcanoes", "sailing ships", "jazz piano", "sourdough bread", "chess openings", "honey bees",
              "glaciers", "typewriters"]
    prompts = [[{"role": "system", "content": f"{uid('p')} You are an expert on {t}. " * 3},
                {"role": "user", "content": f"Tell me one fact about {t}."}] for t in topics]
    placed = [chat_raw(cluster, p, body={"max_tokens": 2})[1][REPLICA] for p in prompts]
    counts = {r: placed.count(r) for r in set(placed)}
    assert len(counts) == 2 and min(counts.values()) >= 3, counts
    for prompt, first in zip(prompts, placed):
        longer = [*prompt, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Another one?"}]
        body, headers = chat_raw(cluster, longer, body={"max_tokens": 2})
        assert headers[REPLICA] == first
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_session_lands_on_its_replica_on_every_route(cluster: Server, ls: LayerScale) -> None:
    sid = ls.sessions.create(id=uid("s")).id
    try:
        seen = set()
        url = f"{cluster.v1}/sessions/{sid}"
        r = httpx.post(f"{url}/push", json={"data": ["AAPL 187.44 +0.5%", "MSFT 420.21 -0.1%"]}, timeout=WAIT_S)
        assert r.status_code == 200, r.text
        seen.add(r.headers[REPLICA])
        r = httpx.post(f"{url}/flash", json={"query": "Which stock rose?", "max_tokens": 3}, timeout=WAIT_S)
        assert r.status_code == 200, r.text
        seen.add(r.headers[REPLICA])
        messages = [{"role": "user", "content": "Which stock rose?"}]
        first, h1 = chat_raw(cluster, messages, headers={"x-layerscale-session-id": sid})
        seen.add(h1[REPLICA])
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And which fell?"}]
        second, h2 = chat_raw(cluster, messages, headers={"x-layerscale-session-id": sid})
        seen.add(h2[REPLICA])
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
        with httpx.stream("POST", f"{url}/generate", json={"prompt": "Summarise.", "max_tokens": 4, "stream": True},
                          timeout=WAIT_S) as stream:
            assert stream.status_code == 200
            seen.add(stream.headers[REPLICA])
            assert any(line == "data: [DONE]" for line in stream.iter_lines())
        seen.add(httpx.get(url, timeout=WAIT_S).headers[REPLICA])
        assert len(seen) == 1, seen
        # the socket goes through the ingress to the same replica
        ws = ls.sessions.ws(sid)
        pump = Pump(ws)
        try:
            connected = pump.next()
            assert isinstance(connected, WsConnected) and connected.data.session_id == sid
            ws.push(["GOOG 171.90 +0.3%"])
            ack = pump.until(lambda e: isinstance(e, WsPushAck))
            assert ack.data.pushed == 1 and ack.data.total_pushed == 3
        finally:
            ws.close()
        assert pump.wait_end()
        assert ls.sessions.get(sid).turns == 2
    finally:
        ls.sessions.delete(sid)
    with pytest.raises(NotFoundError):
        ls.sessions.get(sid)


def test_sessions_are_placed_on_both_and_listed_from_both(cluster: Server, ls: LayerScale) -> None:
    ids = [ls.sessions.create(id=uid("l")).id for _ in range(4)]
    try:
        where = {sid: httpx.get(f"{cluster.v1}/sessions/{sid}", timeout=WAIT_S).headers[REPLICA] for sid in ids}
        assert len(set(where.values())) == 2, where
        listed = httpx.get(f"{cluster.v1}/sessions", timeout=WAIT_S)
        assert listed.headers["x-layerserve-replicas-answered"] == "2"
        assert set(ids) <= {s["id"] for s in listed.json()["data"]}
        assert set(ids) <= {s.id for s in ls.sessions.list().data}
        metrics = httpx.get(f"{cluster.base_url}/metrics", timeout=WAIT_S).text
        for replica in set(where.values()):
            label = f'replica="{replica.rsplit("#", 1)[-1]}"'
            assert f"layerserve:sessions{{{label}}}" in metrics
            assert f'layerserve:routed_requests_total{{{label},route="place"}}' in metrics
    finally:
        for sid in ids:
            ls.sessions.delete(sid)


def test_the_apis_and_their_errors_through_the_ingress(cluster: Server) -> None:
    claude = anthropic.Anthropic(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=WAIT_S)
    reply = claude.messages.create(model="default", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert reply.content and reply.usage.output_tokens > 0
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model="default", max_tokens=-1, messages=[{"role": "user", "content": "Hi"}])
    assert bad.value.body["type"] == "error"
    big = httpx.post(f"{cluster.v1}/chat/completions", content=b"x" * (2 << 20), timeout=WAIT_S)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    client = openai.OpenAI(base_url=cluster.v1, api_key="unused", max_retries=0, timeout=WAIT_S)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                       extra_headers={"x-layerscale-session-id": "no-such-session"})
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True)
        if c.choices)
    assert text


def _stream(cluster: Server, sid: str, out: dict, started: threading.Event) -> None:
    client = openai.OpenAI(base_url=cluster.v1, api_key="unused", max_retries=0, timeout=WAIT_S)
    pieces = []
    try:
        for chunk in client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                max_tokens=800, temperature=0, stream=True, extra_headers={"x-layerscale-session-id": sid}):
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                if len(pieces) == 3:
                    started.set()
                if choice.finish_reason:
                    out["finish"] = choice.finish_reason
    except openai.APIError as exc:
        out["error"] = exc
    out["text"] = "".join(pieces)


def test_a_killed_replica_fails_only_its_streams_and_its_sessions_come_back(cluster: Server, ls: LayerScale) -> None:
    a, b = ls.sessions.create(id=uid("k")).id, ls.sessions.create(id=uid("k")).id
    first = {sid: httpx.get(f"{cluster.v1}/sessions/{sid}", timeout=WAIT_S).headers for sid in (a, b)}
    assert first[a][REPLICA] != first[b][REPLICA], "two new sessions go to the two replicas"
    # history on the victim's session: data and a finished turn
    ls.sessions.push(a, ["tick 1 price 100", "tick 2 price 101"])
    turn = [{"role": "user", "content": "What was the last price?"}]
    chat_raw(cluster, turn, headers={"x-layerscale-session-id": a})
    before = ls.sessions.get(a)
    assert before.turns == 1 and before.data_version >= 1
    victim = int(httpx.get(f"{cluster.v1}/sessions/{a}", timeout=WAIT_S).headers[PID])
    outs: dict[str, dict] = {a: {}, b: {}}
    started = {a: threading.Event(), b: threading.Event()}
    threads = [threading.Thread(target=_stream, args=(cluster, sid, outs[sid], started[sid])) for sid in (a, b)]
    for t in threads:
        t.start()
    for sid in (a, b):  # both streams are under way (800 tokens each: seconds more to go)
        assert started[sid].wait(WAIT_S), outs[sid]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(WAIT_S)
    assert isinstance(outs[a].get("error"), openai.APIError), outs[a]
    assert "replica" in str(outs[a]["error"]), outs[a]
    assert outs[b].get("finish") in ("length", "stop") and "error" not in outs[b], outs[b]
    # the victim's session answers again, from its journal, on whichever replica takes it
    after = ls.sessions.get(a)
    assert (after.turns, after.data_end, after.data_version) == (before.turns, before.data_end, before.data_version)
    again = [*turn, {"role": "assistant", "content": "101."}, {"role": "user", "content": "And before that?"}]
    body, headers = chat_raw(cluster, again, headers={"x-layerscale-session-id": a})
    assert int(headers[PID]) != victim and body["choices"][0]["message"]["content"] is not None
    assert ls.sessions.get(a).turns == 2
    assert ls.sessions.get(b).turns == 1  # the other replica's session kept its turn (the stream finished)
    wait_for_replicas(cluster, 2)  # Ray brings the dead replica back
    for sid in (a, b):
        ls.sessions.delete(sid)
