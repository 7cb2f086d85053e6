"""How the mount waits for FUSE requests, without a kernel: the device wait on a pipe."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from chainfs.fuse_mount import device_wait


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
