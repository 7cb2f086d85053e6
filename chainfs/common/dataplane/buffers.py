"""A bounded pool of large receive buffers (anonymous mmaps, reused by size class).

Why mmap: ``bytearray(n)`` zero-fills (a memset of up to 64 MiB per request);
an anonymous mapping is zeroed lazily by the kernel, once, and reusing it
from the pool costs nothing. Size classes are powers of two from 4 KiB up to
64 MiB, then whole MiB, so a reused buffer wastes at most half its size.

Bound: bytes in use plus bytes cached never exceed ``capacity_bytes``; free
buffers are kept for reuse up to ``cached_bytes`` and unmapped beyond (or
when a different size class needs the room). A request that does not fit
waits (``acquire``) or gets ``None`` (``try_acquire``) and queues a callback
(``when_available``), which is how a server connection stops reading until
memory frees up.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections import deque
from collections.abc import Callable

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.units import MiB as _MiB

MIN_CLASS_BYTES = 4096
_POW2_LIMIT = 64 * 1024 * 1024


_HUGE_MIN_BYTES = 2 * _MiB  # mappings this large ask for transparent huge pages


def map_anonymous(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping; large ones with MADV_HUGEPAGE.

    First-touch cost of 64 MiB measured here: ~60-80 ms as a bytearray
    (4 KiB page faults plus memset), ~8 ms with huge pages.
    """
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= _HUGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    return mm


def fresh_buffer(nbytes: int) -> memoryview:
    """A new writable buffer of ``nbytes`` owned by whoever keeps the view."""
    if nbytes < _MiB:
        return memoryview(bytearray(nbytes))
    return memoryview(map_anonymous(nbytes))


def size_class(nbytes: int) -> int:
    """The capacity of the buffer that serves a request for ``nbytes``."""
    if nbytes <= MIN_CLASS_BYTES:
        return MIN_CLASS_BYTES
    if nbytes <= _POW2_LIMIT:
        return 1 << (nbytes - 1).bit_length()
    return (nbytes + _MiB - 1) // _MiB * _MiB


class PooledBuffer:
    """One buffer lent by a :class:`BufferPool`; ``view`` is exactly the asked size.

    ``release()`` returns it (idempotent). Do not use ``view`` afterwards.
    """

    __slots__ = ("_mm", "_mv", "_pool", "capacity", "view")

    def __init__(self, pool: BufferPool, mm: mmap.mmap, mv: memoryview, nbytes: int) -> None:
        self._pool: BufferPool | None = pool
        self._mm = mm
        self._mv = mv  # the whole mapping
        self.capacity = len(mv)
        self.view = mv[:nbytes]

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            self.view.release()
            pool._give_back(self._mm, self._mv)


class BufferPool:
    """Bounded pool of receive buffers; see the module docstring."""

    def __init__(self, capacity_bytes: int, cached_bytes: int) -> None:
        assert capacity_bytes > 0 and 0 <= cached_bytes <= capacity_bytes
        self.capacity_bytes = capacity_bytes
        self.cached_limit_bytes = cached_bytes
        self.in_use_bytes = 0
        self.cached_bytes = 0
        self._free: dict[int, list[tuple[mmap.mmap, memoryview]]] = {}
        self._waiters: deque[tuple[int, Callable[[PooledBuffer], None]]] = deque()
        self.acquired_total = 0
        self.released_total = 0
        self.mapped_total = 0  # new mappings made (misses)

    @property
    def waiting(self) -> int:
        """Requests queued for room (``when_available`` / ``acquire``)."""
        return len(self._waiters)

    @property
    def in_use_buffers(self) -> int:
        return self.acquired_total - self.released_total

    def try_acquire(self, nbytes: int) -> PooledBuffer | None:
        """A buffer of ``nbytes`` now, or None when the bound says wait."""
        if nbytes > self.capacity_bytes:
            raise ChainfsError(
                Code.E2BIG, f"buffer of {nbytes} bytes over the pool's {self.capacity_bytes}"
            )
        if self._waiters:  # first come, first served
            return None
        return self._take(nbytes)

    def _take(self, nbytes: int) -> PooledBuffer | None:
        cls = size_class(nbytes)
        free = self._free.get(cls)
        if free:
            mm, mv = free.pop()
            self.cached_bytes -= cls
        else:
            # Unmap cached buffers of other classes until the new one fits.
            while self.in_use_bytes + self.cached_bytes + cls > self.capacity_bytes:
                if not self._evict_one():
                    return None
            mm = map_anonymous(cls)
            mv = memoryview(mm)
            self.mapped_total += 1
        self.in_use_bytes += cls
        self.acquired_total += 1
        assert self.in_use_bytes + self.cached_bytes <= self.capacity_bytes
        return PooledBuffer(self, mm, mv, nbytes)

    def _evict_one(self) -> bool:
        for cls, free in self._free.items():
            if free:
                mm, mv = free.pop()
                self.cached_bytes -= cls
                _unmap(mm, mv)
                return True
        return False

    def trim(self) -> None:
        """Unmap every cached (free) buffer; those in use stay lent."""
        while self._evict_one():
            pass

    def when_available(self, nbytes: int, callback: Callable[[PooledBuffer], None]) -> None:
        """Call ``callback(buffer)`` once a buffer of ``nbytes`` fits (FIFO order)."""
        if nbytes > self.capacity_bytes:
            raise ChainfsError(
                Code.E2BIG, f"buffer of {nbytes} bytes over the pool's {self.capacity_bytes}"
            )
        self._waiters.append((nbytes, callback))
        self._serve_waiters()

    def cancel_waiter(self, callback: Callable[[PooledBuffer], None]) -> None:
        for i, (_, cb) in enumerate(self._waiters):
            if cb is callback:
                del self._waiters[i]
                self._serve_waiters()
                return

    async def acquire(self, nbytes: int) -> PooledBuffer:
        """A buffer of ``nbytes``, waiting for room when the pool is full."""
        buf = self.try_acquire(nbytes)
        if buf is not None:
            return buf
        fut: asyncio.Future[PooledBuffer] = asyncio.get_running_loop().create_future()

        def deliver(b: PooledBuffer) -> None:
            if fut.done():
                b.release()
            else:
                fut.set_result(b)

        self.when_available(nbytes, deliver)
        try:
            return await fut
        finally:
            if not fut.done():
                self.cancel_waiter(deliver)

    def _give_back(self, mm: mmap.mmap, mv: memoryview) -> None:
        cls = len(mv)
        self.in_use_bytes -= cls
        self.released_total += 1
        assert self.in_use_bytes >= 0
        if self.cached_bytes + cls <= self.cached_limit_bytes:
            self._free.setdefault(cls, []).append((mm, mv))
            self.cached_bytes += cls
        else:
            _unmap(mm, mv)
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        while self._waiters:
            nbytes, callback = self._waiters[0]
            buf = self._take(nbytes)
            if buf is None:
                return
            self._waiters.popleft()
            callback(buf)

    def clear(self) -> None:
        """Unmap every cached buffer (buffers in use stay valid)."""
        while self._evict_one():
            pass


def _unmap(mm: mmap.mmap, mv: memoryview) -> None:
    try:
        mv.release()
        mm.close()
    except BufferError:  # someone still holds a slice: the GC unmaps it later
        pass
