"""LoopThread: the sync client's hop onto its event loop (results, errors, timeouts)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from chainfs.client._loop import LoopThread


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    t = LoopThread("test-loop")
    yield t
    t.stop()


def test_result_and_error_come_back(lt: LoopThread) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise KeyError("nope")

    assert lt.run(answer()) == 42
    with pytest.raises(KeyError):
        lt.run(fail())
    assert lt.run(answer()) == 42  # the loop goes on after an error


def test_timeout_cancels_the_coroutine(lt: LoopThread) -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        lt.run(slow(), timeout_s=0.05)

    async def wait_cancelled() -> bool:
        await asyncio.wait_for(cancelled.wait(), 10)
        return True

    assert lt.run(wait_cancelled())


def test_cancelled_coroutine_raises_cancelled(lt: LoopThread) -> None:
    async def cancel_self() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        lt.run(cancel_self())


def test_misuse_is_refused(lt: LoopThread) -> None:
    async def nested() -> None:
        async def inner() -> None:
            return None

        lt.run(inner())

    with pytest.raises(RuntimeError, match="own event-loop thread"):
        lt.run(nested())
    lt.stop()

    async def nothing() -> None:
        return None

    with pytest.raises(ValueError, match="closed"):
        lt.run(nothing())


def test_ctrl_c_cancels_the_coroutine(lt: LoopThread) -> None:
    import signal
    import threading

    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        lt.run(slow())
    timer.join()

    async def wait_cancelled() -> bool:
        await asyncio.wait_for(cancelled.wait(), 10)
        return True

    assert lt.run(wait_cancelled())


def test_stop_ends_every_call_a_thread_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FileSystem closed while other threads are in calls: each of them gets
    ValueError (as a call made after close), none waits for ever. A task that
    swallows its cancellation is not waited for beyond the stop's bound."""
    import threading

    from chainfs.client import _loop

    monkeypatch.setattr(_loop, "_STOP_TIMEOUT_S", 0.5)
    lt = LoopThread("test-stop")
    started, cleaned = threading.Semaphore(0), threading.Semaphore(0)

    async def slow() -> None:
        started.release()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.release()

    async def stubborn() -> None:
        started.release()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)

    got: list[BaseException | None] = []

    def call(coro: object) -> None:
        try:
            lt.run(coro)  # type: ignore[arg-type]
            got.append(None)
        except BaseException as e:
            got.append(e)

    threads = [threading.Thread(target=call, args=(slow(),)) for _ in range(4)]
    threads.append(threading.Thread(target=call, args=(stubborn(),)))
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=10)
    lt.stop()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(got) == 5
    assert all(isinstance(e, ValueError) and "closed" in str(e) for e in got), got
    for _ in range(4):  # the cancelled calls' finally blocks ran
        assert cleaned.acquire(timeout=0)
    with pytest.raises(ValueError, match="closed"):
        lt.call_soon(lambda: None)


def test_call_soon_runs_without_the_callers_context(lt: LoopThread) -> None:
    """What a caller's thread hands the loop (a session end, a timer to arm)
    must not carry its context variables: run_in_caller's mark would make the
    loop's tasks block the loop with calls from its own thread."""
    import contextvars
    import threading

    mark: contextvars.ContextVar[str | None] = contextvars.ContextVar("mark", default=None)
    seen: list[str | None] = []
    ran = threading.Event()
    tasks: list[asyncio.Task[None]] = []

    def on_loop() -> None:
        async def task() -> None:
            seen.append(mark.get())
            ran.set()

        seen.append(mark.get())
        tasks.append(asyncio.ensure_future(task()))

    mark.set("caller")
    lt.call_soon(on_loop)
    assert ran.wait(10)
    assert seen == [None, None]
