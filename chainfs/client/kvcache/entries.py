"""Where a key's entry lives: its name through collision probes, lookups that
check what they read, and removal that keeps collision chains reachable.

Both the cache's calls and its eviction work through one :class:`Entries`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import Enum
from typing import Literal

from chainfs.client import metrics as client_metrics
from chainfs.client.kvcache.backend import EntryInfo, KVCacheBackend, SyncReader
from chainfs.client.kvcache.config import KVCacheConfig
from chainfs.client.kvcache.format import Check, Key, check_header, shard_dir_name
from chainfs.client.kvcache.locations import Located, LocationCache
from chainfs.common.errors import ChainfsError, Code

_LOOKUPS = client_metrics.KV_META_STATS.labels("lookup")

NS_PER_S = 1_000_000_000
# Storage refusing a read: the inode's capability was refused (the file may be gone).
_REFUSED_READ = frozenset({Code.BAD_CAPABILITY, Code.EACCES, Code.ENOENT})


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
        self.looked_up = 0  # key names stat'ed at meta by lookups (for stats())
        self._count_lock = threading.Lock()  # lookups come from callers' threads too
        # Key -> where its entry was found (gets skip meta while it is young).
        self.locations = LocationCache(config.location_cache_entries, config.location_cache_ms)

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
        self, keys: list[Key], read_round: ReadRound, use_cached: bool = False
    ) -> tuple[list[Located | None], int]:
        """Each key's entry (None: absent or expired) and how many lookups it
        repeated because an entry changed under a read.

        One metadata batch per round stats every pending key's current name;
        ``read_round`` reads and judges the entries found. Another key's entry
        sends the key on to its next probe name; an entry that changed under the
        read (removed, replaced) is looked up again, up to max_read_retries.

        ``use_cached``: keys with a location in the location cache skip the
        metadata batch of the first round; if what that location holds fails
        the check (or storage refuses the read), the key is looked up at meta.
        Entries found through meta go into the location cache.
        """
        c = self.config
        n = len(keys)
        found: list[Located | None] = [None] * n
        probe = [0] * n
        retries = [0] * n
        fallbacks = 0  # cached locations found stale (looked up again; not bounded by retries)
        locs = self.locations
        cached = self._cached(keys, probe) if use_cached and locs.enabled else {}
        pending = [i for i in range(n) if i not in cached] if cached else list(range(n))
        # One round more than without the cache: a cached location found stale.
        for _ in range(c.max_probes + c.max_read_retries + 2):
            if not pending and not cached:
                break
            looked_up_ns, generation = time.monotonic_ns(), locs.generation
            if pending:
                infos = await self._look_up([self.path(keys[i], probe[i]) for i in pending])
            else:
                infos = []
            now_ns = time.time_ns()
            looked = [
                (i, info)
                for i, info in zip(pending, infos, strict=True)
                if info is not None and not self.expired(info, now_ns)
            ]
            looked.extend(cached.items())
            readable = [(i, info) for i, info in looked if info.size >= keys[i].header_len]
            try:
                verdicts_in_order = await read_round(readable)
            except ChainfsError as e:
                if not cached or e.code not in _REFUSED_READ:
                    raise
                # A cached location's inode may be gone (its capability refused):
                # look every key of this round up at meta once.
                locs.drop_keys(keys[i] for i in cached)
                fallbacks += len(cached)
                pending, cached, probe = list(range(n)), {}, [0] * n
                continue
            verdicts = dict(zip([i for i, _ in readable], verdicts_in_order, strict=True))
            pending = []
            for i, info in looked:
                # Too short to hold this key's entry: another key's.
                verdict = verdicts.get(i, Check.OTHER_KEY)
                if i in cached:
                    if verdict is Check.OK:
                        found[i] = Located(probe[i], info)
                    elif verdict is not None:
                        # Not what was cached any more: ask meta, from the first name.
                        locs.drop_keys([keys[i]])
                        fallbacks += 1
                        probe[i] = 0
                        pending.append(i)
                elif verdict is Check.OK:
                    found[i] = loc = Located(probe[i], info)
                    path = self.path(keys[i], probe[i])
                    base = path if probe[i] == 0 else split_probe(path)[0]
                    locs.put(keys[i], loc, path, base, looked_up_ns, generation, use_cached)
                elif verdict is Check.OTHER_KEY and probe[i] + 1 < c.max_probes:
                    probe[i] += 1
                    pending.append(i)
                elif verdict is Check.CHANGED and retries[i] < c.max_read_retries:
                    retries[i] += 1
                    pending.append(i)
            cached = {}
        return found, sum(retries) + fallbacks

    async def prime(self, keys: list[Key]) -> list[bool | None]:
        """For sync gets of keys with no cached location: look each key's first
        name up at meta and cache where its entry is, unread (the calling thread
        then reads and checks it, as a get of a cached location does). Per key:
        True, its location is cached now; False, no entry of that name (a miss,
        as :meth:`find` would answer); None, anything else (take :meth:`find`)."""
        looked_up_ns, generation = time.monotonic_ns(), self.locations.generation
        paths = [self.path(k, 0) for k in keys]
        infos = await self._look_up(paths)
        primed = self._primed(keys, paths, infos, looked_up_ns, generation)
        return [True if isinstance(p, EntryInfo) else p for p in primed]

    def prime_now(
        self, keys: list[Key], reader: SyncReader
    ) -> list[EntryInfo | Literal[False] | None] | None:
        """:meth:`prime` from the calling thread, meta asked through ``reader``
        (``SyncReader.look_up``); per key the entry found and cached in place of
        True. None when that got no clean answer (then :meth:`prime` on the
        loop)."""
        looked_up_ns, generation = time.monotonic_ns(), self.locations.generation
        paths = [self.path(k, 0) for k in keys]
        infos = reader.look_up(paths)
        if infos is None:
            return None
        self._count_lookups(len(paths))
        return self._primed(keys, paths, infos, looked_up_ns, generation)

    def _primed(
        self,
        keys: list[Key],
        paths: list[str],
        infos: list[EntryInfo | None],
        looked_up_ns: int,
        generation: int,
    ) -> list[EntryInfo | Literal[False] | None]:
        """What a lookup of ``keys``' first names found, cached (see :meth:`prime`):
        per key the entry (cached now), False (no entry) or None (another key's
        entry, or a lookup older than a drop of the key: not cached)."""
        locs = self.locations
        now_ns = time.time_ns()
        out: list[EntryInfo | Literal[False] | None] = []
        for key, path, info in zip(keys, paths, infos, strict=True):
            if info is None or self.expired(info, now_ns):
                out.append(False)
            elif info.size < key.header_len:
                out.append(None)  # too short for this key's entry: another key's
            elif locs.put(key, Located(0, info), path, path, looked_up_ns, generation, True):
                out.append(info)
            else:
                out.append(None)  # dropped since the lookup began: find it anew
        return out

    async def _look_up(self, paths: list[str]) -> list[EntryInfo | None]:
        """Stat entry names at meta for a lookup, counted (stats(), the client's metrics)."""
        self._count_lookups(len(paths))
        return await self.store.kv_stat_many(paths)

    def _count_lookups(self, n: int) -> None:
        with self._count_lock:
            self.looked_up += n
        _LOOKUPS.inc(n)

    def _cached(self, keys: list[Key], probe: list[int]) -> dict[int, EntryInfo]:
        """Key index -> entry info of the keys with a usable cached location (their
        probe set in ``probe``); one expired by TTL is dropped and looked up."""
        now_ns = time.time_ns()
        mono_ns = time.monotonic_ns()
        out: dict[int, EntryInfo] = {}
        for i, key in enumerate(keys):
            loc = self.locations.get(key, mono_ns)
            if loc is None:
                continue
            if self.expired(loc.info, now_ns):
                self.locations.drop_keys([key])
                continue
            probe[i] = loc.probe
            out[i] = loc.info
        return out

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

    async def locate(self, keys: list[Key], use_cached: bool = False) -> list[Located | None]:
        """Find each key's entry (header checked, value not read). ``use_cached``:
        as in :meth:`find` (exists; a removal always asks meta)."""
        found, _ = await self.find(
            keys, lambda cands: self.read_headers(keys, cands), use_cached=use_cached
        )
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
        try:
            return await self._remove(paths, may_chain)
        finally:
            # After the removal (a lookup in flight meanwhile caches nothing):
            # every key named like these, a chain's moved last entry included.
            self.locations.drop_bases(split_probe(p)[0] for p in paths)

    async def _remove(self, paths: list[str], may_chain: list[bool]) -> list[bool]:
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
