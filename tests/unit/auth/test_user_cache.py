"""UserCache: meta's token directory from mgmtd (a fake mgmtd client here)."""

from __future__ import annotations

import asyncio

from chainfs.common.auth.tokens import new_token, token_hash
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.user_cache import UserCache
from chainfs.proto import mgmt_pb2 as mp


class FakeDirectory:
    """Answers GetUserDirectory from a dict of users, counting fetches."""

    def __init__(self) -> None:
        self.users: dict[str, mp.User] = {}
        self.version = 1
        self.fetches = 0
        self.down = False

    def add(self, name: str, uid: int) -> str:
        token = new_token()
        self.users[name] = mp.User(name=name, uid=uid, gid=uid, token_hashes=[token_hash(token)])
        self.version += 1
        return token

    async def user_directory(self, known_version: int = 0) -> mp.GetUserDirectoryRsp:
        self.fetches += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise ChainfsError(Code.UNAVAILABLE, "mgmtd down")
        if known_version == self.version:
            return mp.GetUserDirectoryRsp(version=self.version, unchanged=True)
        return mp.GetUserDirectoryRsp(version=self.version, users=list(self.users.values()))


def cache(d: FakeDirectory, miss_min_s: float = 0.05) -> UserCache:
    return UserCache(d, refresh_interval_s=60, miss_refresh_min_s=miss_min_s)  # type: ignore[arg-type]


async def test_a_new_user_works_at_once_and_concurrent_misses_share_one_fetch() -> None:
    d = FakeDirectory()
    c = cache(d)
    alice = d.add("alice", 1000)
    got = await asyncio.gather(*(c.user_of(token_hash(alice)) for _ in range(20)))
    assert all(w is not None and w.uid == 1000 and w.is_user for w in got)
    assert d.fetches == 1


async def test_a_flood_of_unknown_tokens_costs_two_fetches() -> None:
    d = FakeDirectory()
    c = cache(d, miss_min_s=0.2)
    got = await asyncio.gather(*(c.user_of(token_hash(new_token())) for _ in range(50)))
    assert got == [None] * 50
    # The first fetch began before the others asked; one more began after them all.
    assert d.fetches == 2


async def test_revoked_tokens_stop_holding_and_unchanged_ones_keep_their_identity() -> None:
    d = FakeDirectory()
    c = cache(d)
    alice, bob = d.add("alice", 1000), d.add("bob", 1001)
    who_a = await c.user_of(token_hash(alice))
    who_b = await c.user_of(token_hash(bob))
    assert who_a is not None and who_b is not None and c.holds(who_a) and c.holds(who_b)
    del d.users["bob"]
    d.version += 1
    await c.refresh()
    assert c.holds(who_a) and not c.holds(who_b)
    assert await c.user_of(token_hash(bob)) is None


async def test_mgmtd_unreachable_answers_from_what_is_held() -> None:
    d = FakeDirectory()
    c = cache(d)
    alice = d.add("alice", 1000)
    assert await c.user_of(token_hash(alice)) is not None
    d.down = True
    assert await c.user_of(token_hash(alice)) is not None
    assert await c.user_of(token_hash(new_token())) is None
