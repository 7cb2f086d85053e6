"""One background event-loop thread (uvloop) that runs a sync FileSystem's async core.

After fork() the child has no loop thread: the first call there starts a
fresh loop and thread. The inherited loop is never touched again (its epoll
instance is shared with the parent: closing its handles would unregister
the parent's sockets).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_STOP_TIMEOUT_S = 10.0  # bound on joining the thread at close
_CLOSED = "I/O operation on a closed chainfs FileSystem"


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
        # The calls threads wait for: when the loop stops, each is failed, never left
        # waiting. _stopped (under _calls_lock) admits no new one after that.
        self._calls: set[_Call[Any]] = set()
        self._calls_lock = threading.Lock()
        self._stopped = False
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
            with self._calls_lock:
                self._stopped = True
                waiting = list(self._calls)
            for call in waiting:  # their threads get ValueError, as a call made after close
                call.abandon()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self._cancel_tasks())
            for call in waiting:  # a task that outlived its cancellation: no wait for it
                call.give_up()
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _cancel_tasks(self) -> None:
        """Let every task left at stop end by its cancellation (its finally blocks run)."""
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)

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
        call = _Call(coro)
        with self._calls_lock:
            if self._stopped or not self.alive:
                coro.close()
                raise ValueError(_CLOSED)
            self._calls.add(call)
        try:
            try:
                self.loop.call_soon_threadsafe(call.start, self.loop)
            except RuntimeError:  # stopped and closed since the check: abandoned
                raise ValueError(_CLOSED) from None
            try:
                finished = call.wait(timeout_s)
            except (KeyboardInterrupt, SystemExit):
                self._call_soon_if_running(call.cancel)
                with contextlib.suppress(BaseException):  # a second Ctrl-C: stop waiting
                    call.wait(_STOP_TIMEOUT_S)
                raise
            if not finished:
                self._call_soon_if_running(call.cancel)
                raise TimeoutError(f"chainfs call still running after {timeout_s} s")
            return call.result()
        finally:
            with self._calls_lock:
                self._calls.discard(call)

    def _call_soon_if_running(self, fn: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # closed meanwhile: its tasks are cancelled
            self.loop.call_soon_threadsafe(fn)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Have the loop run ``fn`` soon, from any thread but the loop's; no wait.

        ``fn`` runs in a fresh context: none of the calling thread's context
        variables (run_in_caller's mark, above all) reach it, or the tasks it
        starts."""
        if self._forked:
            self._restart_after_fork()
        with self._calls_lock:
            if self._stopped or not self.alive:
                raise ValueError(_CLOSED)
            self.loop.call_soon_threadsafe(fn, context=contextvars.Context())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self.in_loop_thread():
            self.loop.stop()
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_STOP_TIMEOUT_S)


class _Call(Generic[T]):
    """A coroutine run on the loop for a thread that waits for it. The hand-back is a
    plain lock released by the task's done callback: a sync call costs one wake-up
    each way and little else (run_coroutine_threadsafe chains a
    concurrent.futures.Future to the task, with a condition variable, for the same)."""

    __slots__ = ("_abandoned", "_cancelled", "_coro", "_done", "_error", "_released", "_task")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._task: asyncio.Task[T] | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released once the task is done
        self._released = False
        self._cancelled = False
        self._abandoned = False  # the loop stopped first
        self._error: BaseException | None = None  # the task could not be started

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop: start the task (unless cancelled before it began)."""
        if self._cancelled:
            self._coro.close()
            if self._error is None:
                self._error = asyncio.CancelledError()
            self._release()
            return
        try:
            self._task = loop.create_task(self._coro)
        except BaseException as e:
            self._coro.close()
            self._error = e
            self._release()
            raise
        self._task.add_done_callback(self._finished)

    def abandon(self) -> None:
        """On the loop, once it has stopped: end the wait with ValueError (a task
        still running is cancelled by the loop's shutdown and finishes then)."""
        self._abandoned = True
        if self._task is None:
            self._cancelled = True
            self._error = ValueError(_CLOSED)
            self._coro.close()
            self._release()

    def give_up(self) -> None:
        """On the loop thread, after the shutdown's wait: end the wait of a call
        whose task is still not done."""
        if not self._released:
            self._error = ValueError(f"{_CLOSED} (closed while the call ran)")
            self._release()

    def _release(self) -> None:
        if not self._released:  # loop thread only: start, abandon, _finished
            self._released = True
            self._done.release()

    def _finished(self, _task: asyncio.Task[T]) -> None:
        self._release()

    def cancel(self) -> None:
        """On the loop: cancel the task, or the start not yet made."""
        if self._task is None:
            self._cancelled = True
        else:
            self._task.cancel()

    def wait(self, timeout_s: float | None) -> bool:
        """Block the calling thread until the task is done; False on timeout."""
        return self._done.acquire(timeout=-1 if timeout_s is None else timeout_s)

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        assert self._task is not None and self._task.done()
        if self._abandoned and self._task.cancelled():
            raise ValueError(f"{_CLOSED} (closed while the call ran)")
        return self._task.result()


_loop_threads: weakref.WeakSet[LoopThread] = weakref.WeakSet()
_inherited_loops: list[asyncio.AbstractEventLoop] = []  # the parent's, never closed here
_restart_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _restart_lock
    _restart_lock = threading.Lock()  # the parent's may have been held by a thread now gone
    for lt in list(_loop_threads):
        lt._drop_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)
