"""In-memory multi-version store for unit tests (single process)."""

from __future__ import annotations

import bisect

from chainfs.kv.base import KVStore, RetryPolicy, Snapshot, Transaction, TxnConflict, TxnTooOld

_MAX_LOG = 100_000  # commit records kept for conflict checks


class _MemorySnapshot(Snapshot):
    def __init__(self, store: MemoryStore, version: int) -> None:
        self.store = store
        self.version = version

    def _value_at(self, key: bytes) -> bytes | None:
        history = self.store._history.get(key)
        if not history:
            return None
        i = bisect.bisect_right(history, self.version, key=lambda h: h[0])
        return history[i - 1][1] if i else None

    async def get(self, key: bytes) -> bytes | None:
        return self._value_at(key)

    async def get_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[tuple[bytes, bytes]]:
        keys = self.store._keys
        lo = bisect.bisect_left(keys, begin)
        hi = bisect.bisect_left(keys, end)
        span = keys[lo:hi]
        if reverse:
            span = span[::-1]
        out: list[tuple[bytes, bytes]] = []
        for k in span:
            v = self._value_at(k)
            if v is not None:
                out.append((k, v))
                if limit and len(out) >= limit:
                    break
        return out


class MemoryStore(KVStore):
    url = "memory://"

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        super().__init__(retry)
        self._version = 0
        self._keys: list[bytes] = []  # every key ever written, sorted
        self._history: dict[bytes, list[tuple[int, bytes | None]]] = {}
        # (commit version, keys written, ranges cleared), oldest first.
        self._log: list[tuple[int, set[bytes], list[tuple[bytes, bytes]]]] = []

    async def _begin(self) -> Snapshot:
        return _MemorySnapshot(self, self._version)

    async def _commit(self, snapshot: Snapshot, tx: Transaction) -> None:
        assert isinstance(snapshot, _MemorySnapshot)
        read_version = snapshot.version
        if self._log and self._log[0][0] > read_version + 1 and len(self._log) >= _MAX_LOG:
            raise TxnTooOld("transaction too old to validate")
        start = bisect.bisect_right(self._log, read_version, key=lambda e: e[0])
        for _, written, cleared in self._log[start:]:
            if _conflicts(tx, written, cleared):
                raise TxnConflict()
        self._version += 1
        v = self._version
        written = set(tx.writes)
        for b, e in tx.cleared_ranges:
            lo = bisect.bisect_left(self._keys, b)
            hi = bisect.bisect_left(self._keys, e)
            for k in self._keys[lo:hi]:
                if k not in tx.writes:
                    self._history[k].append((v, None))
        for k, val in tx.writes.items():
            if k not in self._history:
                bisect.insort(self._keys, k)
                self._history[k] = []
            self._history[k].append((v, val))
        self._log.append((v, written, list(tx.cleared_ranges)))
        if len(self._log) > _MAX_LOG:
            del self._log[: len(self._log) - _MAX_LOG]


def _conflicts(tx: Transaction, written: set[bytes], cleared: list[tuple[bytes, bytes]]) -> bool:
    reads = tx.reads
    if reads.keys & written:
        return True
    for k in written:
        if any(b <= k < e for b, e in reads.ranges):
            return True
    for cb, ce in cleared:
        if any(cb <= k < ce for k in reads.keys):
            return True
        if any(b < ce and cb < e for b, e in reads.ranges):
            return True
    return False
