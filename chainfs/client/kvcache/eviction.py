"""Eviction: TTL expiry, the capacity watermarks, left-over temp files, and the
access times that make eviction least-recently-used. Both run as bounded
rounds on the shared background loop (:class:`chainfs.common.background.Periodic`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass, field

from chainfs.client.kvcache.backend import EntryInfo
from chainfs.client.kvcache.entries import NS_PER_S, Entries
from chainfs.common.background import Periodic
from chainfs.common.errors import ChainfsError

log = logging.getLogger(__name__)


@dataclass
class GcRound:
    """What one background round did."""

    shards_scanned: int = 0
    expired: int = 0
    evicted: int = 0
    tmp_removed: int = 0
    estimated_bytes: int | None = None  # None until every shard has been scanned once
    errors: list[str] = field(default_factory=list)


@dataclass
class ShardScan:
    entries: int
    bytes: int
    # (last access ns, name, size, ino), oldest first, at most gc_candidates_per_shard.
    candidates: list[tuple[int, str, int, int]]
    # Base names with entries at probes > 0 (collision chains; rare).
    chained: set[str]


class Evictor(Periodic):
    """TTL and capacity eviction of one cache handle; ``run`` is one bounded round."""

    name = "kvcache-eviction"

    def __init__(self, entries: Entries) -> None:
        super().__init__(entries.config.gc_interval_s)
        self._entries = entries
        self.config = entries.config
        self.evictions = 0  # entries this handle removed for capacity
        self.expirations = 0  # ... and for TTL
        self._scans: dict[int, ShardScan] = {}
        self._put_bytes_since_scan: collections.Counter[int] = collections.Counter()
        self._next_shard = 0
        self._evicting = False  # above the high watermark, not yet down to the low one

    async def round(self) -> bool:
        await self.run()
        return False  # the next round after gc_interval_s

    def note_put(self, shard: int, nbytes: int) -> None:
        self._put_bytes_since_scan[shard] += nbytes

    def estimated_bytes(self) -> int | None:
        """Bytes in the cache as of the last scans plus this handle's puts since (None
        until every shard was scanned once)."""
        if len(self._scans) < self.config.shards:
            return None
        return sum(s.bytes for s in self._scans.values()) + sum(self._put_bytes_since_scan.values())

    async def run(self, full: bool = False) -> GcRound:
        """One round: scan some shards (``full``: all of them), remove what expired
        and stale temp files, and evict down to the low watermark; at most
        gc_max_removals_per_round removals."""
        c = self.config
        r = GcRound()
        budget = c.gc_max_removals_per_round
        for _ in range(c.shards if full else min(c.gc_shards_per_round, c.shards)):
            shard = self._next_shard
            self._next_shard = (shard + 1) % c.shards
            scan, expired = await self.scan_shard(shard)
            self._scans[shard] = scan
            self._put_bytes_since_scan.pop(shard, None)
            r.shards_scanned += 1
            for name, _ in expired[: max(budget, 0)]:
                budget -= 1
                if await self._remove_entry(shard, name, r):
                    r.expired += 1
                    self.expirations += 1
        r.tmp_removed = await self._clean_tmp(budget)
        budget -= r.tmp_removed
        r.estimated_bytes = self.estimated_bytes()
        if c.capacity_bytes is not None and r.estimated_bytes is not None:
            low = c.low_watermark * c.capacity_bytes
            # Hysteresis: once above high, keep evicting (over as many bounded
            # rounds as it takes) until at or below low.
            if r.estimated_bytes > c.high_watermark * c.capacity_bytes:
                self._evicting = True
            if self._evicting:
                r.estimated_bytes = await self._evict(r.estimated_bytes, low, budget, r)
                self._evicting = r.estimated_bytes > low
        return r

    async def scan_shard(self, shard: int) -> tuple[ShardScan, list[tuple[str, EntryInfo]]]:
        """Entries and bytes of one shard, its oldest entries, and its expired ones."""
        now_ns = time.time_ns()
        entries = 0
        nbytes = 0
        expired: list[tuple[str, EntryInfo]] = []
        oldest: list[tuple[int, str, int, int]] = []  # max-heap by negated access time
        keep = self.config.gc_candidates_per_shard
        chained: set[str] = set()
        async for page in self._entries.store.kv_list(self._entries.shard_dirs[shard]):
            for name, info in page:
                if info is None:
                    continue
                if "~" in name:
                    chained.add(name.split("~", 1)[0])
                if self._entries.expired(info, now_ns):
                    expired.append((name, info))
                    continue
                entries += 1
                nbytes += info.size
                item = (-info.last_access_ns, name, info.size, info.ino)
                if len(oldest) < keep:
                    heapq.heappush(oldest, item)
                elif item > oldest[0]:
                    heapq.heapreplace(oldest, item)
        candidates = sorted((-a, name, size, ino) for a, name, size, ino in oldest)
        return ShardScan(entries, nbytes, candidates, chained), expired

    async def _evict(self, total: int, low: float, budget: int, r: GcRound) -> int:
        """Remove the least recently used candidates until ``total <= low``; the new total."""
        merged = heapq.merge(
            *(
                [(a, s, name, size, ino) for a, name, size, ino in scan.candidates]
                for s, scan in self._scans.items()
            )
        )
        removed: dict[int, set[str]] = collections.defaultdict(set)
        for _, shard, name, size, ino in merged:
            if total <= low or budget <= 0:
                break
            if ino in self._entries.pins:
                continue  # this process is reading it
            budget -= 1
            scan = self._scans[shard]
            if await self._remove_entry(shard, name, r):
                r.evicted += 1
                self.evictions += 1
            # Gone either way (removed now or by someone else): no longer counted.
            total -= size
            scan.bytes -= size
            scan.entries -= 1
            removed[shard].add(name)
        for shard, names in removed.items():
            scan = self._scans[shard]
            scan.candidates = [c for c in scan.candidates if c[1] not in names]
        return total

    async def _remove_entry(self, shard: int, name: str, r: GcRound) -> bool:
        path = f"{self._entries.shard_dirs[shard]}/{name}"
        scan = self._scans.get(shard)
        may_chain = scan is None or name.split("~", 1)[0] in scan.chained
        try:
            (removed,) = await self._entries.remove([path], [may_chain])
            return removed
        except ChainfsError as e:
            r.errors.append(f"{path}: {e}")
            log.warning("kvcache: could not remove %s: %s", path, e)
            return False

    async def _clean_tmp(self, budget: int) -> int:
        """Remove temp files of writers that died (older than tmp_max_age_s)."""
        if budget <= 0:
            return 0
        tmp_dir = self._entries.tmp_dir
        cutoff_ns = time.time_ns() - int(self.config.tmp_max_age_s * NS_PER_S)
        removed = 0
        async for page in self._entries.store.kv_list(tmp_dir):
            for name, info in page:
                if info is None or info.mtime_ns > cutoff_ns:
                    continue
                with contextlib.suppress(ChainfsError):
                    if await self._entries.store.kv_unlink(f"{tmp_dir}/{name}"):
                        removed += 1
                if removed >= budget:
                    return removed
        return removed


class AccessTimes(Periodic):
    """Records entries' access times for LRU eviction, relatime style: at most once
    per atime_granularity_s per entry, queued (bounded; dropped when full)."""

    name = "kvcache-atime"

    def __init__(self, entries: Entries, enabled: bool) -> None:
        super().__init__(entries.config.gc_interval_s)
        self._store = entries.store
        self.config = entries.config
        self.enabled = enabled
        self._queue: dict[str, int] = {}  # path -> access ns (insertion ordered, bounded)
        self._parallel = asyncio.Semaphore(self.config.atime_parallel)

    def is_current(self, info: EntryInfo, now_ns: int) -> bool:
        """Whether a read of ``info``'s entry now needs no access-time update
        (reads only settings: safe from any thread)."""
        return (
            not self.enabled
            or now_ns - info.last_access_ns < self.config.atime_granularity_s * NS_PER_S
        )

    def note(self, path: str, info: EntryInfo, now_ns: int) -> bool:
        """Queue an access-time update if the recorded one is older than the
        granularity; whether ``info``'s access time is now out of date."""
        if self.is_current(info, now_ns):
            return False
        if path not in self._queue and len(self._queue) >= self.config.atime_queue_max:
            return False  # bounded: drop (the LRU order is approximate anyway)
        self._queue[path] = now_ns
        self.wake()
        return True

    async def round(self) -> bool:
        batch = list(self._queue.items())[: self.config.atime_queue_max]
        for p, _ in batch:
            del self._queue[p]
        await asyncio.gather(*(self._record(p, ns) for p, ns in batch))
        return bool(self._queue)

    async def flush(self) -> None:
        """Record every queued access time now."""
        while await self.round():
            pass

    async def _record(self, path: str, ns: int) -> None:
        async with self._parallel:
            try:
                await self._store.kv_set_atime(path, ns)
            except ChainfsError as e:
                log.debug("kvcache: atime of %s not recorded: %s", path, e)
