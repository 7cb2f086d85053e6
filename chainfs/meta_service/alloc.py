"""Sharded, batched inode-id allocator.

The id space is cut into batches of ``batch`` ids. Shard ``s`` hands out the
batches ``s, s + shards, s + 2*shards, ...``; its counter (``IDAL|s``) says how
many it has given. A server reserves one batch from a random shard in one small
transaction and hands its ids out locally, so servers rarely touch the same
counter and a create costs no allocator round trip. Ids of a batch a server
never used (it stopped) are lost, never reused.
"""

from __future__ import annotations

import asyncio
import random

from chainfs.kv import KVStore, Transaction
from chainfs.meta_service import schema
from chainfs.proto import meta_pb2 as pb


class InodeAllocator:
    def __init__(self, kv: KVStore, fmt: pb.FormatRecord) -> None:
        assert fmt.alloc_shards > 0 and fmt.alloc_batch > 0 and fmt.alloc_first_id > 0
        self.kv = kv
        self.shards = fmt.alloc_shards
        self.batch = fmt.alloc_batch
        self.first_id = fmt.alloc_first_id
        self._free: list[int] = []  # ids reserved and not handed out; popped from the end
        self._lock = asyncio.Lock()
        self.batches_reserved = 0

    def batch_start(self, shard: int, n: int) -> int:
        """First id of the ``n``-th batch of ``shard``."""
        return self.first_id + (n * self.shards + shard) * self.batch

    async def _reserve(self) -> None:
        shard = random.randrange(self.shards)

        async def fn(tx: Transaction) -> int:
            key = schema.alloc_key(shard)
            raw = await tx.get(key)
            n = schema.decode_counter(raw) if raw is not None else 0
            tx.set(key, schema.encode_counter(n + 1))
            return n

        n = await self.kv.transact(fn)
        start = self.batch_start(shard, n)
        self._free.extend(range(start + self.batch - 1, start - 1, -1))
        self.batches_reserved += 1

    async def take(self) -> int:
        if not self._free:
            async with self._lock:
                if not self._free:
                    await self._reserve()
        return self._free.pop()

    def give_back(self, ids: list[int]) -> None:
        """Ids taken but not used (the operation failed): hand them out again."""
        self._free.extend(ids)

    async def allocated(self) -> int:
        """Ids handed out by all servers so far (batches taken x batch size)."""

        async def fn(tx: Transaction) -> int:
            rows = await tx.get_range(*schema.range_of(schema.IDAL))
            return sum(schema.decode_counter(v) for _, v in rows)

        return self.batch * await self.kv.transact(fn, read_only=True)


class IdLease:
    """The ids one operation takes: a transaction retry reuses them, and the
    ones not used are given back at the end."""

    def __init__(self, alloc: InodeAllocator) -> None:
        self.alloc = alloc
        self._ids: list[int] = []
        self._used = 0

    def restart(self) -> None:
        """Start of a (re)run of the transaction function."""
        self._used = 0

    async def take(self) -> int:
        ino = await self.peek()
        self._used += 1
        return ino

    async def peek(self) -> int:
        """The id the next take() returns."""
        if self._used == len(self._ids):
            self._ids.append(await self.alloc.take())
        return self._ids[self._used]

    def finish(self, committed: bool) -> None:
        unused = self._ids[self._used :] if committed else self._ids
        if unused:
            self.alloc.give_back(unused)
        self._ids = []
        self._used = 0
