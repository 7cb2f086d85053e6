"""How the mount waits for FUSE requests and answers the stuck ones, without a
kernel: the device wait on a pipe, the stuck-request guard on a fake handler."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Iterator
from typing import Any

import pyfuse3
import pytest

from chainfs.fuse_mount import device_wait
from chainfs.fuse_mount.ops_base import RequestCounters, op
from chainfs.fuse_mount.stuck_guard import StuckGuard


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def test_device_wait_wakes_once_per_request(pipe: tuple[int, int]) -> None:
    r, w = pipe
    wait = device_wait.DeviceWait(asyncio.get_running_loop(), r)
    waiting = asyncio.ensure_future(wait.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    os.write(w, b"a")
    await waiting
    assert os.read(r, 1) == b"a"
    # A request that arrives while nobody waits is taken by the next wait ...
    os.write(w, b"b")
    for _ in range(5):  # the loop sees it readable with no waiter (then stops watching)
        await asyncio.sleep(0)
    await asyncio.wait_for(wait.wait(), 10)
    assert os.read(r, 1) == b"b"
    # ... and one consumed meanwhile (the kernel withdrew it) is not: the next wait waits.
    os.write(w, b"c")
    for _ in range(5):
        await asyncio.sleep(0)
    assert os.read(r, 1) == b"c"
    waiting = asyncio.ensure_future(wait.wait())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    os.write(w, b"d")
    await asyncio.wait_for(waiting, 10)
    wait.close()


async def test_device_wait_closing_wakes_the_waiter(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    waiting = asyncio.ensure_future(device_wait.wait_readable(r))
    await asyncio.sleep(0)
    device_wait.notify_closing(r)
    with pytest.raises(device_wait.ClosedResourceError):
        await waiting
    device_wait.close_all()


class _Ops:
    """What :func:`op` needs of a mount."""

    def __init__(self, limit_s: float, interval_s: float) -> None:
        self.counters = RequestCounters()
        self.guard = StuckGuard(limit_s, interval_s)
        self._changes = 0
        self.release = asyncio.Event()

    def _may_change(self, request: str, args: tuple[Any, ...]) -> bool:
        return False

    @op
    async def getattr(self, ino: int) -> int:
        await self.release.wait()
        return ino


async def test_a_stuck_request_is_answered_eio_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ops = _Ops(limit_s=0.05, interval_s=0.01)
    with (
        caplog.at_level(logging.WARNING, logger="chainfs.fuse_mount.ops"),
        pytest.raises(pyfuse3.FUSEError) as e,
    ):
        await ops.getattr(7)
    assert e.value.errno == errno.EIO
    assert any("getattr(7,): no answer in" in r.getMessage() for r in caplog.records)
    # The task that served it goes on serving (pyfuse3's worker): not left cancelled.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    ops.release.set()
    assert await ops.getattr(8) == 8


async def test_a_request_in_time_is_left_alone() -> None:
    ops = _Ops(limit_s=60, interval_s=0.01)
    ops.release.set()
    assert [await ops.getattr(i) for i in range(3)] == [0, 1, 2]
    await ops.guard.stop()


async def test_a_request_cancelled_by_unmounting_stays_cancelled() -> None:
    ops = _Ops(limit_s=0.05, interval_s=0.01)
    serving = asyncio.ensure_future(ops.getattr(9))
    await asyncio.sleep(0)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    await ops.guard.stop()
