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
import collections
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from chainfs.common.dataplane.buffers import BufferPool, PooledBuffer

# Sequential requests in a row before blocks are fetched ahead.
_STREAK_TO_START = 2
# Far-off requests in a row before the handle counts as reading randomly.
_FAR_TO_RESET = 2
# Near requests touching no recent one, in a row, before the same.
_UNTOUCHING_TO_RESET = 4
# Blocks kept behind the furthest request of a handle (out-of-order arrivals).
_BEHIND_BLOCKS = 3
# Recent requests remembered to tell the kernel's out-of-order read-ahead window
# (each request touches another of the window) from random reads (touch none).
_RECENT_REQUESTS = 16


@dataclass
class _Block:
    start: int  # file offset of the block
    generation: int  # inode generation when fetched
    task: asyncio.Task[PooledBuffer]
    readers: int = 0  # requests between awaiting it and replying with it


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
        self._next = 0  # offset right after the furthest request
        self._streak = 0  # sequential requests in a row
        self._far = 0  # far-off requests in a row
        self._recent: collections.deque[tuple[int, int]] = collections.deque(
            maxlen=_RECENT_REQUESTS
        )  # (start, end) of the latest requests
        self.misses: collections.Counter[str] = collections.Counter()  # why reads went direct

    def _note(self, off: int, size: int) -> bool:
        """Track the access pattern; True when this handle reads sequentially."""
        # The kernel's own read-ahead requests arrive out of order and may run
        # ahead of the reader: near the furthest request and touching a recent
        # request counts. Near alone does not (random reads in a small file all
        # are near), but only a few untouching ones in a row end the streak.
        low = self._next - _BEHIND_BLOCKS * self._block
        high = self._next + (self._ahead_blocks + 1) * self._block
        end = off + size
        near = low <= off <= high
        touches = any(e == off or s == end for s, e in self._recent)
        self._recent.append((off, end))
        if off == self._next or (self._streak and near and touches):
            self._streak += 1
            self._far = 0
            self._next = max(self._next, off + size)
        else:
            self._far += 1
            limit = _UNTOUCHING_TO_RESET if near else _FAR_TO_RESET
            if self._far >= limit or not self._streak:
                self._streak = 1
                self._far = 0
                self._next = off + size
                self._drop_all()
        return self._streak >= _STREAK_TO_START or off == 0

    async def read(self, off: int, size: int, file_size: int, generation: int) -> memoryview | None:
        """The bytes of [off, off+size) (clamped to ``file_size``), or None when this
        read should go straight to storage (not sequential, or out of budget)."""
        if not self._ahead_blocks:
            return None
        end = min(off + size, file_size)
        first, last = off // self._block, (end - 1) // self._block
        if last - first > 1:
            self.misses["large"] += 1
            return None  # larger than two blocks: direct is as good
        sequential = self._note(off, size)
        if sequential:
            behind = (self._next - _BEHIND_BLOCKS * self._block) // self._block
            self._drop_before(min(first, behind))
            want_last = min(last + self._ahead_blocks, (file_size - 1) // self._block)
            for b in range(first, want_last + 1):
                blk = self._blocks.get(b)
                if blk is not None and blk.generation != generation:
                    self._drop(b, force=True)  # stale: its readers see it gone
                    blk = None
                if blk is None and not self._start(b, file_size, generation) and b <= last:
                    self.misses["budget"] += 1
                    return None  # out of budget for a block we need now
        wanted = [(b, self._blocks.get(b)) for b in range(first, last + 1)]
        if any(blk is None or blk.generation != generation for _, blk in wanted):
            self.misses["not sequential" if not sequential else "dropped"] += 1
            return None
        for _, blk in wanted:
            assert blk is not None
            blk.readers += 1  # not dropped (and its buffer not reused) while we use it
        try:
            bufs = []
            for b, blk in wanted:
                assert blk is not None
                try:
                    bufs.append(await blk.task)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if self._blocks.get(b) is blk:
                        self._drop(b, force=True)  # fetched again on the next read
                    raise
            if any(self._blocks.get(b) is not blk for b, blk in wanted):
                self.misses["dropped while waiting"] += 1
                return None  # dropped meanwhile (close, or a newer generation)
            views = []
            for (_, blk), buf in zip(wanted, bufs, strict=True):
                assert blk is not None
                start = blk.start
                lo, hi = max(off, start) - start, min(end, start + len(buf.view)) - start
                views.append(buf.view[lo:hi] if hi > lo else memoryview(b""))
        finally:
            for _, blk in wanted:
                assert blk is not None
                blk.readers -= 1
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

    def _drop(self, b: int, force: bool = False) -> bool:
        """Forget a block unless a request is using it (``force``: even then).

        Never cancels its fetch: another request may be awaiting it (a cancelled
        await would leave that FUSE request unanswered)."""
        blk = self._blocks[b]
        if blk.readers and not force:
            return False
        del self._blocks[b]
        if blk.task.done():
            _release_later(blk.task)
        else:
            blk.task.add_done_callback(_release_later)
        return True

    def _drop_before(self, b: int) -> None:
        for old in [k for k in self._blocks if k < b]:
            self._drop(old)

    def _drop_all(self) -> None:
        for b in list(self._blocks):
            self._drop(b)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop at interpreter exit
            for b in list(self._blocks):
                self._drop(b, force=True)


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
