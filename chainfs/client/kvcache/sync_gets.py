"""Sync gets served by the calling thread: a key whose location is cached is
read with one storage request from the caller's thread, without the hop onto
the client's event-loop thread (which costs more CPU than the read itself).
The keys of a sync ``batch_get`` whose locations are cached are read the same
way, together: one frame per storage node, all sent before any reply is read.

Only a clean hit is served here: the location is in the location cache and
young enough (the same age rule as the loop path), the entry is not expired,
its access time needs no update, the value is at most ``sync_read_max_bytes``
and the entry sits in one chunk, one replica answered OK with every byte, and
the entry read is checked exactly as the loop path checks it (header, key,
length, CRC32C of the value: ``format.check_entry``). Anything else returns
None and the caller takes the loop path, which keeps all its semantics
(lookups, retries, failover, dropping a location that no longer holds the
entry): this path never returns bytes the loop path would not have returned
from the same cached location.

A get of a key with no cached location first looks its first name up at
meta (:meth:`SyncGets.prime`, from this thread when the handle knows the
entry's directory; else on the loop): meta's answer that no entry has that
name is the one miss decided here, as the loop path's lookup decides it.

Unlike the loop path it does not pin the inode against this handle's own
eviction: an entry evicted under the read fails the read or the check, and
the get falls back.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from chainfs.client import metrics as client_metrics
from chainfs.client.kvcache.backend import EntryInfo, SyncReader
from chainfs.client.kvcache.entries import Entries
from chainfs.client.kvcache.eviction import AccessTimes
from chainfs.client.kvcache.format import Check, Key, check_entry

_ON_THREAD = client_metrics.KV_SYNC_GETS.labels("thread")
_ON_LOOP = client_metrics.KV_SYNC_GETS.labels("loop")


class Unasked(enum.Enum):
    """``SyncGets.prime`` got no answer from meta (ask on the loop)."""

    UNASKED = 0


UNASKED = Unasked.UNASKED


class Missing(enum.Enum):
    """A key of a batch that meta says has no entry (the batch's answer: a miss)."""

    MISSING = 0


MISSING = Missing.MISSING


@dataclass
class SyncGetCounts:
    served: int = 0  # sync gets answered from the calling thread
    fallbacks: int = 0  # sync gets sent on to the loop path
    misses: int = 0  # gets a lookup from the calling thread answered as misses


class SyncGets:
    """The calling-thread part of sync gets (see the module docstring). Any
    number of threads may call :meth:`get` at once."""

    def __init__(self, entries: Entries, access: AccessTimes, reader: SyncReader) -> None:
        self._entries = entries
        self._access = access
        self._reader = reader
        self._max_value_bytes = entries.config.sync_read_max_bytes
        self._lock = threading.Lock()  # guards the counts
        self._counts = SyncGetCounts()

    def counts(self) -> SyncGetCounts:
        with self._lock:
            return dataclasses.replace(self._counts)

    @property
    def primes(self) -> bool:
        """Whether a get of a key with no cached location may look it up on the
        loop and then read it here (not when access times are recorded: the loop
        path queues them)."""
        return not self._access.enabled

    def prime(self, key: Key) -> bool | Unasked | None:
        """For a get of a key with no cached location: look its first name up at
        meta from this thread (``Entries.prime_now``). True: its location is
        cached now; False: no entry of that name (a miss, counted); None: that
        name holds another key's entry (the loop path probes on); UNASKED: no
        clean answer here, prime it on the loop."""
        got = self._entries.prime_now([key], self._reader)
        if got is None:
            return UNASKED
        found = got[0]
        if found is False:
            with self._lock:
                self._counts.misses += 1
            return False
        return None if found is None else True

    def get(self, key: Key, primed: bool = False) -> bytes | None:
        """``key``'s value if this thread can serve it cleanly; None: take the loop path.
        ``primed``: its location was just cached by a lookup for this get."""
        value = self._read(key, None, primed)
        self._count(value is not None, value is None)
        return None if value is None else bytes(value)

    def get_into(self, key: Key, out: memoryview, primed: bool = False) -> int | None:
        """Copy ``key``'s value into ``out`` (a writable byte view) and return its
        length if this thread can serve it cleanly; None: take the loop path
        (which also answers a value longer than ``out`` with ERANGE). ``out`` is
        written only once the entry has passed its check."""
        value = self._read(key, len(out), primed)
        self._count(value is not None, value is None)
        if value is None:
            return None
        out[: len(value)] = value
        return len(value)

    def get_many(self, keys: Sequence[Key]) -> list[bytes | Missing | None]:
        """Per key as :meth:`get`; the reads go out together, one frame per
        storage node, ``max_batch_keys`` keys at a time. Keys with no cached
        location are looked up first, together (:meth:`_prime_many`): MISSING
        for those meta says have no entry."""
        step = self._entries.config.max_batch_keys
        out: list[bytes | Missing | None] = []
        for lo in range(0, len(keys), step):
            values = self._read_many(keys[lo : lo + step], None)
            out.extend(v if v is None or v is MISSING else bytes(v) for v in values)
        return out

    def get_many_into(self, keys: Sequence[Key], outs: Sequence[memoryview]) -> list[int | None]:
        """Per key and buffer as :meth:`get_into` (-1 for a key meta says has
        no entry); the reads go out together."""
        step = self._entries.config.max_batch_keys
        lengths: list[int | None] = []
        for lo in range(0, len(keys), step):
            some = outs[lo : lo + step]
            for out, value in zip(some, self._read_many(keys[lo : lo + step], some), strict=True):
                if value is None:
                    lengths.append(None)
                elif value is MISSING:
                    lengths.append(-1)
                else:
                    out[: len(value)] = value
                    lengths.append(len(value))
        return lengths

    def _count(self, served: int, fallbacks: int) -> None:
        with self._lock:
            self._counts.served += served
            self._counts.fallbacks += fallbacks
        if served:
            _ON_THREAD.inc(served)  # thread-safe counters
        if fallbacks:
            _ON_LOOP.inc(fallbacks)

    def _readable(self, key: Key, room: int | None, primed: bool, now_ns: int) -> EntryInfo | None:
        """The cached entry this thread may read for ``key``, or None; ``room``:
        the most value bytes the caller can take (None: any)."""
        loc = self._entries.locations.get(key, take=not primed)
        return None if loc is None else self._usable(key, loc.info, room, now_ns)

    def _usable(self, key: Key, info: EntryInfo, room: int | None, now_ns: int) -> EntryInfo | None:
        """``info`` if this thread may read ``key``'s entry there (see _readable)."""
        if self._entries.expired(info, now_ns) or not self._access.is_current(info, now_ns):
            return None  # the loop path drops the location / queues the access time
        vlen = info.size - key.header_len
        if not 0 <= vlen <= self._max_value_bytes or (room is not None and vlen > room):
            return None
        return info

    def _read(self, key: Key, room: int | None, primed: bool) -> memoryview | None:
        """The checked value (a view of a fresh buffer), or None; ``room``: the
        most bytes the caller can take (None: any)."""
        info = self._readable(key, room, primed, time.time_ns())
        if info is None:
            return None
        buf = memoryview(bytearray(info.size))
        if not self._reader.read(info, buf):
            return None
        hlen = key.header_len
        if check_entry(key.raw, buf[:hlen], buf[hlen:]) is not Check.OK:
            return None  # the loop path reads it again and looks the key up anew
        return buf[hlen:]

    def _read_many(
        self, keys: Sequence[Key], outs: Sequence[memoryview] | None
    ) -> list[memoryview | Missing | None]:
        """Per key as :meth:`_read`, the reads sent together (MISSING: meta says
        no entry has the key's name); ``outs``: the buffers the values must fit
        (None: any length). Counted."""
        now_ns = time.time_ns()
        values: list[memoryview | Missing | None] = [None] * len(keys)
        infos: list[EntryInfo | None] = [
            self._readable(key, None if outs is None else len(outs[i]), False, now_ns)
            for i, key in enumerate(keys)
        ]
        if self.primes:
            self._prime_many(keys, outs, infos, values)
        reads: list[tuple[EntryInfo, memoryview]] = []
        at: list[int] = []  # the position in ``keys`` of each read
        for i, info in enumerate(infos):
            if info is not None:
                reads.append((info, memoryview(bytearray(info.size))))
                at.append(i)
        served = 0
        if reads:
            for i, (_, buf), ok in zip(at, reads, self._reader.read_many(reads), strict=True):
                hlen = keys[i].header_len
                if ok and check_entry(keys[i].raw, buf[:hlen], buf[hlen:]) is Check.OK:
                    values[i] = buf[hlen:]
                    served += 1
        missing = values.count(MISSING)
        self._count(served, len(keys) - served - missing)
        return values

    def _prime_many(
        self,
        keys: Sequence[Key],
        outs: Sequence[memoryview] | None,
        infos: list[EntryInfo | None],
        values: list[memoryview | Missing | None],
    ) -> None:
        """Look up, in one metadata batch from this thread, the keys of a batch
        with no cached location: fills ``infos`` for those now cached (the
        entries to read) and ``values`` with MISSING for those with no entry.
        Nothing is filled if meta gave no clean answer (the loop path looks
        them up), nor for a name holding another key's entry (its probes)."""
        locs = self._entries.locations
        todo = [i for i, info in enumerate(infos) if info is None and not locs.holds(keys[i])]
        if not todo:
            return
        got = self._entries.prime_now([keys[i] for i in todo], self._reader)
        if got is None:
            return
        now_ns = time.time_ns()
        misses = 0
        for i, found in zip(todo, got, strict=True):
            if found is False:
                values[i] = MISSING
                misses += 1
            elif found is not None:  # read from the answer: a batch may outgrow the cache
                room = None if outs is None else len(outs[i])
                infos[i] = self._usable(keys[i], found, room, now_ns)
        if misses:
            with self._lock:
                self._counts.misses += misses

    def close(self) -> None:
        self._reader.close()
