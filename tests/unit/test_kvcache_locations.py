"""The KV cache's location cache: bounded in entries and age, dropped by this
handle's changes, renewed only with what meta says now."""

from __future__ import annotations

from chainfs.client.kvcache.backend import EntryInfo
from chainfs.client.kvcache.format import Key
from chainfs.client.kvcache.locations import (
    DROPS_REMEMBERED,
    RENEW_IDLE_FACTOR,
    Located,
    LocationCache,
)
from chainfs.client.layout import Layout

MS = 1_000_000  # ns
_LAYOUT = Layout(chunk_size=1 << 20, chains=(1,))


def _key(name: str) -> Key:
    return Key.of(name, 1024)


def _loc(ino: int, size: int = 100, mtime_ns: int = 5) -> Located:
    return Located(0, EntryInfo(ino, size, _LAYOUT, mtime_ns, 0))


def _put(c: LocationCache, name: str, ino: int, at_ns: int, used: bool = True) -> None:
    c.put(_key(name), _loc(ino), f"/d/{name}", f"/d/{name}", at_ns, c.generation, used)


def test_trusted_for_its_age_from_the_lookup() -> None:
    c = LocationCache(10, 100)
    _put(c, "a", 1, at_ns=1_000 * MS)
    assert c.get(_key("a"), 1_099 * MS) == _loc(1)
    assert c.get(_key("a"), 1_100 * MS) is None  # as old as it may be: gone
    assert len(c) == 0


def test_bounded_least_recently_used_first() -> None:
    c = LocationCache(2, 1_000)
    _put(c, "a", 1, 0)
    _put(c, "b", 2, 0)
    assert c.get(_key("a"), 1) is not None  # "a" now more recent than "b"
    _put(c, "c", 3, 0)
    assert len(c) == 2
    assert c.get(_key("b"), 1) is None and c.get(_key("a"), 1) is not None


def test_drops_and_lookups_in_flight() -> None:
    c = LocationCache(10, 1_000)
    _put(c, "a", 1, 0)
    _put(c, "b", 2, 0)
    began = c.generation  # a lookup of "a" is sent ...
    c.drop_keys([_key("a")])  # ... this handle changes "a" meanwhile ...
    c.put(_key("a"), _loc(1), "/d/a", "/d/a", 0, began, True)  # ... its answer is not kept
    assert c.get(_key("a"), 1) is None
    c.drop_bases(["/d/b"])  # a removal of that name (any probe)
    assert c.get(_key("b"), 1) is None
    # A lookup in flight while other keys are dropped is kept ...
    began = c.generation
    c.drop_keys([_key("x")])
    c.drop_bases(["/d/y"])
    c.put(_key("a"), _loc(1), "/d/a", "/d/a", 0, began, True)
    assert c.get(_key("a"), 1) == _loc(1)
    # ... unless so many were dropped since that this one may be forgotten.
    began = c.generation
    c.drop_keys(_key(f"z{i}") for i in range(DROPS_REMEMBERED + 1))
    c.put(_key("c"), _loc(3), "/d/c", "/d/c", 0, began, True)
    assert c.get(_key("c"), 1) is None
    assert LocationCache(0, 1_000).enabled is False
    assert LocationCache(10, 0).enabled is False


def test_renewal_keeps_the_same_file_and_drops_a_changed_one() -> None:
    c = LocationCache(10, 300)
    for i, name in enumerate(("same", "replaced", "removed", "idle")):
        _put(c, name, i + 1, at_ns=0, used=name != "idle")
    assert c.due(100 * MS, 100) == []  # all still young
    due = c.due(250 * MS, 100)
    assert sorted(path for _, path, _ in due) == ["/d/removed", "/d/replaced", "/d/same"]
    now = {"same": _loc(1).info, "replaced": _loc(9).info, "removed": None}
    for raw, path, ino in due:
        c.renew(raw, ino, now[path.rsplit("/", 1)[1]], 250 * MS, c.generation)
    assert c.get(_key("same"), 500 * MS) == _loc(1)  # trusted from the renewal on
    assert c.get(_key("replaced"), 260 * MS) is None
    assert c.get(_key("removed"), 260 * MS) is None
    # A location no get takes for RENEW_IDLE_FACTOR ages is no longer renewed.
    late = (500 + RENEW_IDLE_FACTOR * 300 + 1) * MS
    assert c.due(late, 100) == []


def test_a_location_no_get_took_from_the_cache_is_renewed_once() -> None:
    """A key read once (its lookup's get only) is stat'ed again once, then left to
    age out; one a later get took from the cache is renewed while in use, and so
    is a read-once key as soon as a get takes it."""
    c = LocationCache(10, 300)
    _put(c, "once", 1, at_ns=0)
    _put(c, "again", 2, at_ns=0)
    assert c.get(_key("again"), 50 * MS) == _loc(2)  # a second get: from the cache
    for t in (250, 500):
        due = sorted(path for _, path, _ in c.due(t * MS, 100))
        assert due == (["/d/again", "/d/once"] if t == 250 else ["/d/again"]), t
        for raw, _path, ino in c.due(t * MS, 100):
            c.renew(raw, ino, _loc(ino).info, t * MS, c.generation)
        c.get(_key("again"), t * MS)
    # "once" is still trusted until 550 (renewed at 250): a get now takes it ...
    assert c.get(_key("once"), 540 * MS) == _loc(1)
    # ... so it is renewed again while in use.
    assert sorted(path for _, path, _ in c.due(545 * MS, 100)) == ["/d/once"]
    assert c.get(_key("once"), 560 * MS) is None  # not renewed in time: gone
