"""One background-loop mechanism for every service.

A :class:`Periodic` runs bounded rounds of work: ``round()`` is called every
``interval_s``, immediately again while it reports more work waiting, and
sooner when ``wake()`` is called. A failing round is logged and the loop goes
on; only ``stop()`` ends it. Garbage collection, session pruning, scrubbing,
resync and cache eviction all run this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from chainfs.common.errors import ChainfsError

log = logging.getLogger(__name__)


class Periodic:
    """Runs ``round()`` every ``interval_s`` (immediately again while it reports
    more work) until stopped. A failing round is logged and retried."""

    name = "task"
    # False: interval_s of quiet after each round (work queues). True: one round
    # starts every interval_s, however long the last one took (leases, heartbeats).
    fixed_rate = False

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.rounds = 0

    async def round(self) -> bool:
        """Do one bounded batch of work; True if more is waiting."""
        raise NotImplementedError

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            more = False
            try:
                more = await self.round()
                self.rounds += 1
            except asyncio.CancelledError:
                raise
            except ChainfsError as e:
                log.warning("%s round failed: %s", self.name, e)
            except Exception:
                log.exception("%s round failed", self.name)
            if more:
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            pause_s = self.interval_s
            if self.fixed_rate:
                pause_s = max(0.0, pause_s - (loop.time() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause_s)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it to end.

    Its CancelledError is absorbed, but not one aimed at the caller itself
    (a stop() that is being cancelled stays cancelled).
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


def start_all(tasks: list[Periodic]) -> Callable[[], Awaitable[None]]:
    for t in tasks:
        t.start()

    async def stop() -> None:
        for t in tasks:
            await t.stop()

    return stop
