"""A BatchStat whose store fails (etcd unreachable past its op timeout, a
fenced meta) fails as a whole, as a Stat does, so the client retries it or
fails over: the stat coalescer sends plain stats as BatchStats, and a store
outage must not become one path's answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv.base import Snapshot
from chainfs.kv.memory import MemoryStore
from chainfs.meta_service import schema
from chainfs.proto import meta_pb2 as pb
from tests.unit.meta.conftest import (
    DirectMetaClient,
    served,
)


class FlakyStore(MemoryStore):
    """memory:// whose next read of ``fail_key`` raises UNAVAILABLE, once."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_key: bytes | None = None

    async def _begin(self) -> Snapshot:
        snap = await super()._begin()
        get = snap.get

        async def flaky(key: bytes) -> bytes | None:
            if key == self.fail_key:
                self.fail_key = None
                raise ChainfsError(Code.UNAVAILABLE, "store unreachable")
            return await get(key)

        snap.get = flaky  # type: ignore[method-assign]
        return snap


@pytest.fixture
async def meta() -> AsyncIterator[tuple[DirectMetaClient, FlakyStore]]:
    kv = FlakyStore()
    async with served(kv) as (_, client):
        yield client, kv


async def test_a_store_outage_in_batch_stat_is_retried_like_a_stat(
    meta: tuple[DirectMetaClient, FlakyStore],
) -> None:
    client, kv = meta
    await client.mkdir("/d")
    ino = (await client.stat("/d")).ino

    kv.fail_key = schema.inode_key(ino)
    alone = await client.stat("/d")  # the client retries the Stat
    assert alone.ino == ino

    kv.fail_key = schema.inode_key(ino)
    got = await client.batch_stat(["/d", "/missing"])
    assert isinstance(got[0], pb.Inode) and got[0].ino == ino, got[0]
    assert isinstance(got[1], ChainfsError) and got[1].code == Code.ENOENT
