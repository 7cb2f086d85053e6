"""Read-ahead of one open file in the mount, in whole chunk-aligned blocks.

The kernel reads a file sequentially in requests of at most 1 MiB (FUSE's
request size), a handful at a time. Served one by one, each is a separate
storage round trip started only when the kernel asks. Once a handle reads
sequentially, this fetches the blocks ahead of it (block = the file's chunk,
so one storage request each) in parallel while the kernel is still asking for
the current one; requests are then answered from memory.

Bounded: at most ``ahead_bytes`` per handle and ``budget_bytes`` for the whole
mount (beyond it, reads go straight to storage). Blocks behind the reader are
dropped. A write or truncate through the mount bumps the inode's generation,
and blocks fetched before it are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chainfs.common.dataplane.buffers import BufferPool, PooledBuffer

# Sequential requests in a row before blocks are fetched ahead.
_STREAK_TO_START = 2


@dataclass
class _Block:
    start: int  # file offset of the block
    generation: int  # inode generation when fetched
    task: asyncio.Task[PooledBuffer]


class ReadAhead:
    """Blocks ahead of one handle's sequential reads (see module docstring)."""

    def __init__(
        self,
        pool: BufferPool,
        block_bytes: int,
        ahead_bytes: int,
        fetch: Callable[[int, memoryview], Awaitable[None]],
    ) -> None:
        assert block_bytes > 0 and ahead_bytes >= 0
        self._pool = pool
        self._block = block_bytes
        self._ahead_blocks = max(1, ahead_bytes // block_bytes) if ahead_bytes else 0
        self._fetch = fetch
        self._blocks: dict[int, _Block] = {}
        self._next = 0  # offset right after the previous request
        self._streak = 0

    def _note(self, off: int, size: int) -> bool:
        """Track the access pattern; True when this handle reads sequentially."""
        low = self._next - 4 * self._block  # kernel requests may arrive a little out of order
        if off == self._next or (self._streak and low <= off <= self._next + self._block):
            self._streak += 1
        else:
            self._streak = 1 if off == 0 else 0
        self._next = max(self._next, off + size) if self._streak > 1 else off + size
        return self._streak >= _STREAK_TO_START or off == 0

    async def read(self, off: int, size: int, file_size: int, generation: int) -> memoryview | None:
        """The bytes of [off, off+size) (clamped to ``file_size``), or None when this
        read should go straight to storage (not sequential, or out of budget)."""
        if not self._ahead_blocks or not self._note(off, size):
            self._drop_all()
            return None
        end = min(off + size, file_size)
        first, last = off // self._block, (end - 1) // self._block
        if last - first > 1:
            return None  # larger than a block: direct is as good
        self._drop_before(first - 1)
        want_last = min(last + self._ahead_blocks, (file_size - 1) // self._block)
        for b in range(first, want_last + 1):
            blk = self._blocks.get(b)
            if blk is not None and blk.generation != generation:
                self._drop(b)
                blk = None
            if blk is None and not self._start(b, file_size, generation) and b <= last:
                return None  # out of budget for a block we need now
        wanted = [(b, self._blocks.get(b)) for b in range(first, last + 1)]
        bufs = []
        for b, blk in wanted:
            if blk is None:
                return None  # dropped by a concurrent read on this handle: go direct
            try:
                bufs.append(await blk.task)
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._blocks.get(b) is blk:
                    self._drop(b)  # fetched again on the next read
                raise
        if any(self._blocks.get(b) is not blk for b, blk in wanted):
            return None  # a concurrent read dropped a block (and its buffer) meanwhile
        views = []
        for (_, blk), buf in zip(wanted, bufs, strict=True):
            assert blk is not None
            start = blk.start
            lo, hi = max(off, start) - start, min(end, start + len(buf.view)) - start
            views.append(buf.view[lo:hi] if hi > lo else memoryview(b""))
        if len(views) == 1:
            return views[0]
        return memoryview(b"".join(views))

    def _start(self, b: int, file_size: int, generation: int) -> bool:
        start = b * self._block
        n = min(self._block, file_size - start)
        if n <= 0:
            return True
        buf = self._pool.try_acquire(n)
        if buf is None:
            return False

        async def fetch() -> PooledBuffer:
            try:
                await self._fetch(start, buf.view)
            except BaseException:
                buf.release()
                raise
            return buf

        task = asyncio.ensure_future(fetch())
        self._blocks[b] = _Block(start, generation, task)
        return True

    def _drop(self, b: int) -> None:
        """Forget a block. Never cancels its fetch: another request may be awaiting
        it (a cancelled await would leave that FUSE request unanswered)."""
        blk = self._blocks.pop(b)
        if blk.task.done():
            _release_later(blk.task)
        else:
            blk.task.add_done_callback(_release_later)

    def _drop_before(self, b: int) -> None:
        for old in [k for k in self._blocks if k < b]:
            self._drop(old)

    def _drop_all(self) -> None:
        for b in list(self._blocks):
            self._drop(b)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop at interpreter exit
            self._drop_all()


def _release_later(task: asyncio.Task[PooledBuffer]) -> None:
    """Give a fetched block back once whoever awaited it has sent its reply.

    A request awaiting the block resumes (and pyfuse3 copies its reply to the
    kernel) in the loop iteration that follows the fetch; the release is
    queued behind that.
    """
    if task.cancelled() or task.exception() is not None:
        return  # fetch() released the buffer itself
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, task.result().release)
