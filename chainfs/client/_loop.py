"""One background event-loop thread (uvloop) that runs a sync FileSystem's async core.

After fork() the child has no loop thread: the first call there starts a
fresh loop and thread. The inherited loop is never touched again (its epoll
instance is shared with the parent: closing its handles would unregister
the parent's sockets).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_STOP_TIMEOUT_S = 10.0  # bound on joining the thread at close


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()


class LoopThread:
    """Runs coroutines on a private event loop from any calling thread."""

    def __init__(self, name: str = "chainfs-client") -> None:
        self.name = name
        self._start()
        _loop_threads.add(self)

    def _start(self) -> None:
        self._forked = False  # set in a fork()ed child until the first call restarts us
        self.loop = _new_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _drop_inherited(self) -> None:
        """In a fork()ed child: keep the parent's loop referenced, unused, for good."""
        _inherited_loops.append(self.loop)
        self._forked = True

    def _restart_after_fork(self) -> None:
        with _restart_lock:
            if self._forked:
                self._start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it; Ctrl-C cancels it.

        With ``timeout_s``, a coroutine still running then is cancelled and
        TimeoutError raised.
        """
        if self._forked:
            self._restart_after_fork()
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a sync chainfs call was made from its own event-loop thread")
        if not self.alive:
            coro.close()
            raise ValueError("I/O operation on a closed chainfs FileSystem")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"chainfs call still running after {timeout_s} s") from None
        except (KeyboardInterrupt, SystemExit):
            fut.cancel()
            with contextlib.suppress(BaseException):
                fut.result(_STOP_TIMEOUT_S)
            raise
        except concurrent.futures.CancelledError:
            raise asyncio.CancelledError() from None

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.in_loop_thread():
            self.loop.stop()
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_STOP_TIMEOUT_S)


_loop_threads: weakref.WeakSet[LoopThread] = weakref.WeakSet()
_inherited_loops: list[asyncio.AbstractEventLoop] = []  # the parent's, never closed here
_restart_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _restart_lock
    _restart_lock = threading.Lock()  # the parent's may have been held by a thread now gone
    for lt in list(_loop_threads):
        lt._drop_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)
