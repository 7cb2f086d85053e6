"""Reading found entries' values into buffers: the first chunk (header and the
value's start) into a pooled scratch buffer, later chunks straight into the
caller's buffer, one storage request per chunk, all checked after the read."""

from __future__ import annotations

from dataclasses import dataclass

from chainfs.client.kvcache.backend import EntryInfo
from chainfs.client.kvcache.entries import Entries
from chainfs.client.kvcache.format import Check, Key, check_entry
from chainfs.common.dataplane.buffers import BufferPool, PooledBuffer, fresh_buffer
from chainfs.common.errors import ChainfsError, Code

Value = bytes | memoryview  # a value read: new bytes, or a view of the caller's buffer
# Entries up to this size are read into a new buffer, not a pooled one: allocating
# and zero-filling it costs less than the pool's bookkeeping (0.24 against 0.85 us
# for 4 KiB); larger ones use the pool (no page faults or zero-fill per read).
POOL_MIN_BYTES = 16 * 1024


@dataclass
class _ValueRead:
    """One value being read: its first chunk (header and the value's start) into a
    scratch buffer, the rest straight into the caller's buffer (or a new one)."""

    index: int
    info: EntryInfo
    head: memoryview
    lease: PooledBuffer | None  # the pool's, when ``head`` came from it
    rest: memoryview | None
    out: memoryview | None

    def items(self) -> list[tuple[EntryInfo, int, memoryview]]:
        """The chunk reads: one request per chunk (storage checks a whole chunk's
        CRC for every request, so two on one chunk would cost it twice)."""
        first = [(self.info, 0, self.head)]
        return first if self.rest is None else [*first, (self.info, len(self.head), self.rest)]


class ValueReads:
    """Reads values for the lookups of :meth:`Entries.find`; see the module docstring."""

    def __init__(self, entries: Entries) -> None:
        self._entries = entries
        size = entries.config.scratch_pool_bytes
        self._pool = BufferPool(size, size) if size else None

    def close(self) -> None:
        """Unmap the idle scratch buffers."""
        if self._pool is not None:
            self._pool.clear()

    async def read(
        self,
        keys: list[Key],
        outs: list[memoryview | None],
        result: list[Value | ChainfsError | None],
        candidates: list[tuple[int, EntryInfo]],
    ) -> list[Check | None]:
        """Read and check the candidates' entries; a whole value goes into ``result``."""
        planned = [self._plan(keys[i], i, info, outs[i], result) for i, info in candidates]
        reads = [r for r in planned if r is not None]
        if not reads:
            return [None] * len(planned)
        self._entries.pin(r.info.ino for r in reads)
        try:
            await self._entries.store.kv_read_many([item for r in reads for item in r.items()])
            return [None if r is None else self._take(keys[r.index], r, result) for r in planned]
        finally:
            self._entries.unpin(r.info.ino for r in reads)
            for r in reads:
                if r.lease is not None:
                    r.lease.release()

    def _plan(
        self,
        key: Key,
        index: int,
        info: EntryInfo,
        out: memoryview | None,
        result: list[Value | ChainfsError | None],
    ) -> _ValueRead | None:
        """The buffers one value is read into; None (ERANGE in ``result``) when it
        does not fit the caller's buffer."""
        hlen = key.header_len
        vlen = info.size - hlen
        if out is not None and len(out) < vlen:
            result[index] = ChainfsError(
                Code.ERANGE,
                f"value of {vlen} bytes does not fit a {len(out)}-byte buffer",
                key.display(),
            )
            return None
        first = min(info.size, info.layout.chunk_size)
        lease = self._lease(first)
        head = fresh_buffer(first) if lease is None else lease.view
        rest: memoryview | None = None
        if info.size > first:
            rest = out[first - hlen : vlen] if out is not None else fresh_buffer(info.size - first)
        return _ValueRead(index, info, head, lease, rest, out)

    def _lease(self, nbytes: int) -> PooledBuffer | None:
        """A pooled scratch buffer, or None when the pool is off or full, or when
        a new buffer is cheaper (up to POOL_MIN_BYTES)."""
        pool = self._pool
        if pool is None or nbytes > pool.capacity_bytes or nbytes <= POOL_MIN_BYTES:
            return None
        return pool.try_acquire(nbytes)

    @staticmethod
    def _take(key: Key, r: _ValueRead, result: list[Value | ChainfsError | None]) -> Check:
        """Check what was read; a whole entry's value goes into ``result``."""
        hlen = key.header_len
        start = r.head[hlen:]
        if r.rest is None and r.out is None:
            # The value in one part, returned as new bytes: copied once, and
            # checked in that copy (a small view would be copied for its CRC too).
            value = start.tobytes()
            verdict = check_entry(key.raw, r.head[:hlen], value)
            if verdict is Check.OK:
                result[r.index] = value
            return verdict
        parts = [start] if r.rest is None else [start, r.rest]
        verdict = check_entry(key.raw, r.head[:hlen], parts)
        if verdict is Check.OK:
            if r.out is not None:
                r.out[: len(start)] = start
                result[r.index] = r.out[: r.info.size - hlen]
            else:
                result[r.index] = b"".join(parts)
        return verdict
