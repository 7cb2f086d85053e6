"""One background event-loop thread (uvloop) that runs a sync FileSystem's async core."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
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
        self.loop = _new_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

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
