"""Requests stuck too long are cut short: one sweep a second over those in flight.

A request waiting on an unreachable cluster is answered EIO once it has been
in flight ``limit_s`` (the client's own timeouts plus a margin), so the caller
gets an error instead of hanging. A timer per request (``asyncio.timeout``)
cost a timer handle, a heap entry and three event-loop lookups (each a getpid
system call) per FUSE request; here a request costs a set insertion and
removal, and a sweep every ``interval_s`` looks at the requests in flight (at
most pyfuse3's workers plus the lock bridge's tasks: 2 x ``max_requests``).
The sweep counts ticks, so a request costs no clock read: it is cut at the
first sweep after it has been in flight ``limit_s``, at most two intervals late.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any


class InFlight:
    """One request being served."""

    __slots__ = ("args", "cut", "name", "task", "tick")

    def __init__(self, name: str, args: tuple[Any, ...], task: asyncio.Task[Any], tick: int):
        self.name = name
        self.args = args
        self.task = task
        self.tick = tick  # the sweep count when it started
        self.cut = False  # the guard cancelled its task


class StuckGuard:
    """Cancels the task of a request in flight longer than ``limit_s``; :meth:`leave`
    says whether the request's end is that cancellation (answer it EIO)."""

    def __init__(self, limit_s: float, interval_s: float) -> None:
        if limit_s <= 0 or interval_s <= 0:
            raise ValueError(f"limit_s and interval_s must be > 0, not {limit_s}, {interval_s}")
        self.limit_s = limit_s
        self.interval_s = interval_s
        self._limit_ticks = math.ceil(limit_s / interval_s)
        self._tick = 0
        self._in_flight: set[InFlight] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def enter(self, name: str, args: tuple[Any, ...]) -> InFlight:
        """A request starts in the current task."""
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:  # the first request (or the first on another loop: tests)
            loop = self._loop = asyncio.get_running_loop()
            self._sweeper = None
            task = asyncio.current_task(loop)
            assert task is not None, "a FUSE request runs in a task"
        req = InFlight(name, args, task, self._tick)
        self._in_flight.add(req)
        if self._sweeper is None:
            assert loop is not None
            self._sweeper = loop.create_task(self._sweep_while_busy(), name="fuse-stuck-guard")
        return req

    def leave(self, req: InFlight) -> bool:
        """The request ends; True if the guard cut it short and nothing else
        cancelled its task meanwhile (its CancelledError is the guard's)."""
        self._in_flight.discard(req)
        return req.cut and req.task.uncancel() == 0

    def sweep(self) -> None:
        """Cut every request in flight for ``limit_s`` (counted in sweeps)."""
        self._tick += 1
        for req in list(self._in_flight):
            if self._tick - req.tick <= self._limit_ticks or req.cut:
                continue
            if req.task.cancelling():
                continue  # being cancelled already (unmounting): answered by that
            req.cut = True
            req.task.cancel()

    async def _sweep_while_busy(self) -> None:
        try:
            while self._in_flight:
                await asyncio.sleep(self.interval_s)
                self.sweep()
        finally:
            self._sweeper = None

    async def stop(self) -> None:
        sweeper = self._sweeper
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
