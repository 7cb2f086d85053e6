"""pyfuse3's wait for the next FUSE request, with the device registered with the loop once.

pyfuse3 3.5 on asyncio (``pyfuse3.asyncio``) waits for every request with a
fresh future, ``loop.add_reader`` and, once woken, ``loop.remove_reader``: on
uvloop that is an epoll registration and removal (and libuv's bookkeeping
around them, ~6 syscalls) per FUSE request. Here the device stays registered
and its reader callback wakes the one task waiting; pyfuse3 lets one task at a
time wait (its read lock), so there is at most one waiter.

The device is level-triggered: readable with nobody waiting (every worker
busy), the callback would run on every loop iteration. The first such call is
remembered; a second one unregisters the device until a task waits again.
A wait that finds a readiness remembered checks the device with a poll of
zero timeout before taking it (the request may have been withdrawn since:
reading an empty device would block the loop).

:func:`enable` replaces ``pyfuse3.asyncio.enable()``; :func:`close_all`
unregisters the device before pyfuse3 closes it.
"""

from __future__ import annotations

import asyncio
import select
import types

import pyfuse3
import pyfuse3.asyncio

ClosedResourceError = pyfuse3.asyncio.ClosedResourceError


class DeviceWait:
    """Readiness of one file descriptor for the one task at a time that waits on it."""

    __slots__ = ("_closed", "_fd", "_loop", "_poll", "_ready", "_registered", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop = loop
        self._fd = fd
        self._waiter: asyncio.Future[None] | None = None
        self._registered = False
        self._ready = False  # seen readable while nobody waited
        self._closed = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    async def wait(self) -> None:
        """Return once the fd is readable; ClosedResourceError once closed."""
        if self._closed:
            raise ClosedResourceError()
        if self._waiter is not None:
            raise RuntimeError(f"another task is waiting for fd {self._fd}")
        if self._ready:
            self._ready = False
            if self._poll.poll(0):
                return
        if not self._registered:
            self._loop.add_reader(self._fd, self._on_readable)
            self._registered = True
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(None)
        elif self._ready:  # twice with nobody waiting: stop watching until someone waits
            self._unregister()
        else:
            self._ready = True

    def _unregister(self) -> None:
        if self._registered:
            self._loop.remove_reader(self._fd)
            self._registered = False

    def close(self) -> None:
        """Unregister; the waiting task (and any later one) gets ClosedResourceError."""
        self._closed = True
        self._unregister()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ClosedResourceError())


_waits: dict[int, DeviceWait] = {}


async def wait_readable(fd: int) -> None:
    wait = _waits.get(fd)
    if wait is None:
        wait = _waits[fd] = DeviceWait(asyncio.get_running_loop(), fd)
    await wait.wait()


def notify_closing(fd: int) -> None:
    wait = _waits.pop(fd, None)
    if wait is not None:
        wait.close()


def close_all() -> None:
    """Unregister every device (before pyfuse3.close closes it); waiters get
    ClosedResourceError."""
    for fd in list(_waits):
        notify_closing(fd)


def enable() -> None:
    """Run pyfuse3 on asyncio with :func:`wait_readable` as its device wait.

    pyfuse3 reaches its event-loop layer through its module global ``trio``
    (``pyfuse3.asyncio.enable()`` sets it to that module): it gets a copy of
    pyfuse3.asyncio with the two device functions replaced.
    """
    pyfuse3.asyncio.enable()
    shim = types.ModuleType("chainfs.fuse_mount.device_wait.trio")
    shim.__dict__.update({k: v for k, v in vars(pyfuse3.asyncio).items() if not k.startswith("__")})
    shim.__dict__.update(
        lowlevel=shim,
        from_thread=shim,
        wait_readable=wait_readable,
        notify_closing=notify_closing,
    )
    pyfuse3.trio = shim  # type: ignore[attr-defined]
