"""A bound on bytes held at once (write-back data), shared by the files of one FileSystem."""

from __future__ import annotations

import asyncio
import collections
import contextlib


class ByteBudget:
    """Counting semaphore over bytes; FIFO so a large request is not starved.

    A request larger than the whole budget is granted once nothing else is
    held, so it cannot deadlock.
    """

    def __init__(self, limit_bytes: int) -> None:
        assert limit_bytes > 0, limit_bytes
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self.peak_bytes = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.held_bytes + n <= self.limit_bytes or self.held_bytes == 0

    async def acquire(self, n: int) -> None:
        assert n >= 0, n
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted, then cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def _take(self, n: int) -> None:
        self.held_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)

    def release(self, n: int) -> None:
        assert 0 <= n <= self.held_bytes, (n, self.held_bytes)
        self.held_bytes -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)
