"""SyncDataClient against a real DataServer (on an event-loop thread of this process).

What a caller relies on: the reply's bytes land in its buffers; an error reply
raises the server's error and keeps the connection; a socket goes back to the
pool only after a whole reply (a timeout or a KeyboardInterrupt in the middle
of one drops it, and the next request gets a fresh, clean connection); the
pool is bounded (EBUSY at once, never a wait); a credential is presented once
per connection; a fork()ed child never uses the parent's sockets, nor waits
for the parent's pool lock; sockets to a peer that went away are not kept.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chainfs.client._loop import LoopThread
from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.secret import node_credential
from chainfs.common.dataplane import DataPlaneConfig, DataServer, Request, Response
from chainfs.common.dataplane.sync_client import SyncDataClient, SyncRequest
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.tls import TlsConfig

ECHO, FAIL, SLOW = 1, 2, 3
SECRET = b"s" * 32


def _cfg(**kw: Any) -> DataPlaneConfig:
    return DataPlaneConfig(
        max_payload_bytes=1 << 20,
        buffer_pool_bytes=8 << 20,
        buffer_pool_cached_bytes=4 << 20,
        max_pool_bytes_per_connection=2 << 20,
        tls=TlsConfig(),
        **kw,
    )


async def _handle(req: Request) -> Response:
    if req.msg_type == FAIL:
        raise ChainfsError(Code.ENOENT, "no such thing")
    if req.msg_type == SLOW:
        await asyncio.sleep(2.0)
    # Echo: the header back, and as payload the header repeated to the length it names.
    n = int(req.header.split(b":")[0])
    return Response(
        req.msg_type, req.header, payload=[(req.header * (n // len(req.header) + 1))[:n]]
    )


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread("sync-client-test")
    yield lt
    lt.stop()


@pytest.fixture(scope="module", params=["tcp", "unix"])
def address(
    request: pytest.FixtureRequest, loop: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    unix = str(tmp_path_factory.mktemp("sc") / "s.sock") if request.param == "unix" else None

    async def start() -> DataServer:
        server = DataServer(
            _handle, unix_path=unix, config=_cfg(), authenticator=Authenticator(SECRET)
        )
        await server.start()
        return server

    server = loop.run(start())
    yield server.unix_address if unix else server.address
    loop.run(server.stop())


def _client(**kw: Any) -> SyncDataClient:
    opts: dict[str, Any] = {"connections_per_peer": 2, "timeout_s": 1.0} | kw
    return SyncDataClient(_cfg(), node_credential(SECRET, 7), **opts)


def _echo(c: SyncDataClient, address: str, n: int) -> bytes:
    header = f"{n}:echo".encode()
    out = bytearray(n + 10)
    hdr, rsp = c.request(address, ECHO, header, lambda t, h: [memoryview(out)])
    assert rsp == header and hdr.payload_len == n
    return bytes(out[:n])


def _expected(n: int) -> bytes:
    header = f"{n}:echo".encode()
    return (header * (n // len(header) + 1))[:n]


@pytest.mark.parametrize("n", [0, 1, 4096, 100_000])
def test_reply_bytes_land_in_the_callers_buffer(address: str, n: int) -> None:
    c = _client()
    try:
        assert _echo(c, address, n) == _expected(n)
        assert _echo(c, address, n) == _expected(n)
        assert c.connection_count(address) == 1  # reused
    finally:
        c.close()
    assert c.connection_count(address) == 0


def test_a_payload_lands_in_many_small_buffers_in_order(address: str) -> None:
    """A batched read's reply is many small values: more buffers than one system
    call fills, of odd sizes, the first ones filled from what came with the header."""
    c = _client()
    sizes = [1, 7, 4096, 3, 100] * 80  # 400 buffers
    n = sum(sizes) - 50  # the last buffers are not filled to the end
    bufs = [bytearray(k) for k in sizes]
    try:
        header = f"{n}:echo".encode()
        c.request(address, ECHO, header, lambda t, h: [memoryview(b) for b in bufs])
        assert b"".join(bufs)[:n] == _expected(n)
        assert c.connection_count(address) == 1  # read to its end: reused
        assert _echo(c, address, 10) == _expected(10)
    finally:
        c.close()


def test_error_reply_raises_and_keeps_the_connection(address: str) -> None:
    c = _client()
    try:
        with pytest.raises(ChainfsError) as e:
            c.request(address, FAIL, b"x")
        assert e.value.code == Code.ENOENT and "no such thing" in e.value.message
        assert c.connection_count(address) == 1
        assert _echo(c, address, 10) == _expected(10)
        assert c.connection_count(address) == 1
    finally:
        c.close()


def test_timeout_drops_the_connection_and_the_next_request_is_clean(address: str) -> None:
    c = _client(timeout_s=0.3)
    try:
        with pytest.raises(ChainfsError) as e:
            c.request(address, SLOW, b"10:slow", lambda t, h: [memoryview(bytearray(10))])
        assert e.value.code == Code.ETIMEDOUT
        assert c.connection_count(address) == 0
        # The late reply of the slow request must never be taken for this one's.
        assert _echo(c, address, 4096) == _expected(4096)
    finally:
        c.close()


def test_interrupt_mid_reply_drops_the_connection(address: str) -> None:
    c = _client()

    def sink(msg_type: int, header: bytes) -> list[memoryview]:
        raise KeyboardInterrupt  # Ctrl-C after the header, before the payload was read

    try:
        assert _echo(c, address, 10) == _expected(10)
        with pytest.raises(KeyboardInterrupt):
            c.request(address, ECHO, b"100000:echo", sink)
        assert c.connection_count(address) == 0  # the half-read socket is gone
        assert _echo(c, address, 50_000) == _expected(50_000)
    finally:
        c.close()


def test_pool_is_bounded_and_safe_for_many_threads(address: str) -> None:
    c = _client(connections_per_peer=2)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        for i in range(200):
            n = (seed * 7919 + i * 131) % 20_000
            try:
                assert _echo(c, address, n) == _expected(n)
            except ChainfsError as e:
                if e.code != Code.EBUSY:  # all connections taken: the caller falls back
                    errors.append(e)
            except BaseException as e:
                errors.append(e)
            if c.connection_count(address) > 2:
                errors.append(AssertionError(f"{c.connection_count(address)} connections"))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[:3]
        assert c.connection_count(address) <= 2
    finally:
        c.close()


def _echo_request(address: str, n: int, out: bytearray) -> SyncRequest:
    return SyncRequest(address, ECHO, f"{n}:echo".encode(), lambda t, h: [memoryview(out)])


def test_many_requests_are_each_answered_and_fail_alone(address: str) -> None:
    """All frames go out before any reply is read; each request gets its own
    answer: bytes into its own buffer, its own error, EBUSY past the bound."""
    c = _client(connections_per_peer=3)
    outs = [bytearray(4096), bytearray(100_000), bytearray(10)]
    try:
        got = c.request_many(
            [
                _echo_request(address, 4096, outs[0]),
                SyncRequest(address, FAIL, b"x"),
                _echo_request(address, 100_000, outs[1]),
                _echo_request(address, 10, outs[2]),  # a fourth socket: over the bound
            ]
        )
        assert not isinstance(got[0], ChainfsError) and got[0][1] == b"4096:echo"
        assert bytes(outs[0]) == _expected(4096)
        assert isinstance(got[1], ChainfsError) and got[1].code == Code.ENOENT
        assert not isinstance(got[2], ChainfsError) and bytes(outs[1]) == _expected(100_000)
        assert isinstance(got[3], ChainfsError) and got[3].code == Code.EBUSY
        assert outs[2] == bytearray(10)
        assert c.connection_count(address) == 3  # every reply read whole: all kept
        again = c.request_many([_echo_request(address, n, bytearray(n)) for n in (1, 2, 3)])
        assert all(not isinstance(r, ChainfsError) for r in again)
        assert c.connection_count(address) == 3  # reused
    finally:
        c.close()
    assert c.connection_count(address) == 0


def test_many_requests_drop_only_sockets_not_read_to_the_end(address: str) -> None:
    """A slow peer times out its request (its socket dropped, its late reply never
    taken for another's); a Ctrl-C in the middle drops every socket whose reply
    was not read whole, and keeps those that were."""
    c = _client(connections_per_peer=3, timeout_s=0.3)
    try:
        out = bytearray(10)
        got = c.request_many(
            [
                _echo_request(address, 10, out),
                SyncRequest(address, SLOW, b"10:slow", lambda t, h: [memoryview(bytearray(10))]),
            ]
        )
        assert not isinstance(got[0], ChainfsError) and bytes(out) == _expected(10)
        assert isinstance(got[1], ChainfsError) and got[1].code == Code.ETIMEDOUT
        assert c.connection_count(address) == 1
        assert _echo(c, address, 4096) == _expected(4096)

        def interrupt(msg_type: int, header: bytes) -> list[memoryview]:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            c.request_many(
                [
                    _echo_request(address, 5, bytearray(5)),
                    SyncRequest(address, ECHO, b"100000:echo", interrupt),
                    _echo_request(address, 7, bytearray(7)),
                ]
            )
        assert c.connection_count(address) == 1  # the first was whole; the others dropped
        assert _echo(c, address, 50_000) == _expected(50_000)
    finally:
        c.close()


def test_an_interrupt_between_sends_leaks_no_socket(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the second of three frames is being sent: the sockets taken
    so far are closed and their pool slots freed, so the bound still admits a
    whole batch afterwards."""
    c = _client(connections_per_peer=2)
    real_send = c._send
    sends = 0

    def send(*args: Any) -> int:
        nonlocal sends
        sends += 1
        if sends == 2:
            raise KeyboardInterrupt
        return real_send(*args)

    try:
        monkeypatch.setattr(c, "_send", send)
        with pytest.raises(KeyboardInterrupt):
            c.request_many([_echo_request(address, 5, bytearray(5)) for _ in range(2)])
        monkeypatch.undo()
        assert c.connection_count(address) == 0
        outs = [bytearray(100), bytearray(200)]
        got = c.request_many([_echo_request(address, len(o), o) for o in outs])
        assert not any(isinstance(r, ChainfsError) for r in got), got
        assert [bytes(o) for o in outs] == [_expected(100), _expected(200)]
    finally:
        c.close()


def test_bad_credential_is_refused(address: str) -> None:
    c = SyncDataClient(_cfg(), node_credential(b"x" * 32, 7), 2, 1.0)
    try:
        with pytest.raises(ChainfsError) as e:
            c.request(address, ECHO, b"1:echo", lambda t, h: [memoryview(bytearray(1))])
        assert e.value.code == Code.UNAUTHENTICATED
        assert c.connection_count(address) == 0
    finally:
        c.close()


def test_unreachable_peer_is_unavailable(tmp_path: Any) -> None:
    c = _client()
    try:
        for _ in range(2):  # the second fails at once: the peer failed lately
            with pytest.raises(ChainfsError) as e:
                c.request(f"unix:{tmp_path}/none.sock", ECHO, b"1:echo")
            assert e.value.code == Code.UNAVAILABLE
    finally:
        c.close()


def test_forked_child_uses_its_own_connections(address: str) -> None:
    c = _client()
    try:
        assert _echo(c, address, 100) == _expected(100)
        pid = os.fork()
        if pid == 0:  # the child: exit status says what it saw
            code = 1
            try:
                code = 0 if _echo(c, address, 5000) == _expected(5000) else 2
                code = code or (3 if c.connection_count(address) != 1 else 0)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's pooled socket was not touched by the child.
        assert c.connection_count(address) == 1
        assert _echo(c, address, 100) == _expected(100)
    finally:
        c.close()


def test_tls_on_is_refused() -> None:
    cfg = DataPlaneConfig(tls=TlsConfig(ca_file="/nonexistent"))
    with pytest.raises((ChainfsError, ValueError)):
        SyncDataClient(cfg, None, 2, 1.0)


def test_a_forked_child_closes_while_a_parent_thread_holds_the_pool(address: str) -> None:
    """A thread of the parent was inside the pool (its lock held) at fork():
    the child's close (at exit, say) must not wait for a lock nobody will
    release in it."""
    c = _client()
    try:
        assert _echo(c, address, 100) == _expected(100)
        with c._lock:  # another thread of the parent, mid-request
            pid = os.fork()
            if pid == 0:
                gc.disable()  # other tests' gRPC objects must not be collected here
                code = 1
                try:
                    c.close()
                    code = 0
                finally:
                    os._exit(code)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child's close hung on the parent's pool lock")
        assert _echo(c, address, 100) == _expected(100)  # the parent's pool is intact
    finally:
        c.close()


@pytest.fixture
def own_server(loop: LoopThread) -> Iterator[tuple[str, Any]]:
    """A DataServer of this test alone (it may stop it): its address and a stop function."""

    async def start() -> DataServer:
        server = DataServer(_handle, config=_cfg(), authenticator=Authenticator(SECRET))
        await server.start()
        return server

    server = loop.run(start())
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            loop.run(server.stop())

    yield server.address, stop
    stop()


def _two_pooled(c: SyncDataClient, address: str) -> None:
    got = c.request_many([SyncRequest(address, ECHO, b"0:echo") for _ in range(2)])
    assert all(not isinstance(r, ChainfsError) for r in got)
    assert c.connection_count(address) == 2


def test_a_lost_connection_closes_the_peers_other_free_sockets(
    own_server: tuple[str, Any],
) -> None:
    """A restarted server fails every socket pooled to it: the first failure
    drops the others, rather than each later request failing on one."""
    address, stop = own_server
    c = _client()
    try:
        _two_pooled(c, address)
        stop()
        with pytest.raises(ChainfsError) as e:
            c.request(address, ECHO, b"0:echo")
        assert e.value.code == Code.UNAVAILABLE
        assert c.connection_count(address) == 0
    finally:
        c.close()


def test_free_sockets_of_a_peer_no_longer_asked_are_closed(
    address: str, own_server: tuple[str, Any]
) -> None:
    """Sockets pooled to a peer nobody asks any more (a restarted server's old
    address) are closed by a sweep once they are idle past the idle timeout."""
    old, _ = own_server
    c = SyncDataClient(_cfg(client_idle_timeout_ms=200), node_credential(SECRET, 7), 2, 1.0)
    try:
        _two_pooled(c, old)
        time.sleep(0.3)
        assert _echo(c, address, 10) == _expected(10)  # another peer: the sweep runs
        assert c.connection_count(old) == 0
        assert c.connection_count(address) == 1
    finally:
        c.close()


def test_a_childs_threads_forget_the_parents_pool_once(address: str) -> None:
    """The first requests of a fork()ed child's threads, at once: one of them
    resets the pool and the others wait for it, so the counts stay those of
    the sockets the pool holds (a reset under another thread's request lost
    them). Here a child is simulated in-process (the pool's pid made foreign),
    with thread switches as frequent as the interpreter allows, many rounds."""
    switch_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(30):
            c = _client(connections_per_peer=4)
            try:
                assert _echo(c, address, 10) == _expected(10)
                c._pid = -1  # as after fork(): the pool is the parent's
                start = threading.Barrier(12)

                def first_requests(c: SyncDataClient, start: threading.Barrier) -> None:
                    start.wait()
                    for _ in range(3):
                        try:
                            _echo(c, address, 10)
                        except ChainfsError as e:
                            assert e.code == Code.EBUSY  # past the bound: refused, not queued

                threads = [
                    threading.Thread(target=first_requests, args=(c, start)) for _ in range(12)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                idle = len(c._idle.get(address, []))
                assert c.connection_count(address) == idle <= 4
            finally:
                c.close()
    finally:
        sys.setswitchinterval(switch_s)
