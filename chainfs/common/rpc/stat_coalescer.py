"""Stats of many callers to meta, sent together as one BatchStat.

A stat is one round trip to meta, and most of what meta spends on it is the
request itself (receive, dispatch, reply), not the path walk: measured on
one meta process, 107 us of meta CPU per Stat against 61 us per path in a
BatchStat of 2, 47 in one of 3, 38 in one of 4. A FUSE mount under several
processes' lookups, or one client's tasks stat-ing files at once, send
many stats at the same time. Here, once ``inflight`` stats are in flight,
further stats wait and leave together in one BatchStat as soon as one of
those is answered: no timer, so a lone stat goes at once, as a Stat, and
nothing changes for a caller alone (the same shape as the storage client's
read coalescer).

What a caller gets is what its own Stat would have given: meta answers each
path of a BatchStat on its own (an inode, or that path's error) in one
read-only snapshot, with the same permission checks, for the caller's user.
Only stats of the same user and ``follow`` share a call. A call that fails
as a whole (meta unreachable after the client's retries, a malformed reply)
fails each of its stats with that error, as each Stat would have failed.
A cancelled caller's result is dropped (a stat changes nothing).

Bounds: a BatchStat carries at most ``max_batch`` paths; at most
``max_waiting`` stats wait (more go alone, at once).
"""

from __future__ import annotations

import asyncio
import collections
import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import meta_pb2 as pb

# (at, follow, user) -> the inode; raises the path's ChainfsError.
StatOne = Callable[[Any, bool, Any], Awaitable[pb.Inode]]
# (ats, follow, user) -> per path, the inode or that path's ChainfsError.
StatMany = Callable[[Sequence[Any], bool, Any], Awaitable[list[pb.Inode | ChainfsError]]]


class _Waiter:
    __slots__ = ("at", "fut", "key")

    def __init__(self, at: Any, key: tuple[bool, Any]) -> None:
        self.at = at
        self.key = key  # (follow, user): what may share a call
        self.fut: asyncio.Future[pb.Inode] = asyncio.get_running_loop().create_future()


class StatCoalescer:
    """Stats beyond ``inflight`` in flight wait and go together (module docstring)."""

    def __init__(
        self, one: StatOne, many: StatMany, inflight: int, max_batch: int, max_waiting: int
    ) -> None:
        assert inflight > 0 and max_batch > 0 and max_waiting > 0
        self._one = one
        self._many = many
        self._limit = inflight
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._inflight = 0
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # BatchStat calls that carried more than one caller's stat
        self.batched = 0  # stats that went in those calls

    async def stat(self, at: Any, follow: bool, user: Any) -> pb.Inode:
        if (self._inflight < self._limit and not self._waiting) or len(
            self._waiting
        ) >= self._max_waiting:
            self._inflight += 1
            try:
                return await self._one(at, follow, user)
            finally:
                self._inflight -= 1
                self._kick()
        w = _Waiter(at, (follow, user))
        self._waiting.append(w)
        self._kick()
        return await w.fut  # cancelled: _kick skips it; a result is dropped

    def _kick(self) -> None:
        """Start calls for waiting stats while there is room in flight."""
        waiting = self._waiting
        while waiting and self._inflight < self._limit:
            first = waiting.popleft()
            if first.fut.done():  # its caller was cancelled
                continue
            batch = [first]
            rest: collections.deque[_Waiter] = collections.deque()
            while waiting and len(batch) < self._max_batch:
                w = waiting.popleft()
                if w.fut.done():
                    continue
                (batch if w.key == first.key else rest).append(w)
            rest.extend(waiting)
            self._waiting = waiting = rest
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Waiter]) -> None:
        follow, user = batch[0].key
        try:
            if len(batch) == 1:
                await self._send_one(batch[0], follow, user)
                return
            self.batches += 1
            self.batched += len(batch)
            try:
                results = await self._many([w.at for w in batch], follow, user)
            except ChainfsError as e:
                if e.code == Code.E2BIG:
                    # Meta takes fewer paths per call (its max_batch_stat), which no
                    # caller's own Stat would hit: each goes alone, later batches smaller.
                    self._max_batch = max(1, len(batch) // 2)
                    await asyncio.gather(*(self._send_one(w, follow, user) for w in batch))
                    return
                for w in batch:
                    _settle(w, _own(e))
                return
            if len(results) != len(batch):
                msg = f"BatchStat answered {len(results)} of {len(batch)} paths"
                for w in batch:
                    _settle(w, ChainfsError(Code.INTERNAL, msg))
                return
            for w, r in zip(batch, results, strict=True):
                _settle(w, r)
        except asyncio.CancelledError:  # the client is closing
            for w in batch:
                w.fut.cancel()
            raise
        except Exception as e:  # a bug: every caller hears of it, nobody hangs
            for w in batch:
                if not w.fut.done():
                    w.fut.set_exception(_own(e))
        finally:
            self._inflight -= 1
            self._kick()

    async def _send_one(self, w: _Waiter, follow: bool, user: Any) -> None:
        try:
            _settle(w, await self._one(w.at, follow, user))
        except ChainfsError as e:
            _settle(w, e)

    async def close(self) -> None:
        """Cancel calls in flight (their callers get CancelledError)."""
        for w in self._waiting:
            if not w.fut.done():
                w.fut.cancel()
        self._waiting.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _own(e: BaseException) -> Any:
    """A copy of ``e`` for one of many callers: each raises its own exception (a
    shared one would gather every raiser's traceback), of the same type, with the
    same arguments (a ChainfsError keeps its code, message and filename)."""
    try:
        return copy.copy(e)
    except Exception:  # an exception type that cannot be rebuilt from its arguments
        return e


def _settle(w: _Waiter, result: pb.Inode | ChainfsError) -> None:
    if w.fut.done():  # the caller was cancelled
        return
    if isinstance(result, ChainfsError):
        w.fut.set_exception(result)
    else:
        w.fut.set_result(result)
