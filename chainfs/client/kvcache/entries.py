"""Where a key's entry lives: its name through collision probes, lookups that
check what they read, and removal that keeps collision chains reachable.

Both the cache's calls and its eviction work through one :class:`Entries`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from chainfs.client.kvcache.backend import EntryInfo, KVCacheBackend
from chainfs.client.kvcache.config import KVCacheConfig
from chainfs.client.kvcache.format import Check, Key, check_header, shard_dir_name
from chainfs.common.errors import ChainfsError, Code

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Located:
    """A key's entry, found and checked."""

    probe: int
    info: EntryInfo


class Holder(Enum):
    """Who holds a key's name at one probe (what a put finds there)."""

    ABSENT = "absent"
    MINE = "mine"
    REPLACEABLE = "replaceable"  # this key's, but expired or being removed
    OTHER = "other"  # another key's entry (a name collision)


# Reads what it needs of each (key index, info) candidate and judges it: a Check,
# or None when the key is settled without one (its caller recorded an error).
ReadRound = Callable[[list[tuple[int, EntryInfo]]], Awaitable[list[Check | None]]]


def split_probe(path: str) -> tuple[str, int]:
    """(path without its probe suffix, probe number) of an entry path."""
    base, sep, probe = path.rpartition("~")
    if not sep or "/" in probe or not probe.isdigit():
        return path, 0
    return base, int(probe)


