"""MetaClient calls from a caller's thread (run_in_caller) against a real MetaServer.

A call answered from the thread never touches the loop; a refusal (ENOENT)
is the caller's answer at once, naming the path; a server that stays silent
is asked once from the thread, then left: the loop asks the others first and
the call succeeds there. A coroutine that would suspend is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_client import FRAME_PREFIX, CallerThread, MetaClient, run_in_caller
from tests.unit.meta.conftest import ROOT, MetaEnv, SilentServer

pytestmark = pytest.mark.timeout(60)


async def _in_a_thread(
    client: MetaClient,
    coro: Coroutine[Any, Any, Any],
    on_loop: list[str],
    attempt_timeout_s: float = 0.3,
) -> Any:
    """Run ``coro`` with run_in_caller in a worker thread (this test's loop stays
    free to serve); calls handed to the loop run here and are named in ``on_loop``."""
    loop = asyncio.get_running_loop()
    sync = client.sync_client(2, attempt_timeout_s)
    assert sync is not None

    def to_loop(c: Coroutine[Any, Any, Any]) -> Any:
        on_loop.append(c.cr_code.co_name)
        return asyncio.run_coroutine_threadsafe(c, loop).result()

    try:
        caller = CallerThread(sync, to_loop, loop.call_soon_threadsafe)
        return await asyncio.to_thread(run_in_caller, coro, caller)
    finally:
        sync.close()


async def test_answers_and_refusals_come_from_the_thread(env: MetaEnv) -> None:
    framed = FRAME_PREFIX + env.server.data_address
    client = MetaClient([framed], user=ROOT)
    try:
        await client.mkdir("/first")  # on the loop: the server calls go to is known now
        on_loop: list[str] = []
        await _in_a_thread(client, client.mkdir("/from-thread"), on_loop)
        assert (await _in_a_thread(client, client.stat("/from-thread"), on_loop)).ino > 0
        with pytest.raises(ChainfsError) as e:
            await _in_a_thread(client, client.stat("/absent"), on_loop)
        assert (e.value.code, e.value.filename) == (Code.ENOENT, "/absent")
        assert on_loop == []
        assert (await env.client.stat("/from-thread")).ino > 0
    finally:
        await client.aclose()


async def test_a_silent_server_is_asked_once_then_left(env: MetaEnv, silent: SilentServer) -> None:
    hung, hung_address = silent, silent.address
    framed = FRAME_PREFIX + env.server.data_address
    client = MetaClient([hung_address, framed], user=ROOT, timeout_s=30, attempt_timeout_s=5)
    try:
        client._current = hung_address  # the hung server is the one calls go to
        on_loop: list[str] = []
        await _in_a_thread(client, client.mkdir("/after-hang"), on_loop)
        assert on_loop == ["_call_on_loop"]
        assert hung.connections == 1  # the thread's attempt; the loop went elsewhere first
        assert client._current == framed
        assert (await env.client.stat("/after-hang")).ino > 0
    finally:
        await client.aclose()


async def test_the_attempt_from_the_thread_counts_against_the_call_deadline(
    silent: SilentServer,
) -> None:
    """Only a silent server: the call gives up at its deadline (2 s), the
    thread's attempt (1.5 s) included, not 1.5 s plus another 2."""
    hung_address = silent.address
    client = MetaClient([hung_address], user=ROOT, timeout_s=2.0, attempt_timeout_s=5)
    try:
        client._current = hung_address
        start = time.monotonic()
        with pytest.raises(ChainfsError) as e:
            await _in_a_thread(client, client.mkdir("/never"), [], attempt_timeout_s=1.5)
        elapsed_s = time.monotonic() - start
        assert e.value.code == Code.ETIMEDOUT
        assert 1.5 <= elapsed_s < 3.0, elapsed_s
    finally:
        await client.aclose()


async def test_before_any_call_the_loop_is_asked(env: MetaEnv) -> None:
    client = MetaClient([FRAME_PREFIX + env.server.data_address], user=ROOT)
    try:
        on_loop: list[str] = []
        await _in_a_thread(client, client.mkdir("/no-server-chosen-yet"), on_loop)
        assert on_loop == ["_call_on_loop"]
    finally:
        await client.aclose()


async def _sleeps() -> None:
    await asyncio.sleep(0)


async def _answers() -> int:
    return 7


async def _raises() -> None:
    raise ChainfsError(Code.EPERM, "no")


def test_run_in_caller_returns_raises_and_refuses_to_suspend() -> None:
    caller = CallerThread(sync=None, on_loop=lambda c: None, soon=lambda f: None)  # type: ignore[arg-type]
    assert run_in_caller(_answers(), caller) == 7
    with pytest.raises(ChainfsError):
        run_in_caller(_raises(), caller)
    with pytest.raises(RuntimeError, match="cannot run in the calling thread"):
        run_in_caller(_sleeps(), caller)
