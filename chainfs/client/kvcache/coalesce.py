"""Request coalescing: lone calls that arrive while the pipe is full travel together."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from chainfs.common.errors import ChainfsError

ItemT = TypeVar("ItemT")
R = TypeVar("R")


class Coalescer(Generic[ItemT, R]):
    """Single-item calls that arrive while ``max_inflight`` batches are out wait, and
    then go out together as one batch (3FS batches small reads the same way). The
    first calls go out at once: coalescing adds no latency to a lone caller."""

    def __init__(
        self,
        run: Callable[[list[ItemT]], Awaitable[list[R | ChainfsError]]],
        max_batch: int,
        max_inflight: int,
    ) -> None:
        assert max_batch > 0 and max_inflight > 0
        self._run = run
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._queue: list[tuple[ItemT, asyncio.Future[R]]] = []
        self._inflight = 0  # batches out (lone calls run in their caller's task)
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done

    async def call(self, item: ItemT) -> R:
        if not self._queue and self._inflight < self._max_inflight:
            # Room in the pipe: out at once as a batch of one, in the caller's task
            # (no future, no task of its own: a lone get costs the least).
            self._inflight += 1
            try:
                (r,) = await self._run([item])
            finally:
                self._inflight -= 1
                self._launch()
            if isinstance(r, ChainfsError):
                raise r
            return r
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._launch()
        return await fut

    def _launch(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._inflight += 1
            task = asyncio.ensure_future(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        self._launch()

    async def _run_batch(self, batch: list[tuple[ItemT, asyncio.Future[R]]]) -> None:
        live = [(item, fut) for item, fut in batch if not fut.done()]  # skip the cancelled
        if not live:
            return
        try:
            results = await self._run([item for item, _ in live])
        except BaseException as e:
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        for (_, fut), r in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(r, ChainfsError):
                fut.set_exception(r)
            else:
                fut.set_result(r)
