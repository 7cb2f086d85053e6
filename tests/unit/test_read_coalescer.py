"""Small reads of several callers to one node share frames; answers stay per caller."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.read_coalescer import IOResult, ReadCoalescer, ReadIO
from chainfs.common.rpc.storage_client import ReadReq
from chainfs.proto import common_pb2 as cp
from chainfs.proto import storage_pb2 as sp

NODE = "127.0.0.1:1"


def data_of(inode: int, offset: int, length: int) -> bytes:
    return bytes((inode * 7 + offset + k) % 251 for k in range(length))


class FakeNode:
    """One storage node: frames wait for ``release``; a frame naming ``refused``
    fails as a whole (as a refused capability does)."""

    def __init__(self) -> None:
        self.frames: list[list[int]] = []  # inodes of each frame sent
        self.gate = asyncio.Event()
        self.refused: set[int] = set()

    async def fetch(
        self, address: str, ios: Sequence[ReadIO], caps: dict[int, cp.Capability]
    ) -> list[IOResult]:
        assert address == NODE
        self.frames.append([r.inode for r, _ in ios])
        await self.gate.wait()
        if any(r.inode in self.refused for r, _ in ios):
            raise ChainfsError(Code.BAD_CAPABILITY, "refused")
        out: list[IOResult] = []
        for r, _ in ios:
            assert r.out is not None
            r.out[: r.length] = data_of(r.inode, r.offset, r.length)
            out.append((sp.ReadResult(length=r.length), r.out[: r.length]))
        return out


def reads(inode: int, n: int = 1) -> list[ReadIO]:
    return [
        (ReadReq(1, inode, 0, 4096 * k, 4096, memoryview(bytearray(4096))), 11) for k in range(n)
    ]


async def until_frames(node: FakeNode, n: int) -> None:
    for _ in range(1000):
        if len(node.frames) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(node.frames)} frames, expected {n}")


async def test_reads_waiting_behind_a_frame_share_the_next_one() -> None:
    node = FakeNode()
    co = ReadCoalescer(node.fetch, frames_per_node=1, max_ios=64, max_bytes=1 << 20)
    calls = [reads(ino, 2 if ino == 3 else 1) for ino in range(1, 6)]
    tasks = [asyncio.ensure_future(co.read(NODE, ios, {}, 4096)) for ios in calls]
    await until_frames(node, 1)
    for _ in range(10):
        await asyncio.sleep(0)
    assert node.frames == [[1]]  # the others wait for it
    node.gate.set()
    got = await asyncio.gather(*tasks)
    assert node.frames == [[1], [2, 3, 3, 4, 5]]
    for ios, results in zip(calls, got, strict=True):
        assert len(results) == len(ios)
        for (r, _), (res, data) in zip(ios, results, strict=True):
            assert res.length == r.length and data is not None
            assert bytes(data) == data_of(r.inode, r.offset, r.length)
    assert co.shared_frames == 1 and co.shared_reads == 4


async def test_a_failed_shared_frame_is_sent_again_per_caller() -> None:
    node = FakeNode()
    node.refused = {3}
    co = ReadCoalescer(node.fetch, frames_per_node=1, max_ios=64, max_bytes=1 << 20)
    tasks = [asyncio.ensure_future(co.read(NODE, reads(ino), {}, 4096)) for ino in (1, 2, 3, 4)]
    await until_frames(node, 1)
    node.gate.set()
    got = await asyncio.gather(*tasks, return_exceptions=True)
    # Only the caller whose read is refused sees the refusal.
    assert isinstance(got[2], ChainfsError) and got[2].code == Code.BAD_CAPABILITY
    for ino, results in zip((1, 2, 4), (got[0], got[1], got[3]), strict=True):
        assert not isinstance(results, BaseException)
        assert bytes(results[0][1] or b"") == data_of(ino, 0, 4096)


async def test_a_caller_cancelled_in_a_shared_frame_leaves_the_others_answered() -> None:
    node = FakeNode()
    co = ReadCoalescer(node.fetch, frames_per_node=1, max_ios=64, max_bytes=1 << 20)
    first = asyncio.ensure_future(co.read(NODE, reads(1), {}, 4096))
    await until_frames(node, 1)
    waiting = [asyncio.ensure_future(co.read(NODE, reads(ino), {}, 4096)) for ino in (2, 3, 4)]
    for _ in range(10):
        await asyncio.sleep(0)
    node.gate.set()
    node.gate = asyncio.Event()  # the shared frame waits on this one
    await first
    await until_frames(node, 2)
    assert node.frames[1] == [2, 3, 4]
    waiting[1].cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    node.gate.set()
    got = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(got[1], asyncio.CancelledError)
    for ino, results in ((2, got[0]), (4, got[2])):
        assert not isinstance(results, BaseException)
        assert bytes(results[0][1] or b"") == data_of(ino, 0, 4096)
    assert all(3 not in f for f in node.frames[2:])  # nothing sent again for the cancelled


async def test_a_caller_cancelled_while_waiting_sends_nothing() -> None:
    node = FakeNode()
    co = ReadCoalescer(node.fetch, frames_per_node=1, max_ios=64, max_bytes=1 << 20)
    first = asyncio.ensure_future(co.read(NODE, reads(1), {}, 4096))
    await until_frames(node, 1)
    gone = asyncio.ensure_future(co.read(NODE, reads(2), {}, 4096))
    kept = asyncio.ensure_future(co.read(NODE, reads(3), {}, 4096))
    for _ in range(10):
        await asyncio.sleep(0)
    gone.cancel()
    node.gate.set()
    await first
    assert bytes((await kept)[0][1] or b"") == data_of(3, 0, 4096)
    assert node.frames == [[1], [3]]


async def test_a_node_found_down_fails_the_reads_waiting_for_it_at_once() -> None:
    """They fail over to another replica without a frame (and a timeout) of their own."""
    node = FakeNode()

    async def down(
        address: str, ios: Sequence[ReadIO], caps: dict[int, cp.Capability]
    ) -> list[IOResult]:
        node.frames.append([r.inode for r, _ in ios])
        await node.gate.wait()
        raise ChainfsError(Code.UNAVAILABLE, "connection lost")

    co = ReadCoalescer(down, frames_per_node=1, max_ios=64, max_bytes=1 << 20)
    tasks = [asyncio.ensure_future(co.read(NODE, reads(ino), {}, 4096)) for ino in (1, 2, 3)]
    await until_frames(node, 1)
    for _ in range(10):
        await asyncio.sleep(0)
    node.gate.set()
    got = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, ChainfsError) and e.code == Code.UNAVAILABLE for e in got)
    assert node.frames == [[1]]
