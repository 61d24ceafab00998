"""layerserve.sessions.journal's owner locks: replicas sharing one session directory.

Two Journal objects with different owners on one directory stand for two replicas: flock belongs
to an open file description, so two opens of a lock file in one process conflict as two
processes' would."""

from __future__ import annotations

import pytest

from layerserve.sessions.journal import Journal, OwnedElsewhere, SessionRecord


def fresh(sid: str = "s1", created_ms: int = 1000, **kw) -> SessionRecord:
    return SessionRecord(id=sid, created_ms=created_ms, **kw)


@pytest.fixture
def journals(tmp_path):
    opened: list[Journal] = []

    def open_(owner: str | None) -> Journal:
        j = Journal(tmp_path, owner=owner)
        opened.append(j)
        return j

    yield open_
    for j in opened:
        j.close()


def test_a_session_created_by_one_owner_cannot_be_adopted_by_another(tmp_path, journals):
    a, b = journals("replica-a"), journals("replica-b")
    a.create(fresh())
    assert (tmp_path / "s1.lock").read_text() == "replica-a"
    with pytest.raises(OwnedElsewhere) as err:
        b.adopt("s1")
    assert err.value.owner == "replica-a" and err.value.sid == "s1"
    assert "replica-a" in str(err.value)
    a.push("s1", ["still", "mine"])  # A's journal is untouched by B's attempt
    assert a.adopt("s1").pending == ["still", "mine"]  # open here: returned as its file has it


def test_adopt_after_the_owner_closes_keeps_history_and_moves_the_lock(tmp_path, journals):
    a, b = journals("replica-a"), journals("replica-b")
    a.create(fresh(window=4))
    a.push("s1", ["e0", "e1", "e2"])
    a.ingest("s1", 2, 0, data_version=1)
    a.push("s1", ["e3"])
    a.close()

    rec = b.adopt("s1")
    assert rec is not None
    assert rec.id == "s1" and rec.window == 4 and rec.created_ms == 1000
    assert rec.durable == ["e0", "e1"] and rec.pending == ["e2", "e3"] and rec.total_pushed == 4
    assert rec.data_version == 1
    assert (tmp_path / "s1.lock").read_text() == "replica-b"
    # compacted to one snapshot line, and open for B's appends
    assert (tmp_path / "s1.jsonl").read_text().count("\n") == 1
    b.push("s1", ["e4"])

    a2 = journals("replica-a")
    with pytest.raises(OwnedElsewhere) as err:
        a2.adopt("s1")
    assert err.value.owner == "replica-b"
    with pytest.raises(OwnedElsewhere):
        a2.create(fresh())

    b.close()
    again = a2.adopt("s1")
    assert again.pending == ["e2", "e3", "e4"]


def test_delete_removes_the_journal_and_the_lock(tmp_path, journals):
    a, b = journals("replica-a"), journals("replica-b")
    a.create(fresh())
    a.close()
    assert b.adopt("s1") is not None
    b.delete("s1")
    assert not (tmp_path / "s1.jsonl").exists()
    assert not (tmp_path / "s1.lock").exists()
    assert list(tmp_path.iterdir()) == []
    assert a.adopt("s1") is None
    # the id is free again for anyone
    c = journals("replica-c")
    c.create(fresh())
    assert (tmp_path / "s1.lock").read_text() == "replica-c"


def test_adopting_an_unknown_session_holds_no_lock(tmp_path, journals):
    a, b = journals("replica-a"), journals("replica-b")
    assert a.adopt("ghost") is None
    assert not (tmp_path / "ghost.jsonl").exists()
    b.create(fresh("ghost"))  # would raise OwnedElsewhere had A kept the lock
    assert (tmp_path / "ghost.lock").read_text() == "replica-b"
    with pytest.raises(OwnedElsewhere):
        a.adopt("ghost")


def test_a_failed_create_releases_its_lock(tmp_path, journals):
    a, b = journals("replica-a"), journals("replica-b")
    with pytest.raises(ValueError):
        a.create(fresh(total_pushed=3))  # inconsistent: refused before anything is written
    (tmp_path / "s2.jsonl").write_text("")  # a file in the way
    with pytest.raises(FileExistsError):
        a.create(fresh("s2"))
    (tmp_path / "s2.jsonl").unlink()
    b.create(fresh("s2"))
    assert (tmp_path / "s2.lock").read_text() == "replica-b"


def test_creating_a_session_this_owner_holds_keeps_its_lock(tmp_path, journals):
    a, b = journals("replica-a"), journals("replica-b")
    a.create(fresh())
    with pytest.raises(FileExistsError):
        a.create(fresh())  # a second create of a session A holds must not drop A's lock
    with pytest.raises(OwnedElsewhere):
        b.adopt("s1")
    a.push("s1", ["kept"])


def test_a_longer_owner_name_is_overwritten_cleanly(tmp_path, journals):
    a = journals("a-replica-with-a-long-name")
    a.create(fresh())
    a.close()
    b = journals("b")
    assert b.adopt("s1") is not None
    assert (tmp_path / "s1.lock").read_text() == "b"


def test_a_journal_without_owner_takes_no_locks(tmp_path, journals):
    single = journals(None)
    single.create(fresh())
    single.push("s1", ["x"])
    assert not list(tmp_path.glob("*.lock"))
    other = journals(None)
    rec = other.adopt("s1")  # nobody locks, so nothing refuses
    assert rec is not None and rec.pending == ["x"]
    owned = journals("replica-a")
    assert owned.adopt("s1").pending == ["x"]  # an ownerless journal holds nothing against owners
    single.delete("s1")
    assert not (tmp_path / "s1.jsonl").exists()
