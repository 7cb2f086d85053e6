"""The location cache: where a key's entry was, as meta last said, so that a
repeated get is one storage read and no metadata call.

An entry is trusted for ``location_cache_ms`` from the moment the lookup that
found it (or the renewal that re-checked it) was sent to meta, never longer, so
another client's remove or overwrite is seen within that time; at most
``location_cache_entries`` are kept (least recently used dropped first). This
handle's own puts, removes and evictions drop the entries they touch at once.
What a cached location leads to is still read and checked (key, length,
CRC32C) like any read; a check that fails, or storage refusing the read, sends
the key back to the metadata lookup.

Renewal: the locations that gets take are stat'ed again in the background, in
metadata batches, once they are two thirds as old as they may be; the same file
(inode, size, mtime) stays trusted from the renewal on, anything else is
dropped. Locations no get took for RENEW_IDLE_FACTOR trusted ages age out, and
so does a location no get has yet taken from the cache (only its lookup's get
read it) once it was renewed RENEW_UNTAKEN_MAX times: a key read once is not
stat'ed again for seconds after.

Thread safety: sync gets read the cache from their callers' threads (the
sync fast path, ``sync_gets.py``) while the loop thread looks keys up and
renews them, so every method runs under one lock (re-made in a fork()ed child,
where a thread that held it at fork time no longer exists).

The READ capability of an entry's inode is the connection's
(``chainfs.client.caps``), renewed from meta before it expires however long a
location is trusted.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from chainfs.client import metrics as client_metrics
from chainfs.client.kvcache.backend import EntryInfo
from chainfs.client.kvcache.format import Key
from chainfs.common.background import Periodic

_RENEWALS = client_metrics.KV_META_STATS.labels("renewal")

NS_PER_MS = 1_000_000
# Locations taken by a get within this many trusted ages are renewed in the
# background; idler ones age out (a renewal must not cost more than the lookups it saves).
RENEW_IDLE_FACTOR = 4
# Renewals of a location whose lookup's get is the only one that took it so far:
# a key read once costs at most this many stats more (a second get within its
# trusted age, or after this renewal, makes it renewable while in use).
RENEW_UNTAKEN_MAX = 1
# A location in use is renewed once this old (a fraction of the trusted age) ...
RENEW_AT_AGE = 2 / 3
# ... by renewal rounds this many times per trusted age (so at most a sixth of
# it after RENEW_AT_AGE: the margin for a slow round before the location expires).
RENEW_ROUNDS_PER_AGE = 6
# Metadata batches (of max_batch_keys) per renewal round.
RENEW_BATCHES_PER_ROUND = 2
RENEW_MIN_INTERVAL_S = 0.01  # renewal rounds at most this often, however short the age
# Recent drops remembered by key and name, to judge lookups in flight; a lookup
# older than the oldest forgotten one is not kept (bounded memory, conservative).
DROPS_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class Located:
    """A key's entry, found and checked."""

    probe: int
    info: EntryInfo


@dataclass(slots=True)
class _Cached:
    loc: Located
    path: str  # the entry's file
    base: str  # the entry's name without its probe suffix (what removals name)
    looked_up_ns: int  # monotonic: when the lookup that found it was sent to meta
    last_used_ns: int = 0  # monotonic: when a get last took it (0: not yet)
    taken: bool = False  # a get took it from the cache (not only the lookup's get)
    untaken_renewals: int = 0  # renewals while not yet taken (RENEW_UNTAKEN_MAX)