class Entries:
    """The entries of one cache directory: ``data/<shard>/<name>`` and ``tmp/``."""

    def __init__(self, store: KVCacheBackend, directory: str, config: KVCacheConfig) -> None:
        self.store = store
        self.config = config
        base = "" if directory == "/" else directory
        self.data_dir = f"{base}/data"
        self.tmp_dir = f"{base}/tmp"
        self.shard_dirs = [
            f"{self.data_dir}/{shard_dir_name(s, config.shards)}" for s in range(config.shards)
        ]
        # Renames and removals in flight at once (puts, removes and eviction together).
        self.writes = asyncio.Semaphore(config.max_parallel_puts)
        # ino -> reads of this process in flight: pinned against its own eviction.
        self.pins: collections.Counter[int] = collections.Counter()

    def path(self, key: Key, probe: int) -> str:
        shard = key.shard(self.config.shards)
        return f"{self.shard_dirs[shard]}/{key.name(self.config.name_hash_bytes, probe)}"

    def expired(self, info: EntryInfo, now_ns: int) -> bool:
        ttl = self.config.ttl_s
        return ttl is not None and now_ns - info.mtime_ns > ttl * NS_PER_S

    def pin(self, inos: Iterable[int]) -> None:
        self.pins.update(inos)

    def unpin(self, inos: Iterable[int]) -> None:
        for ino in inos:
            self.pins[ino] -= 1
            if self.pins[ino] <= 0:
                del self.pins[ino]

    # -- lookups -------------------------------------------------------------
    async def find(
        self, keys: list[Key], read_round: ReadRound
    ) -> tuple[list[Located | None], int]:
        """Each key's entry (None: absent or expired) and how many re-reads it took.

        One metadata batch per round stats every pending key's current name;
        ``read_round`` reads and judges the entries found. Another key's entry
        sends the key on to its next probe name; an entry that changed under the
        read (removed, replaced) is looked up again, up to max_read_retries.
        """
        c = self.config
        found: list[Located | None] = [None] * len(keys)
        probe = [0] * len(keys)
        retries = [0] * len(keys)
        pending = list(range(len(keys)))
        for _ in range(c.max_probes + c.max_read_retries + 1):
            if not pending:
                break
            infos = await self.store.kv_stat_many([self.path(keys[i], probe[i]) for i in pending])
            now_ns = time.time_ns()
            looked = [
                (i, info)
                for i, info in zip(pending, infos, strict=True)
                if info is not None and not self.expired(info, now_ns)
            ]
            readable = [(i, info) for i, info in looked if info.size >= keys[i].header_len]
            verdicts = dict(zip([i for i, _ in readable], await read_round(readable), strict=True))
            pending = []
            for i, info in looked:
                # Too short to hold this key's entry: another key's.
                verdict = verdicts.get(i, Check.OTHER_KEY)
                if verdict is Check.OK:
                    found[i] = Located(probe[i], info)
                elif verdict is Check.OTHER_KEY and probe[i] + 1 < c.max_probes:
                    probe[i] += 1
                    pending.append(i)
                elif verdict is Check.CHANGED and retries[i] < c.max_read_retries:
                    retries[i] += 1
                    pending.append(i)
        return found, sum(retries)

    async def read_headers(
        self, keys: list[Key], candidates: list[tuple[int, EntryInfo]]
    ) -> list[Check | None]:
        """Read and check the header of each (key index, info); one storage batch."""
        if not candidates:
            return []
        bufs = [memoryview(bytearray(keys[i].header_len)) for i, _ in candidates]
        await self.store.kv_read_many(
            [(info, 0, b) for (_, info), b in zip(candidates, bufs, strict=True)]
        )
        return [
            check_header(keys[i].raw, b, info.size - keys[i].header_len)
            for (i, info), b in zip(candidates, bufs, strict=True)
        ]

    async def locate(self, keys: list[Key]) -> list[Located | None]:
        """Find each key's entry (header checked, value not read)."""
        found, _ = await self.find(keys, lambda cands: self.read_headers(keys, cands))
        return found

    async def holder(self, key: Key, probe: int) -> Holder:
        """Who holds ``key``'s name at ``probe`` now."""
        (info,) = await self.store.kv_stat_many([self.path(key, probe)])
        if info is None:
            return Holder.ABSENT
        if info.size < key.header_len:
            return Holder.OTHER
        (verdict,) = await self.read_headers([key], [(0, info)])
        if verdict is Check.OTHER_KEY:
            return Holder.OTHER
        if verdict is Check.CHANGED or self.expired(info, time.time_ns()):
            return Holder.REPLACEABLE  # unreadable now (being removed) or expired
        return Holder.MINE

    # -- removal -------------------------------------------------------------
    async def remove(self, paths: list[str], may_chain: list[bool]) -> list[bool]:
        """Remove entries, keeping collision chains whole: an entry at probe p whose
        name has entries at higher probes is replaced, in one atomic rename, by the
        last of them (else a later probe would no longer be reachable: lookups stop
        at the first free name). ``may_chain[i]`` False skips looking for them."""
        by_base: dict[str, list[int]] = collections.defaultdict(list)
        for i, path in enumerate(paths):
            by_base[split_probe(path)[0]].append(i)
        if any(len(ix) > 1 for ix in by_base.values()):
            # Several entries of one chain: one at a time, highest probe first, each
            # seeing the chain as the previous left it.
            out = [False] * len(paths)

            async def one_chain(ix: list[int]) -> None:
                for i in sorted(ix, key=lambda i: -split_probe(paths[i])[1]):
                    (out[i],) = await self.remove([paths[i]], [may_chain[i]])

            await asyncio.gather(*(one_chain(ix) for ix in by_base.values()))
            return out
        last = await self._chain_ends(paths, may_chain)

        async def one(i: int, path: str) -> bool:
            async with self.writes:
                if i in last:
                    try:
                        await self.store.kv_rename(last[i], path, replace=True)
                        return True
                    except ChainfsError as e:
                        if e.code != Code.ENOENT:
                            raise  # ENOENT: the last entry went meanwhile; just remove
                return await self.store.kv_unlink(path)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(paths))))

    async def _chain_ends(self, paths: list[str], may_chain: list[bool]) -> dict[int, str]:
        """For each path (index) with entries at higher probes, the highest of them."""
        higher: list[tuple[int, str]] = []
        for i, (path, chain) in enumerate(zip(paths, may_chain, strict=True)):
            if chain:
                base, probe = split_probe(path)
                higher.extend((i, f"{base}~{q}") for q in range(probe + 1, self.config.max_probes))
        last: dict[int, str] = {}
        if higher:
            infos = await self.store.kv_stat_many([h for _, h in higher])
            for (i, h), info in zip(higher, infos, strict=True):
                if info is not None:
                    last[i] = h  # in probe order: the highest present wins
        return last
