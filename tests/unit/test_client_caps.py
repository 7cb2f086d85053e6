"""The client's capability cache: what it fetches from meta, and when."""

from __future__ import annotations

import asyncio
import time

from chainfs.client.caps import CapabilityCache
from chainfs.common.auth.capability import READ, WRITE
from chainfs.proto import common_pb2 as cpb


def cap(inode: int, rights: int, ttl_ms: int = 600_000) -> cpb.Capability:
    return cpb.Capability(
        inode=inode, rights=rights, expires_ms=int(time.time() * 1000) + ttl_ms, mac=b"m"
    )


class Meta:
    """Grants what it is asked for, except for inodes in ``denied``."""

    def __init__(self, denied: frozenset[int] = frozenset()) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self.denied = denied
        self.cache: CapabilityCache | None = None

    async def fetch(self, inodes: list[int], right: int) -> None:
        self.calls.append((inodes, right))
        assert self.cache is not None
        for ino in inodes:
            if ino not in self.denied:
                self.cache.put(cap(ino, right))


def make(meta: Meta, renew_before_ms: int = 1_000, entries: int = 100) -> CapabilityCache:
    c = CapabilityCache(meta.fetch, renew_before_ms, entries, fetch_batch=2)
    meta.cache = c
    return c


def test_an_open_capability_serves_both_its_rights_without_asking_meta() -> None:
    meta = Meta()
    c = make(meta)
    both = cap(7, READ | WRITE)
    c.put(both)
    assert asyncio.run(c.get([7], READ)) == {7: both}
    assert asyncio.run(c.get([7], WRITE)) == {7: both}
    assert meta.calls == []


def test_nothing_is_fetched_from_a_cluster_that_signs_none_unless_storage_asked() -> None:
    meta = Meta()
    c = make(meta)
    assert asyncio.run(c.get([1, 2], READ)) == {}
    assert meta.calls == []
    got = asyncio.run(c.get([1, 2, 3], READ, fetch=True))
    assert sorted(got) == [1, 2, 3]
    assert meta.calls == [([1, 2], READ), ([3], READ)]  # in batches of fetch_batch


def test_missing_expiring_and_denied_capabilities() -> None:
    meta = Meta(denied=frozenset({9}))
    c = make(meta, renew_before_ms=60_000)
    c.put(cap(1, READ))
    c.put(cap(2, READ, ttl_ms=30_000))  # expires within renew_before_ms: renewed
    got = asyncio.run(c.get([1, 2, 9], READ))
    assert sorted(got) == [1, 2]  # meta granted nothing for 9: storage will refuse it
    assert got[2].expires_ms > int(time.time() * 1000) + 60_000
    assert meta.calls == [([2, 9], READ)]
    c.forget([1])
    asyncio.run(c.get([1], READ))
    assert meta.calls[-1] == ([1], READ)


def test_a_length_query_takes_either_right() -> None:
    meta = Meta()
    c = make(meta)
    w = cap(5, WRITE)
    c.put(w)
    assert asyncio.run(c.any_of(5)) == w
    assert meta.calls == []


def test_the_cache_is_bounded() -> None:
    c = make(Meta(), entries=3)
    for ino in range(10):
        c.put(cap(ino, READ))
    assert len(c) == 3
