"""The transactional key-value interface every chainfs service builds on.

``await store.transact(fn)`` runs ``await fn(tx)`` against a consistent
snapshot. Reads see the snapshot plus the transaction's own buffered writes;
writes are buffered and applied atomically at commit. Commit validates the
read set (every key read and every range scanned) against commits made since
the snapshot; a conflict re-runs ``fn`` with a new snapshot, with bounded
exponential backoff (FoundationDB's model). ``fn`` may therefore run more than
once and must not have side effects outside ``tx``.

Backends supply three primitives (:class:`Backend`); the buffering, read-your-
writes merge, read-set tracking and retry loop live here once.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from chainfs.common.errors import ChainfsError, Code

T = TypeVar("T")

_CLEARED = None  # a buffered write of None means "clear"
MAX_PREFETCH_KEYS = 256  # keys one transact() may ask to read at begin
MAX_CACHED_READS = 4096  # point reads one transaction keeps (later ones read again)
MAX_PREFETCH_RANGES = 8  # ranges one transact() may ask to read at begin ...
MAX_PREFETCH_RANGE_ROWS = 65536  # ... each limited to at most this many pairs

# A range to read at begin: [begin, end) in key order, up to ``limit`` pairs.
PrefetchRange = tuple[bytes, bytes, int]


class TxnConflict(ChainfsError):
    """A commit lost to a concurrent writer; transact() retries it."""

    def __init__(self, message: str = "transaction conflict") -> None:
        super().__init__(Code.TXN_CONFLICT, message)


class TxnTooOld(ChainfsError):
    """The snapshot is older than the store can still validate or read
    (rocksdb: past the commit log; etcd: compacted); transact() retries it."""

    def __init__(self, message: str = "transaction too old") -> None:
        super().__init__(Code.TXN_TOO_OLD, message)


@dataclass
class RetryPolicy:
    max_attempts: int = 20  # commits tried before TXN_CONFLICT reaches the caller
    backoff_initial_ms: float = 1.0
    backoff_max_ms: float = 200.0

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0 <= self.backoff_initial_ms <= self.backoff_max_ms:
            raise ValueError("need 0 <= backoff_initial_ms <= backoff_max_ms")


@dataclass
class ReadSet:
    keys: set[bytes] = field(default_factory=set)
    ranges: list[tuple[bytes, bytes]] = field(default_factory=list)  # [begin, end)

    def __bool__(self) -> bool:
        return bool(self.keys or self.ranges)


class Snapshot(ABC):
    """A backend's consistent point-in-time view."""

    # Values read at begin with the snapshot (transact's ``prefetch``), by key.
    ahead: Mapping[bytes, bytes | None] = MappingProxyType({})
    # Ranges read at begin (``prefetch_ranges``): (begin, end) -> (limit, the
    # pairs found, whether they are all the range holds).
    ahead_ranges: Mapping[tuple[bytes, bytes], tuple[int, list[tuple[bytes, bytes]], bool]] = (
        MappingProxyType({})
    )

    @abstractmethod
    async def get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    async def get_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` (0 = all) pairs with begin <= key < end, ordered."""

    async def get_many(self, keys: list[bytes]) -> dict[bytes, bytes | None]:
        """The value (None: absent) of each of ``keys`` (distinct). A store whose
        reads are round trips reads them all in one."""
        return {k: await self.get(k) for k in keys}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources held by the snapshot."""


class Transaction:
    """Buffered transaction over a :class:`Snapshot`."""

    def __init__(self, snapshot: Snapshot, read_only: bool = False, durable: bool = True) -> None:
        self._snap = snapshot
        self.read_only = read_only
        # False: the commit may be acknowledged before it is on disk (a store
        # that can tell: rocksdb); it is still serialized and visible at once.
        self.durable = durable
        self.reads = ReadSet()
        # Buffered writes: key -> value, or None for a clear.
        self.writes: dict[bytes, bytes | None] = {}
        self.cleared_ranges: list[tuple[bytes, bytes]] = []
        self._write_keys_sorted: list[bytes] = []
        # Point reads of the snapshot, which cannot change under it: those read
        # ahead at begin, then the others as fn reads them. A key read again
        # costs no second round trip (the read set is kept as without it).
        self._cached_reads: dict[bytes, bytes | None] = dict(snapshot.ahead)

    # -- reads -------------------------------------------------------------
    def _range_cleared(self, key: bytes) -> bool:
        return any(b <= key < e for b, e in self.cleared_ranges)

    async def get(self, key: bytes, snapshot: bool = False) -> bytes | None:
        """Value of ``key``; ``snapshot=True`` does not add it to the read set."""
        if type(key) is not bytes:
            _check_key(key)
        if key in self.writes:
            return self.writes[key]
        if not snapshot:
            self.reads.keys.add(key)
        if self.cleared_ranges and self._range_cleared(key):
            return None
        cached = self._cached_reads
        if key in cached:
            return cached[key]
        value = await self._snap.get(key)
        if len(cached) < MAX_CACHED_READS:
            cached[key] = value
        return value

    async def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        """``[await self.get(k) for k in keys]``, with the keys not yet read
        fetched from the snapshot together (one round trip where reads are
        round trips). Each key joins the read set as by ``get``."""
        for key in keys:
            if type(key) is not bytes:
                _check_key(key)
        cached = self._cached_reads
        missing = [
            k
            for k in dict.fromkeys(keys)
            if k not in self.writes
            and k not in cached
            and not (self.cleared_ranges and self._range_cleared(k))
        ]
        fetched = await self._snap.get_many(missing) if missing else {}
        for k in missing:
            if len(cached) >= MAX_CACHED_READS:
                break
            cached[k] = fetched[k]
        out: list[bytes | None] = []
        for key in keys:
            if key in self.writes:
                out.append(self.writes[key])
                continue
            self.reads.keys.add(key)
            if self.cleared_ranges and self._range_cleared(key):
                out.append(None)
            else:
                out.append(fetched[key] if key in fetched else cached[key])
        return out

    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[tuple[bytes, bytes]]:
        """Pairs with begin <= key < end in key order (descending if reverse)."""
        _check_key(begin)
        _check_key(end)
        if limit < 0:
            raise ChainfsError(Code.EINVAL, "limit must be >= 0")
        if begin >= end:
            return []
        if not self.cleared_ranges and self._buffered_in(begin, end) == 0:
            # Nothing of ours in the range: the snapshot's answer is the answer.
            rows = self._read_ahead(begin, end, limit, reverse)
            if rows is None:
                rows = await self._snap.get_range(begin, end, limit, reverse)
            if not snapshot:
                self._record_range(begin, end, [k for k, _ in rows], limit, reverse)
            return rows
        # Page through the snapshot until `limit` results survive our own
        # buffered clears and writes, or the snapshot range is exhausted.
        kept: dict[bytes, bytes] = {}
        lo, hi = begin, end
        edge: bytes | None = None  # last snapshot key seen when not exhausted
        while True:
            want = 0 if limit == 0 else max(limit - len(kept), 1) + self._buffered_in(lo, hi)
            chunk = await self._snap.get_range(lo, hi, want, reverse)
            for k, v in chunk:
                if k not in self.writes and not self._range_cleared(k):
                    kept[k] = v
            if want == 0 or len(chunk) < want:
                edge = None
                break
            edge = chunk[-1][0]
            covered = (edge, end) if reverse else (begin, edge + b"\x00")
            if len(kept) + self._buffered_values_in(*covered) >= limit:
                break
            if reverse:
                hi = self._skip_cleared_down(edge)
            else:
                lo = self._skip_cleared_up(edge + b"\x00")
            if lo >= hi:
                edge = None
                break
        # Keys past `edge` are unknown in the snapshot: leave our writes there out too.
        w_lo, w_hi = begin, end
        if edge is not None:
            w_lo, w_hi = (edge, end) if reverse else (begin, edge + b"\x00")
        merged = kept
        i = bisect.bisect_left(self._write_keys_sorted, w_lo)
        j = bisect.bisect_left(self._write_keys_sorted, w_hi)
        for k in self._write_keys_sorted[i:j]:
            buffered = self.writes[k]
            if buffered is not None:
                merged[k] = buffered
        keys = sorted(merged, reverse=reverse)
        if limit:
            keys = keys[:limit]
        if not snapshot:
            self._record_range(begin, end, keys, limit, reverse)
        return [(k, merged[k]) for k in keys]

    def _read_ahead(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[tuple[bytes, bytes]] | None:
        """The snapshot's answer from a range read at begin, if that read holds it."""
        ahead = self._snap.ahead_ranges.get((begin, end)) if not reverse else None
        if ahead is None:
            return None
        read_limit, rows, complete = ahead
        if complete:
            return rows[:limit] if limit else list(rows)
        if limit and limit <= read_limit:
            return rows[:limit]
        return None

    def _buffered_in(self, begin: bytes, end: bytes) -> int:
        """Buffered writes and clears of single keys in [begin, end)."""
        lo = bisect.bisect_left(self._write_keys_sorted, begin)
        hi = bisect.bisect_left(self._write_keys_sorted, end)
        return hi - lo

    def _buffered_values_in(self, begin: bytes, end: bytes) -> int:
        lo = bisect.bisect_left(self._write_keys_sorted, begin)
        hi = bisect.bisect_left(self._write_keys_sorted, end)
        return sum(1 for k in self._write_keys_sorted[lo:hi] if self.writes[k] is not None)

    def _skip_cleared_up(self, key: bytes) -> bytes:
        """The first key >= ``key`` not inside one of our cleared ranges."""
        moved = True
        while moved:
            moved = False
            for b, e in self.cleared_ranges:
                if b <= key < e:
                    key, moved = e, True
        return key

    def _skip_cleared_down(self, end: bytes) -> bytes:
        """The lowest ``end`` such that no uncleared key lies in [end, old end)."""
        moved = True
        while moved:
            moved = False
            for b, e in self.cleared_ranges:
                if b < end <= e:
                    end, moved = b, True
        return end

    def _record_range(
        self, begin: bytes, end: bytes, keys: list[bytes], limit: int, reverse: bool
    ) -> None:
        # A limited scan only depends on the part of the range it covered.
        if limit and len(keys) == limit:
            if reverse:
                begin = keys[-1]
            else:
                end = keys[-1] + b"\x00"
        self.reads.ranges.append((begin, end))

    # -- writes ------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise ChainfsError(Code.EROFS, "write in a read-only transaction")

    def _note_key(self, key: bytes) -> None:
        if key not in self.writes:
            bisect.insort(self._write_keys_sorted, key)

    def set(self, key: bytes, value: bytes) -> None:
        self._check_writable()
        _check_key(key)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ChainfsError(Code.EINVAL, f"value must be bytes, not {type(value).__name__}")
        self._note_key(key)
        self.writes[key] = bytes(value)

    def clear(self, key: bytes) -> None:
        self._check_writable()
        _check_key(key)
        self._note_key(key)
        self.writes[key] = _CLEARED

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_writable()
        _check_key(begin)
        _check_key(end)
        if begin >= end:
            return
        lo = bisect.bisect_left(self._write_keys_sorted, begin)
        hi = bisect.bisect_left(self._write_keys_sorted, end)
        for k in self._write_keys_sorted[lo:hi]:
            self.writes[k] = _CLEARED
        self.cleared_ranges.append((begin, end))

    def add_read_conflict_key(self, key: bytes) -> None:
        """Make the commit conflict if ``key`` changed, without reading it."""
        self.reads.keys.add(key)

    @property
    def has_writes(self) -> bool:
        return bool(self.writes or self.cleared_ranges)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes):
        raise ChainfsError(Code.EINVAL, f"key must be bytes, not {type(key).__name__}")


class KVStore(ABC):
    """A transactional store. Subclasses implement the three primitives."""

    url: str = ""
    # Whether transact's ``prefetch`` saves round trips here (else it is ignored).
    prefetches = False

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self.stats = {"commits": 0, "conflicts": 0, "retries": 0}

    @abstractmethod
    async def _begin(self) -> Snapshot:
        """A snapshot at the latest committed state."""

    async def _begin_reading(
        self, keys: list[bytes], ranges: list[PrefetchRange] | None = None
    ) -> Snapshot:
        """As _begin; a store whose reads are round trips also reads ``keys``
        and ``ranges`` at the snapshot in the same one, into ``Snapshot.ahead``
        and ``Snapshot.ahead_ranges``."""
        return await self._begin()

    @abstractmethod
    async def _commit(self, snapshot: Snapshot, tx: Transaction) -> None:
        """Validate ``tx.reads`` against commits after ``snapshot`` and apply
        ``tx.writes`` and ``tx.cleared_ranges`` atomically and durably, or raise
        :class:`TxnConflict` and change nothing."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the store."""

    async def transact(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        read_only: bool = False,
        prefetch: list[bytes] | None = None,
        durable: bool = True,
        prefetch_ranges: list[PrefetchRange] | None = None,
    ) -> T:
        """Run ``fn(tx)`` in a transaction, retrying on conflict. Returns its result.

        ``prefetch``: keys ``fn`` will likely read (a hint, at most
        MAX_PREFETCH_KEYS). Where reads are round trips, they are read at begin
        in the same one, and ``tx.get`` of them costs nothing; a key joins the
        read set only when ``fn`` reads it. ``prefetch_ranges``: likewise,
        ranges ``fn`` will likely scan in key order (at most MAX_PREFETCH_RANGES,
        each of 1 to MAX_PREFETCH_RANGE_ROWS pairs); a scan of the same
        [begin, end) that the read at begin covers costs nothing.

        ``durable=False``: what a crash of this process may lose without harm
        (a store that syncs each commit anyway ignores it; rocksdb then skips
        waiting for the disk unless a durable commit shares the batch)."""
        keys = list(prefetch or ())
        if len(keys) > MAX_PREFETCH_KEYS:
            raise ChainfsError(Code.EINVAL, f"more than {MAX_PREFETCH_KEYS} keys to prefetch")
        for key in keys:
            _check_key(key)
        ranges = list(prefetch_ranges or ())
        if len(ranges) > MAX_PREFETCH_RANGES:
            raise ChainfsError(Code.EINVAL, f"more than {MAX_PREFETCH_RANGES} ranges to prefetch")
        for begin, end, limit in ranges:
            _check_key(begin)
            _check_key(end)
            if not 1 <= limit <= MAX_PREFETCH_RANGE_ROWS or begin >= end:
                raise ChainfsError(Code.EINVAL, f"bad prefetch range {begin!r}..{end!r} ({limit})")
        reads_ahead = bool(keys or ranges)
        delay_ms = self.retry.backoff_initial_ms
        for attempt in range(1, self.retry.max_attempts + 1):
            snap: Snapshot | None = None
            try:
                # Inside the try: a read ahead at begin may find its revision gone (TxnTooOld).
                snap = (
                    await self._begin_reading(keys, ranges) if reads_ahead else await self._begin()
                )
                tx = Transaction(snap, read_only=read_only, durable=durable)
                result = await fn(tx)
                if tx.has_writes:
                    await self._commit(snap, tx)
                    self.stats["commits"] += 1
                return result
            except (TxnConflict, TxnTooOld):
                self.stats["conflicts"] += 1
                if attempt == self.retry.max_attempts:
                    raise
            finally:
                if snap is not None:
                    snap.close()
            # Back off with the snapshot released (a rocksdb view pins memtables).
            self.stats["retries"] += 1
            await asyncio.sleep(random.uniform(0, delay_ms) / 1000.0)
            delay_ms = min(delay_ms * 2, self.retry.backoff_max_ms)
        raise AssertionError("unreachable")

    # Convenience single-operation transactions.
    async def get(self, key: bytes) -> bytes | None:
        return await self.transact(lambda tx: tx.get(key), read_only=True)

    async def set(self, key: bytes, value: bytes) -> None:
        async def fn(tx: Transaction) -> None:
            tx.set(key, value)

        await self.transact(fn)

    async def __aenter__(self) -> KVStore:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def merge_ranges(ranges: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Sorted, non-overlapping union of sorted [begin, end) ranges."""
    out: list[tuple[bytes, bytes]] = []
    for b, e in ranges:
        if b >= e:
            continue
        if out and b <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((b, e))
    return out


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    p = bytearray(prefix)
    while p:
        if p[-1] != 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\xff" * 64  # empty or all-0xff prefix: end of key space
