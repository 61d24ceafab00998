"""layerserve.cluster.route, .affinity and .merge: what the ingress reads off a request, the
router's memory of sessions and prefixes, and the merged /metrics and session list. Pure Python."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from layerserve.cluster.affinity import CHUNK_CHARS, PrefixIndex, SessionMap, chunk_keys
from layerserve.cluster.merge import merge_metrics, merge_sessions
from layerserve.cluster.route import MAX_PREFIX_CHARS, SESSION_HEADER, Route, prompt_text, route_for

GENERATED_ID = re.compile(r"sess_[0-9a-f]{24}")


# ---- route_for -------------------------------------------------------------------------------


def test_session_header_wins_over_path_and_body():
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    route, out = route_for("POST", "/v1/chat/completions", {SESSION_HEADER: "sess_h"}, body)
    assert route == Route("session", session_id="sess_h")
    assert out == body
    route, _ = route_for("POST", "/v1/sessions/sess_path/push", {SESSION_HEADER: "sess_h"}, b"{}")
    assert route == Route("session", session_id="sess_h")


def test_session_paths_route_to_their_session():
    for method, path in [("POST", "/v1/sessions/abc/push"), ("GET", "/v1/sessions/abc"),
                         ("DELETE", "/v1/sessions/abc"), ("POST", "/v1/sessions/abc/flash/3")]:
        route, body = route_for(method, path, {}, b"x")
        assert route == Route("session", session_id="abc"), path
        assert body == b"x"


def test_session_create_without_id_gets_one_in_its_body():
    for doc in ({}, {"id": None, "window": 8}):
        route, body = route_for("POST", "/v1/sessions", {}, json.dumps(doc).encode())
        assert route.kind == "place"
        assert GENERATED_ID.fullmatch(route.session_id), route.session_id
        sent = json.loads(body)  # still valid JSON
        assert sent["id"] == route.session_id
        assert {k: v for k, v in sent.items() if k != "id"} == {k: v for k, v in doc.items() if k != "id"}
    first, _ = route_for("POST", "/v1/sessions", {}, b"{}")
    second, _ = route_for("POST", "/v1/sessions", {}, b"{}")
    assert first.session_id != second.session_id


def test_session_create_with_an_id_keeps_it():
    body = json.dumps({"id": "mine", "window": 4}).encode()
    route, out = route_for("POST", "/v1/sessions", {}, body)
    assert route == Route("place", session_id="mine")
    assert out == body


def test_session_create_with_a_bad_body_routes_anywhere_unchanged():
    for body in (b"{not json", b"[1, 2]", json.dumps({"id": 7}).encode()):
        route, out = route_for("POST", "/v1/sessions", {}, body)
        assert route == Route("any"), body
        assert out == body


def test_list_sessions_and_models_route_anywhere():
    assert route_for("GET", "/v1/sessions", {}, b"")[0] == Route("any")
    assert route_for("GET", "/v1/models", {}, b"")[0] == Route("any")


def test_completions_route_by_prefix():
    doc = {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    body = json.dumps(doc).encode()
    for path in ("/v1/chat/completions", "/v1/messages"):
        route, out = route_for("POST", path, {}, body)
        assert route == Route("prefix", prefix=prompt_text(doc))
        assert route.prefix == "system:be brief\nuser:hi"
        assert out == body
    # a GET to the same path is not a prompt
    assert route_for("GET", "/v1/chat/completions", {}, body)[0] == Route("any")


# ---- prompt_text -------------------------------------------------------------------------------


def test_prompt_text_openai_messages_string_and_parts():
    doc = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "text", "text": "here"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]}
    text = prompt_text(doc)
    lines = text.split("\n")
    assert lines[0] == "system:sys"
    assert lines[1] == "user:look here"
    assert lines[2].startswith("assistant:") and '"name": "f"' in lines[2]


def test_prompt_text_anthropic_system_and_blocks():
    doc = {"system": [{"type": "text", "text": "You are terse."}],
           "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                        {"role": "assistant", "content": "Hi."}]}
    assert prompt_text(doc) == "system:You are terse.\nuser:Hello\nassistant:Hi."


def test_prompt_text_legacy_prompt_and_tools_first():
    assert prompt_text({"prompt": "Once upon"}) == "Once upon"
    assert prompt_text({"prompt": ["a", "b"]}) == "ab"
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    text = prompt_text({"tools": tools, "messages": [{"role": "user", "content": "rain?"}]})
    first, rest = text.split("\n", 1)
    assert json.loads(first) == tools
    assert rest == "user:rain?"


def test_prompt_text_of_non_objects_is_empty():
    assert prompt_text(None) == ""
    assert prompt_text([1, 2]) == ""
    assert prompt_text({}) == ""


def test_extending_a_conversation_extends_its_text():
    turn1 = {"system": "s", "messages": [{"role": "user", "content": "question one"}]}
    turn2 = {"system": "s", "messages": [*turn1["messages"], {"role": "assistant", "content": "answer one"},
                                         {"role": "user", "content": [{"type": "text", "text": "two"}]}]}
    a, b = prompt_text(turn1), prompt_text(turn2)
    assert len(b) > len(a) and b.startswith(a)
    other = {"system": "s", "messages": [{"role": "user", "content": "question two"}]}
    assert not prompt_text(other).startswith(a)


def test_prompt_text_is_capped():
    doc = {"messages": [{"role": "user", "content": "x" * (MAX_PREFIX_CHARS + 500)}]}
    text = prompt_text(doc)
    assert len(text) == MAX_PREFIX_CHARS
    assert text == ("user:" + "x" * MAX_PREFIX_CHARS)[:MAX_PREFIX_CHARS]


# ---- chunk_keys --------------------------------------------------------------------------------


def test_chunk_keys_are_chained():
    base = "".join(chr(ord("a") + i % 26) for i in range(4 * CHUNK_CHARS))
    keys = chunk_keys(base)
    assert len(keys) == 4 and len(set(keys)) == 4
    # the same prefix gives the same leading keys
    longer = chunk_keys(base + "y" * (2 * CHUNK_CHARS))
    assert longer[:4] == keys and len(longer) == 6
    # a change in the last chunk changes only the last key
    tail = chunk_keys(base[:-1] + "!")
    assert tail[:3] == keys[:3] and tail[3] != keys[3]
    # a change in chunk 0 changes every key (each stands for its whole prefix)
    changed = chunk_keys("!" + base[1:])
    assert all(c != k for c, k in zip(changed, keys, strict=True))
    # identical chunks at different depths get different keys
    same = chunk_keys("z" * (3 * CHUNK_CHARS))
    assert len(set(same)) == 3


def test_partial_last_chunk_is_not_keyed():
    assert chunk_keys("a" * (CHUNK_CHARS - 1)) == []
    assert len(chunk_keys("a" * CHUNK_CHARS)) == 1
    assert chunk_keys("a" * (2 * CHUNK_CHARS - 1)) == chunk_keys("a" * CHUNK_CHARS)
    assert chunk_keys("abcdef", chunk=2) == chunk_keys("abcdefg", chunk=2)
    assert len(chunk_keys("abcdefg", chunk=2)) == 3


# ---- PrefixIndex -------------------------------------------------------------------------------


def keys_of(text: str) -> list[bytes]:
    return chunk_keys(text, chunk=1)


def test_prefix_match_is_the_longest_leading_run_among_given_replicas():
    index = PrefixIndex()
    index.insert(keys_of("abcd"), "A")
    index.insert(keys_of("abxy"), "B")
    index.insert(keys_of("ab"), "C")
    assert index.match(keys_of("abcdef"), ["A", "B", "C"]) == (4, {"A"})
    assert index.match(keys_of("abq"), ["A", "B", "C"]) == (2, {"A", "B", "C"})
    assert index.match(keys_of("abxz"), ["A", "B", "C"]) == (3, {"B"})
    # only the replicas asked about count
    assert index.match(keys_of("abcdef"), ["B", "C"]) == (2, {"B", "C"})
    assert index.match(keys_of("abcdef"), ["Z"]) == (0, set())
    assert index.match(keys_of("zzz"), ["A", "B", "C"]) == (0, set())
    assert index.match([], ["A"]) == (0, set())


def test_prefix_sizes_count_keys_per_replica():
    index = PrefixIndex()
    index.insert(keys_of("abcd"), "A")
    index.insert(keys_of("abcd"), "A")  # again: no double count
    index.insert(keys_of("ab"), "B")
    assert index.size("A") == 4 and index.size("B") == 2 and index.size("nobody") == 0


def test_prefix_index_evicts_least_recently_used_keys():
    index = PrefixIndex(max_keys=4)
    old, new = keys_of("ab"), keys_of("xyz")
    index.insert(old, "A")
    index.insert(keys_of("p"), "B")
    index.insert(old, "A")  # touch: "ab" is now newer than "p"
    index.insert(new, "B")  # 6 keys > 4: the two oldest go: "p", then "a"
    assert index.size("B") == 3
    assert index.size("A") == 1
    assert index.match(keys_of("p"), ["B"]) == (0, set())
    assert index.match(old, ["A"]) == (0, set())  # "a" is gone, so no leading run
    assert index.match(new, ["B"]) == (3, {"B"})
    assert len(index._keys) == 4


def test_prefix_index_forgets_a_removed_replica():
    index = PrefixIndex()
    index.insert(keys_of("abc"), "A")
    index.insert(keys_of("ab"), "B")
    index.remove("A")
    assert index.size("A") == 0
    assert index.match(keys_of("abc"), ["A", "B"]) == (2, {"B"})
    assert len(index._keys) == 2  # "abc"'s last key, held by A alone, is gone
    index.remove("B")
    assert len(index._keys) == 0
    index.remove("never-seen")  # fine


# ---- SessionMap --------------------------------------------------------------------------------


def test_session_map_set_get_counts():
    m = SessionMap()
    assert m.get("s1") is None
    m.set("s1", "A")
    m.set("s2", "A")
    m.set("s3", "B")
    assert m.get("s1") == "A" and m.get("s3") == "B"
    assert m.counts() == {"A": 2, "B": 1}
    m.set("s1", "B")  # moved
    assert m.get("s1") == "B"
    assert m.counts() == {"A": 1, "B": 2}
    m.set("s1", "B")  # again: no double count
    assert m.counts() == {"A": 1, "B": 2}


def test_session_map_drops_least_recently_used():
    m = SessionMap(max_sessions=2)
    m.set("s1", "A")
    m.set("s2", "B")
    assert m.get("s1") == "A"  # touch s1: s2 is now the oldest
    m.set("s3", "A")
    assert m.get("s2") is None
    assert m.get("s1") == "A" and m.get("s3") == "A"
    assert m.counts() == {"A": 2, "B": 0}


# ---- merge -------------------------------------------------------------------------------------

def page(n: int, q: int) -> str:
    """One replica's /metrics as prometheus_client writes it: a labelled counter (its _total and
    _created samples, each under its own HELP/TYPE) and an unlabelled gauge."""
    registry = CollectorRegistry()
    requests = Counter("layerserve_requests", "Requests served.", ["route", "code"], registry=registry)
    requests.labels("chat", "200").inc(n)
    Gauge("layerserve_queue_depth", "Requests waiting.", registry=registry).set(q)
    return generate_latest(registry).decode()


def test_merge_metrics_labels_every_sample_with_its_replica():
    pages = {"app#engine#r2": page(5, 0), "app#engine#r1": page(3, 1)}
    merged = merge_metrics(pages)
    lines = merged.splitlines()
    headers = [line for line in lines if line.startswith("#")]
    assert len(headers) == 6 and len(set(headers)) == 6  # three families, HELP and TYPE once each
    assert "# TYPE layerserve_requests_total counter" in headers
    assert "# TYPE layerserve_queue_depth gauge" in headers
    samples = [line for line in lines if not line.startswith("#")]
    assert len(samples) == 6
    assert all(line.split("{", 1)[1].startswith('replica="r') for line in samples)
    assert 'layerserve_requests_total{replica="r1",code="200",route="chat"} 3.0' in samples
    assert 'layerserve_requests_total{replica="r2",code="200",route="chat"} 5.0' in samples
    assert any(line.startswith('layerserve_requests_created{replica="r2",code="200",route="chat"} ')
               for line in samples)
    assert 'layerserve_queue_depth{replica="r1"} 1.0' in samples
    assert 'layerserve_queue_depth{replica="r2"} 0.0' in samples
    # each family's samples follow its own header, replicas in name order
    assert lines.index("# TYPE layerserve_queue_depth gauge") < lines.index('layerserve_queue_depth{replica="r1"} 1.0') \
        < lines.index('layerserve_queue_depth{replica="r2"} 0.0')

    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert set(families) == {"layerserve_requests", "layerserve_requests_created", "layerserve_queue_depth"}
    assert families["layerserve_requests"].type == "counter"
    total = {s.labels["replica"]: (s.value, s.labels) for s in families["layerserve_requests"].samples}
    assert total == {"r1": (3.0, {"replica": "r1", "route": "chat", "code": "200"}),
                     "r2": (5.0, {"replica": "r2", "route": "chat", "code": "200"})}
    assert {s.labels["replica"] for s in families["layerserve_requests_created"].samples} == {"r1", "r2"}
    depth = {s.labels["replica"]: s.value for s in families["layerserve_queue_depth"].samples}
    assert depth == {"r1": 1.0, "r2": 0.0}


def test_merge_metrics_keeps_created_under_its_counter_when_headed_so():
    # a page whose _created sample sits under the counter's own header (no header of its own)
    text = ('# HELP c_total C.\n# TYPE c_total counter\nc_total{a="1"} 2.0\nc_created{a="1"} 1.0e+09\n')
    merged = merge_metrics({"x#u1": text, "x#u2": text})
    assert merged.splitlines() == [
        "# HELP c_total C.", "# TYPE c_total counter",
        'c_total{replica="u1",a="1"} 2.0', 'c_created{replica="u1",a="1"} 1.0e+09',
        'c_total{replica="u2",a="1"} 2.0', 'c_created{replica="u2",a="1"} 1.0e+09',
    ]


def test_merge_metrics_keeps_a_family_only_one_replica_has_and_appends_extra():
    one = "# HELP a_x X.\n# TYPE a_x gauge\na_x 1.0\n"
    two = "# HELP b_y Y.\n# TYPE b_y gauge\nb_y{k=\"v\"} 2.0\n"
    merged = merge_metrics({"d#u1": one, "d#u2": two}, extra="# HELP ingress_up Up.\n# TYPE ingress_up gauge\ningress_up 1.0\n")
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert [(s.labels, s.value) for s in families["a_x"].samples] == [({"replica": "u1"}, 1.0)]
    assert [(s.labels, s.value) for s in families["b_y"].samples] == [({"replica": "u2", "k": "v"}, 2.0)]
    assert [(s.labels, s.value) for s in families["ingress_up"].samples] == [({}, 1.0)]


def test_merge_sessions_dedupes_and_sorts():
    a = {"object": "list", "data": [{"id": "s2", "created": 20, "from": "a"}, {"id": "s1", "created": 10}]}
    b = {"object": "list", "data": [{"id": "s2", "created": 20, "from": "b"}, {"id": "s0", "created": 20},
                                    {"id": "s3", "created": 5}]}
    merged = merge_sessions([a, b, {"object": "list"}])
    assert merged["object"] == "list"
    assert [s["id"] for s in merged["data"]] == ["s3", "s1", "s0", "s2"]
    assert next(s for s in merged["data"] if s["id"] == "s2")["from"] == "a"  # the first one seen
