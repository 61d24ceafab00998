"""layerserve.sessions.journal: records, replay arithmetic, crash recovery, compaction."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from layerserve.sessions.journal import FlashRecord, Journal, SessionRecord, replay

REPO = pathlib.Path(__file__).resolve().parents[2]


def fresh(sid: str = "s1", created_ms: int = 1000, **kw) -> SessionRecord:
    return SessionRecord(id=sid, created_ms=created_ms, **kw)


def lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def reopen(directory: pathlib.Path) -> tuple[Journal, dict[str, SessionRecord]]:
    j = Journal(directory)
    return j, {r.id: r for r in j.restore()}


def test_every_record_kind_round_trips(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh(window=8, pre_decode=True))
        j.push("s1", ["a", "b", "c", "ünï\u2028code\n"])
        j.drop("s1", 1)
        j.ingest("s1", 2, 0, data_version=1)
        j.turn("s1", [1, 2, 3], data_mode=True, turns=1, data_version=1)
        j.flash_add("s1", 1, "what?", 16)
        j.flash_add("s1", 3, "who?", 8)
        j.flash_add("s1", 2, "when?", 4)
        j.flash_remove("s1", 1)
        j.forget_conversation("s1")
        j.turn("s1", [7], data_mode=False, turns=2, data_version=1)
    path = tmp_path / "s1.jsonl"
    raw = path.read_text()
    assert raw.count("\n") == 11 and ", " not in raw and '": ' not in raw  # one compact line per call
    ops = [r["op"] for r in lines(path)]
    assert ops == ["snapshot", "push", "drop", "ingest", "turn", "flash_add", "flash_add", "flash_add",
                   "flash_remove", "forget_conversation", "turn"]
    want = SessionRecord(id="s1", created_ms=1000, window=8, pre_decode=True, durable=["b", "c"],
                         pending=["ünï\u2028code\n"], evicted=0, total_pushed=4, total_dropped=1, data_version=1,
                         conversation=[7], data_mode=False, turns=2,
                         flash=[FlashRecord(2, "when?", 4), FlashRecord(3, "who?", 8)], next_flash_id=4)
    assert replay(lines(path)) == want
    j2, restored = reopen(tmp_path)
    j2.close()
    assert restored == {"s1": want}
    assert restored["s1"].first_pending_seq == 3


def test_create_record_and_forget(tmp_path):
    rec = replay([
        {"op": "create", "id": "x", "created_ms": 5, "window": None, "pre_decode": False},
        {"op": "turn", "conversation": [1], "data_mode": True, "turns": 1, "data_version": 0},
        {"op": "forget_conversation"},
    ])
    assert rec == SessionRecord(id="x", created_ms=5, conversation=None, data_mode=True, turns=1)


def test_drop_ingest_evict_arithmetic():
    recs = [{"op": "create", "id": "w", "created_ms": 0, "window": 3, "pre_decode": False},
            {"op": "push", "entries": [f"e{i}" for i in range(5)]},    # pending e0..e4
            {"op": "drop", "count": 2},                               # drops e0, e1
            {"op": "ingest", "count": 2, "evicted": 0, "data_version": 1},  # durable e2 e3
            {"op": "push", "entries": ["e5", "e6", "e7"]},            # pending e4..e7
            {"op": "ingest", "count": 3, "evicted": 2, "data_version": 2},  # durable e2..e6 -> evict e2 e3
            {"op": "drop", "count": 1},                               # drops e7
            {"op": "push", "entries": ["e8"]},
            {"op": "ingest", "count": 1, "evicted": 1, "data_version": 3}]  # durable e5 e6 e8
    rec = replay(recs)
    assert rec.durable == ["e5", "e6", "e8"]
    assert rec.pending == []
    assert (rec.evicted, rec.total_pushed, rec.total_dropped, rec.data_version) == (3, 9, 3, 3)
    assert rec.total_pushed == len(rec.durable) + len(rec.pending) + rec.evicted + rec.total_dropped
    assert rec.first_pending_seq == 9


@pytest.mark.parametrize("bad", [
    {"op": "drop", "count": 3},
    {"op": "ingest", "count": 3, "evicted": 0, "data_version": 1},
    {"op": "ingest", "count": 2, "evicted": 3, "data_version": 1},
    {"op": "flash_remove", "fid": 9},
    {"op": "push", "entries": [1]},
    {"op": "drop", "count": True},
    {"op": "nope"},
    {"op": "create", "id": "w", "created_ms": 0, "window": None, "pre_decode": False},
])
def test_replay_rejects_inconsistent_records(bad):
    start = [{"op": "create", "id": "w", "created_ms": 0, "window": None, "pre_decode": False},
             {"op": "push", "entries": ["a", "b"]}]
    with pytest.raises(ValueError, match="record 2"):
        replay(start + [bad])


def test_replay_needs_a_start():
    with pytest.raises(ValueError):
        replay([])
    with pytest.raises(ValueError):
        replay([{"op": "push", "entries": ["a"]}])


def test_writer_refuses_what_replay_would_reject(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh())
        j.push("s1", ["a"])
        size = (tmp_path / "s1.jsonl").stat().st_size
        with pytest.raises(ValueError):
            j.drop("s1", 2)
        with pytest.raises(ValueError):
            j.ingest("s1", 1, 2, 1)
        with pytest.raises(ValueError):
            j.flash_remove("s1", 1)
        j.flash_add("s1", 1, "q", 1)
        with pytest.raises(ValueError):
            j.flash_add("s1", 1, "q", 1)
        with pytest.raises(TypeError):
            j.push("s1", [b"bytes"])
        with pytest.raises(ValueError):
            j.create(SessionRecord(id="bad/id", created_ms=0))
        with pytest.raises(ValueError):
            j.create(SessionRecord(id="s2", created_ms=0, total_pushed=1))  # inconsistent counts
        assert (tmp_path / "s1.jsonl").stat().st_size > size  # only flash_add was written
        assert [r["op"] for r in lines(tmp_path / "s1.jsonl")] == ["snapshot", "push", "flash_add"]
        assert not (tmp_path / "s2.jsonl").exists()


def test_create_existing_is_an_error(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh())
        with pytest.raises(FileExistsError):
            j.create(fresh())
    with Journal(tmp_path) as j:  # a file from an earlier run, not restored yet
        with pytest.raises(FileExistsError):
            j.create(fresh())


def test_unknown_or_deleted_session_is_a_key_error(tmp_path):
    with Journal(tmp_path) as j:
        with pytest.raises(KeyError):
            j.push("ghost", ["a"])
        j.create(fresh())
        j.delete("s1")
        assert not (tmp_path / "s1.jsonl").exists()
        for call in (lambda: j.push("s1", ["a"]), lambda: j.drop("s1", 0), lambda: j.ingest("s1", 0, 0, 0),
                     lambda: j.turn("s1", [], False, 0, 0), lambda: j.forget_conversation("s1"),
                     lambda: j.flash_add("s1", 1, "q", 1), lambda: j.flash_remove("s1", 1)):
            with pytest.raises(KeyError):
                call()
        j.delete("s1")  # missing file is fine
        j.delete("never")
        j.create(fresh())  # the id can be used again
    with Journal(tmp_path) as j:
        assert [r.id for r in j.restore()] == ["s1"]


def test_restore_after_crash_ignores_partial_last_line(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh())
        j.push("s1", ["a", "b"])
        j.ingest("s1", 1, 0, 1)
    path = tmp_path / "s1.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"op":"push","entries":["c","d')  # killed mid-write
    j, restored = reopen(tmp_path)
    assert restored["s1"].durable == ["a"] and restored["s1"].pending == ["b"]
    assert restored["s1"].total_pushed == 2
    # compaction removed the partial line, so later appends replay cleanly
    j.push("s1", ["e"])
    j.close()
    j, restored = reopen(tmp_path)
    j.close()
    assert restored["s1"].pending == ["b", "e"]


def test_restore_ignores_corrupt_complete_last_line(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh())
        j.push("s1", ["a"])
    with open(tmp_path / "s1.jsonl", "ab") as f:
        f.write(b'{"op":"pu\xff\n')
    j, restored = reopen(tmp_path)
    j.close()
    assert restored["s1"].pending == ["a"]


def test_corrupt_middle_line_skips_only_that_session(tmp_path, caplog):
    with Journal(tmp_path) as j:
        for sid, ms in (("a", 3), ("b", 2), ("c", 1)):
            j.create(fresh(sid, ms))
            j.push(sid, [sid + "1"])
            j.push(sid, [sid + "2"])
    path = tmp_path / "b.jsonl"
    first, second, third = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(first + b"garbage{\n" + third)
    with caplog.at_level("WARNING", logger="layerserve.sessions"):
        j, restored = reopen(tmp_path)
    assert list(restored) == ["c", "a"]  # created_ms order
    assert restored["a"].pending == ["a1", "a2"]
    assert not path.exists()
    corrupt = tmp_path / "b.jsonl.corrupt"
    assert corrupt.read_bytes() == first + b"garbage{\n" + third  # kept, not deleted
    assert any("b.jsonl" in r.getMessage() for r in caplog.records)
    with pytest.raises(KeyError):
        j.push("b", ["x"])
    j.create(fresh("b", 9))  # a new session may take the id; a second corrupt copy does not overwrite
    j.close()
    (tmp_path / "b.jsonl").write_bytes(b'{"op":"push","entries":[]}\n')
    j, restored = reopen(tmp_path)
    j.close()
    assert "b" not in restored and corrupt.exists() and (tmp_path / "b.jsonl.corrupt.1").exists()


def test_semantically_bad_file_is_moved_aside(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"op":"snapshot","id":"other","created_ms":0}\n')
    (tmp_path / "y.jsonl").write_text("")  # created, killed before its first record: never acked
    (tmp_path / "not an id.jsonl").write_text("")
    j, restored = reopen(tmp_path)
    j.close()
    assert restored == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "not an id.jsonl.corrupt", "x.jsonl.corrupt", "y.jsonl.corrupt"]


def test_compaction_makes_one_line_and_appends_continue(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh(window=100))
        for i in range(100):
            j.push("s1", [f"e{i}", f"f{i}"])
            j.ingest("s1", 1, 0, i)
        j.turn("s1", list(range(50)), True, 3, 99)
        j.flash_add("s1", 5, "q", 2)
    path = tmp_path / "s1.jsonl"
    before = replay(lines(path))
    assert len(lines(path)) == 203
    j, restored = reopen(tmp_path)
    assert restored["s1"] == before
    assert len(lines(path)) == 1 and lines(path)[0]["op"] == "snapshot"
    assert not list(tmp_path.glob("*.tmp"))
    j.ingest("s1", 100, 150, 100)
    j.flash_remove("s1", 5)
    j.flash_add("s1", 6, "r", 3)
    j.close()
    rec = replay(lines(path))
    assert len(rec.durable) == 50 and rec.pending == [] and rec.evicted == 150
    assert rec.durable[-1] == "f99" and rec.flash == [FlashRecord(6, "r", 3)] and rec.next_flash_id == 7
    j, restored = reopen(tmp_path)
    j.close()
    assert restored["s1"] == rec


def test_large_session_snapshot_is_one_line(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh())
        j.push("s1", [f"entry number {i}" for i in range(10_000)])
        j.ingest("s1", 10_000, 0, 1)
    j, restored = reopen(tmp_path)
    j.close()
    assert len(restored["s1"].durable) == 10_000
    assert (tmp_path / "s1.jsonl").read_bytes().count(b"\n") == 1


def test_stale_compaction_temp_file_is_removed(tmp_path):
    with Journal(tmp_path) as j:
        j.create(fresh())
    (tmp_path / "s1.jsonl.tmp").write_text("half a snapshot")
    j, restored = reopen(tmp_path)
    j.close()
    assert list(restored) == ["s1"] and not (tmp_path / "s1.jsonl.tmp").exists()


def test_fsync_option_and_permissions(tmp_path):
    d = tmp_path / "journal"
    with Journal(d, fsync=True) as j:
        j.create(fresh())
        j.push("s1", ["a"])
        j.delete("s1")
        j.create(fresh("s2"))
        j.push("s2", ["b"])
        assert [r.pending for r in j.restore()] == [["b"]]
        j.push("s2", ["c"])
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / "s2.jsonl").stat().st_mode & 0o777 == 0o600
    assert replay(lines(d / "s2.jsonl")).pending == ["b", "c"]


def test_threads_append_whole_lines(tmp_path):
    with Journal(tmp_path) as j:
        for sid in ("t0", "t1"):
            j.create(fresh(sid))

        def work(k: int) -> None:
            sid = f"t{k % 2}"
            for i in range(200):
                j.push(sid, [f"{k}:{i}" + "x" * (i % 7) * 100])

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    j, restored = reopen(tmp_path)
    j.close()
    for sid in ("t0", "t1"):
        assert restored[sid].total_pushed == 600
        for k in range(int(sid[1]), 6, 2):
            mine = [e.split("x")[0] for e in restored[sid].pending if e.startswith(f"{k}:")]
            assert mine == [f"{k}:{i}" for i in range(200)]  # each thread's order kept


CHILD = textwrap.dedent("""
    import pathlib, sys, time
    from layerserve.sessions.journal import Journal, SessionRecord
    j = Journal(pathlib.Path(sys.argv[1]))
    j.create(SessionRecord(id="crash", created_ms=1))
    for i in range(200):
        j.push("crash", [f"entry-{i}-" + "y" * 2000])
        print(f"acked {i}", flush=True)
        time.sleep(0.002)
    time.sleep(60)
""")


def test_sigkill_loses_nothing_acked(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=REPO)
    acked: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 50 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line.split()[1]))
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    assert len(acked) >= 50, err.decode()
    assert proc.returncode == -signal.SIGKILL
    acked += [int(x.split()[1]) for x in rest.decode().splitlines()]  # acks still in the pipe
    assert acked == list(range(len(acked)))
    j, restored = reopen(tmp_path)
    j.close()
    got = [e.split("-")[1] for e in restored["crash"].pending]
    assert got == [str(i) for i in range(len(got))]
    assert len(got) >= len(acked)