class LocationCache:
    """Raw key -> its located entry, bounded in entries and in age (module docstring)."""

    def __init__(self, max_entries: int, max_age_ms: float) -> None:
        assert max_entries >= 0 and max_age_ms >= 0
        self.max_entries = max_entries
        self._max_age_ns = int(max_age_ms * NS_PER_MS)
        self._by_key: collections.OrderedDict[bytes, _Cached] = collections.OrderedDict()
        self._by_base: dict[str, set[bytes]] = {}
        # Keys taken by gets lately (an ordered set): what the renewer looks at.
        self._active: dict[bytes, None] = {}
        # Bumped by every drop. A lookup records it when it begins; its answer is not
        # kept if its key or name was dropped since (so it cannot bring back what
        # this handle just changed), other keys' drops notwithstanding.
        self.generation = 0
        self._dropped: collections.OrderedDict[bytes | str, int] = collections.OrderedDict()
        self._dropped_floor = 0  # lookups older than the forgotten drop records are refused
        self._lock = threading.Lock()
        _caches.add(self)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self._max_age_ns > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)

    def holds(self, key: Key) -> bool:
        """Whether ``key`` has a cached location young enough (nothing marked used)."""
        with self._lock:
            c = self._by_key.get(key.raw)
            return c is not None and time.monotonic_ns() - c.looked_up_ns < self._max_age_ns

    def get(self, key: Key, now_ns: int | None = None, take: bool = True) -> Located | None:
        """``key``'s entry if one is cached and young enough (monotonic ``now_ns``).
        ``take`` False: the get of the lookup that just cached it (not a get that
        found it cached: see RENEW_UNTAKEN_MAX)."""
        with self._lock:
            c = self._by_key.get(key.raw)
            if c is None:
                return None
            now = time.monotonic_ns() if now_ns is None else now_ns
            if now - c.looked_up_ns >= self._max_age_ns:
                self._remove(key.raw, c)
                return None
            self._by_key.move_to_end(key.raw)
            if not c.last_used_ns:
                self._active[key.raw] = None
            c.last_used_ns = now
            c.taken = c.taken or take
            return c.loc

    def put(
        self,
        key: Key,
        loc: Located,
        path: str,
        base: str,
        looked_up_ns: int,
        generation: int,
        used: bool,
    ) -> bool:
        """Remember ``key``'s entry (file ``path``) found by a lookup sent at
        ``looked_up_ns``, unless something was dropped since that lookup began
        (``generation``): False then (or when the cache is off). ``used``:
        found for a get (renewed while gets go on)."""
        with self._lock:
            if not self.enabled or self._stale(key.raw, base, generation):
                return False
            old = self._by_key.get(key.raw)
            if old is not None:
                self._remove(key.raw, old)
            self._by_key[key.raw] = c = _Cached(loc, path, base, looked_up_ns)
            if used:
                c.last_used_ns = looked_up_ns
                self._active[key.raw] = None
            self._by_base.setdefault(base, set()).add(key.raw)
            while len(self._by_key) > self.max_entries:
                raw, c = self._by_key.popitem(last=False)
                self._active.pop(raw, None)
                self._unindex(raw, c.base)
            return True

    def drop_keys(self, keys: Iterable[Key]) -> None:
        with self._lock:
            self.generation += 1
            for key in keys:
                self._note_drop(key.raw)
                c = self._by_key.get(key.raw)
                if c is not None:
                    self._remove(key.raw, c)

    def drop_bases(self, bases: Iterable[str]) -> None:
        """Forget every key whose entry is named ``base`` or ``base~<probe>``."""
        with self._lock:
            self.generation += 1
            for base in bases:
                self._note_drop(base)
                for raw in self._by_base.pop(base, ()):
                    self._by_key.pop(raw, None)
                    self._active.pop(raw, None)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._dropped_floor = self.generation
            self._dropped.clear()
            self._by_key.clear()
            self._by_base.clear()
            self._active.clear()

    def _note_drop(self, what: bytes | str) -> None:
        self._dropped[what] = self.generation
        self._dropped.move_to_end(what)
        while len(self._dropped) > DROPS_REMEMBERED:
            _, generation = self._dropped.popitem(last=False)
            self._dropped_floor = max(self._dropped_floor, generation)

    def _stale(self, raw: bytes, base: str, generation: int) -> bool:
        """Whether a lookup begun at ``generation`` may have missed a drop of
        ``raw`` (the key) or ``base`` (its name)."""
        if generation < self._dropped_floor:
            return True
        dropped = self._dropped
        return dropped.get(raw, -1) > generation or dropped.get(base, -1) > generation

    def _remove(self, raw: bytes, c: _Cached) -> None:
        del self._by_key[raw]
        self._active.pop(raw, None)
        self._unindex(raw, c.base)

    def _unindex(self, raw: bytes, base: str) -> None:
        raws = self._by_base.get(base)
        if raws is not None:
            raws.discard(raw)
            if not raws:
                del self._by_base[base]

    # -- renewal: a location in use is checked at meta before it is too old ----------
    def due(self, now_ns: int, limit: int) -> list[tuple[bytes, str, int]]:
        """(key, path, inode) of at most ``limit`` entries taken by a get within the
        last RENEW_IDLE_FACTOR trusted ages and older than RENEW_AT_AGE of the trusted age:
        what a renewal round stats again. Entries idle longer, and entries no get
        took from the cache by RENEW_UNTAKEN_MAX renewals, are left to age out."""
        with self._lock:
            renew_ns = int(self._max_age_ns * RENEW_AT_AGE)
            idle_ns = self._max_age_ns * RENEW_IDLE_FACTOR
            due: list[tuple[bytes, str, int]] = []
            for raw in list(self._active):
                c = self._by_key.get(raw)
                if (
                    c is None
                    or now_ns - c.last_used_ns > idle_ns
                    or (not c.taken and c.untaken_renewals >= RENEW_UNTAKEN_MAX)
                ):
                    del self._active[raw]
                    if c is not None:
                        c.last_used_ns = 0  # a get that takes it makes it active again
                elif now_ns - c.looked_up_ns >= renew_ns and len(due) < limit:
                    due.append((raw, c.path, c.loc.info.ino))
            return due

    def renew(
        self, raw: bytes, ino: int, info: EntryInfo | None, looked_up_ns: int, generation: int
    ) -> None:
        """Take a renewal's stat of one entry: the same file (inode, size, mtime)
        is trusted from ``looked_up_ns`` on; anything else drops the key."""
        with self._lock:
            c = self._by_key.get(raw)
            if c is None or c.loc.info.ino != ino:
                return  # dropped, or looked up anew, meanwhile
            old = c.loc.info
            if (
                self._stale(raw, c.base, generation)
                or info is None
                or (info.ino, info.size, info.mtime_ns) != (old.ino, old.size, old.mtime_ns)
            ):
                self._remove(raw, c)
                return
            c.loc = Located(c.loc.probe, info)
            c.looked_up_ns = max(c.looked_up_ns, looked_up_ns)
            if not c.taken:
                c.untaken_renewals += 1


