"""Small reads of many callers to one storage node, sent together in one batched frame.

Each ``StorageClient.read_batch`` call sends one frame per node for its own
reads. With many small reads in flight at once (a FUSE mount under fio
iodepth 16, KV-cache gets from several tasks) that is one frame, one
``sendmsg``, one server dispatch and one reply per 4 KiB. Here, once
``frames_per_node`` frames of small reads are in flight to a node, further
small reads to it wait and leave together, in one frame, as soon as one of
those frames is answered: no timer, so a lone read goes at once and a busy
node gets fewer, larger frames (3FS's batchRead, across callers).

Errors stay per caller: a shared frame that fails as a whole (connection
lost, a capability refused, a malformed reply) is not answered to its
callers; each sends its own reads again, alone, and gets the answer it would
have had without coalescing. A caller cancelled while its reads are in a
shared frame abandons that frame (its buffers must not be written after it
returned); the others send theirs again alone.

A frame failing because the node is down (UNAVAILABLE, ETIMEDOUT) fails the
reads waiting for that node at once with the same error, so they fail over
to another replica as a read of their own would have, without a second wait.

Bounds: at most ``max_ios`` reads wait per node (more go in a frame of their
own) and a shared frame holds at most ``max_ios`` reads and ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import common_pb2 as cp
from chainfs.proto import storage_pb2 as sp

# A frame failing with these says the node (or the way to it) is down: the
# reads waiting for it get the same answer at once and fail over, instead of
# waiting for a frame of their own to time out too.
_NODE_DOWN = frozenset({Code.UNAVAILABLE, Code.ETIMEDOUT})

# One read sent to one replica: (storage_client.ReadReq, target id); and what
# came back: the server's result and where its bytes landed (None: no bytes).
ReadIO = tuple[Any, int]
IOResult = tuple[sp.ReadResult, memoryview | None]
Fetch = Callable[[str, Sequence[ReadIO], dict[int, cp.Capability]], Awaitable[list[IOResult]]]


class _Waiter:
    __slots__ = ("caps", "frame", "fut", "ios", "nbytes")

    def __init__(self, ios: Sequence[ReadIO], caps: dict[int, cp.Capability], nbytes: int) -> None:
        self.ios = ios
        self.caps = caps
        self.nbytes = nbytes
        # None as the result: the shared frame failed, send these alone.
        self.fut: asyncio.Future[list[IOResult] | None] = asyncio.get_running_loop().create_future()
        self.frame: asyncio.Task[None] | None = None  # the shared frame carrying them


class _Node:
    __slots__ = ("inflight", "waiting", "waiting_ios")

    def __init__(self) -> None:
        self.inflight = 0  # frames of small reads in flight
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self.waiting_ios = 0


class ReadCoalescer:
    """Per storage node: small reads beyond ``frames_per_node`` frames in flight
    wait and go together (see the module docstring)."""

    def __init__(self, fetch: Fetch, frames_per_node: int, max_ios: int, max_bytes: int) -> None:
        assert frames_per_node > 0 and max_ios > 0 and max_bytes > 0
        self._fetch = fetch
        self._frames = frames_per_node
        self._max_ios = max_ios
        self._max_bytes = max_bytes
        self._nodes: dict[str, _Node] = {}
        self.shared_frames = 0  # frames that carried reads of more than one caller
        self.shared_reads = 0  # callers' reads that went in those frames

    async def read(
        self, address: str, ios: Sequence[ReadIO], caps: dict[int, cp.Capability], nbytes: int
    ) -> list[IOResult]:
        """The results of ``ios`` (all to the node at ``address``), in order;
        ChainfsError when their frame failed as a whole."""
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node()
        if node.inflight < self._frames or node.waiting_ios + len(ios) > self._max_ios:
            node.inflight += 1
            try:
                return await self._fetch(address, ios, caps)
            except ChainfsError as e:
                self._fail_waiting(node, e)
                raise
            finally:
                node.inflight -= 1
                self._next(address, node)
        w = _Waiter(ios, caps, nbytes)
        node.waiting.append(w)
        node.waiting_ios += len(ios)
        try:
            got = await w.fut
        except asyncio.CancelledError:
            if w.frame is None:
                if w in node.waiting:  # still waiting: nothing sent for it
                    node.waiting.remove(w)
                    node.waiting_ios -= len(ios)
            elif not w.frame.done():
                w.frame.cancel()  # its bytes must not reach our buffers after we return
            raise
        if got is None:  # the shared frame failed as a whole: ours alone, for our own answer
            return await self._fetch(address, ios, caps)
        return got

    @staticmethod
    def _fail_waiting(node: _Node, e: ChainfsError) -> None:
        """The node is down (``e``): what waits for it fails over now, with ``e``."""
        if e.code not in _NODE_DOWN:
            return
        while node.waiting:
            w = node.waiting.popleft()
            node.waiting_ios -= len(w.ios)
            if not w.fut.done():
                w.fut.set_exception(e)

    def _next(self, address: str, node: _Node) -> None:
        """Send what waits for ``address``, in shared frames, while slots are free."""
        while node.waiting and node.inflight < self._frames:
            batch: list[_Waiter] = []
            n_ios = n_bytes = 0
            while node.waiting:
                w = node.waiting[0]
                if batch and (
                    n_ios + len(w.ios) > self._max_ios or n_bytes + w.nbytes > self._max_bytes
                ):
                    break
                node.waiting.popleft()
                batch.append(w)
                n_ios += len(w.ios)
                n_bytes += w.nbytes
            node.waiting_ios -= n_ios
            node.inflight += 1
            frame = asyncio.ensure_future(self._shared(address, node, batch))
            for w in batch:
                w.frame = frame

    async def _shared(self, address: str, node: _Node, batch: list[_Waiter]) -> None:
        try:
            ios = [io for w in batch for io in w.ios]
            caps: dict[int, cp.Capability] = {}
            for w in batch:
                caps.update(w.caps)
            if len(batch) > 1:
                self.shared_frames += 1
                self.shared_reads += len(batch)
            try:
                got = await self._fetch(address, ios, caps)
            except BaseException as e:
                if isinstance(e, ChainfsError):
                    self._fail_waiting(node, e)
                for w in batch:
                    if w.fut.done():
                        continue
                    down = isinstance(e, ChainfsError) and e.code in _NODE_DOWN
                    if down or (len(batch) == 1 and isinstance(e, Exception)):
                        w.fut.set_exception(e)  # the node's state, or its own frame's answer
                    else:
                        w.fut.set_result(None)
                if not isinstance(e, Exception):
                    raise
                return
            at = 0
            for w in batch:
                if not w.fut.done():
                    w.fut.set_result(got[at : at + len(w.ios)])
                at += len(w.ios)
        finally:
            node.inflight -= 1
            self._next(address, node)