# Location caches of this process: a fork()ed child gives each a new lock.
_caches: weakref.WeakSet[LocationCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_caches):
        cache._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LocationRenewer(Periodic):
    """Stats the locations in use again before they grow too old to trust, in
    metadata batches, so that a steady reader of a working set that fits the
    cache keeps finding its keys there (one batch per max_batch_keys keys per
    renewal age, instead of a lookup per get)."""

    name = "kvcache-locations"
    fixed_rate = True

    def __init__(
        self,
        cache: LocationCache,
        stat: Callable[[list[str]], Awaitable[list[EntryInfo | None]]],
        max_batch: int,
        max_age_ms: float,
    ) -> None:
        super().__init__(max(RENEW_MIN_INTERVAL_S, max_age_ms / RENEW_ROUNDS_PER_AGE / 1000))
        self._cache = cache
        self._stat = stat
        self._max_batch = max_batch
        self.renewed = 0  # entries renewed (counted for tests and stats)

    async def round(self) -> bool:
        due = self._cache.due(time.monotonic_ns(), RENEW_BATCHES_PER_ROUND * self._max_batch)
        for lo in range(0, len(due), self._max_batch):
            part = due[lo : lo + self._max_batch]
            looked_up_ns, generation = time.monotonic_ns(), self._cache.generation
            infos = await self._stat([path for _, path, _ in part])
            for (raw, _, ino), info in zip(part, infos, strict=True):
                self._cache.renew(raw, ino, info, looked_up_ns, generation)
            self.renewed += len(part)
            _RENEWALS.inc(len(part))
        return False
