"""The shared-memory path: a real `chainfs agent` with worker processes over a LocalCluster."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import chainfs.usrbio as usrbio
from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import module_cluster, pattern
from tests.integration.usrbio_fixtures import AgentProcess, wait_gone

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
DATA = pattern(64 * MiB + 12345, "usrbio")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "usrbio")


@pytest.fixture(scope="module")
def fs(cluster: LocalCluster) -> FileSystem:
    fs = cluster.client()
    with fs.open("/data", "wb") as f:
        f.write(DATA)
    fs.mkdir("/dir", exist_ok=True)
    return fs


@pytest.fixture()
def agent(cluster: LocalCluster, fs: FileSystem, tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(cluster.address, tmp_path, workers=2).start()
    yield a
    a.stop()


def _batch(buf: usrbio.SharedBuffer) -> list[usrbio.ReadRequest]:
    # Out of file order, into buffer order: a misplaced read cannot match.
    return [usrbio.ReadRequest("/data", (63 - i) * MiB, MiB, buf, i * MiB) for i in range(64)]


def _expected() -> bytes:
    return b"".join(DATA[(63 - i) * MiB : (64 - i) * MiB] for i in range(64))


def test_batch_of_64_reads_lands_in_the_shared_buffer(agent: AgentProcess) -> None:
    with usrbio.connect(agent.socket) as client:
        buf = client.register_buffer(64 * MiB)
        results = client.wait(client.submit(_batch(buf)))
        assert [c.nbytes for c in results] == [MiB] * 64
        assert all(c.ok for c in results)
        assert bytes(buf.view) == _expected()
        # numpy and torch views are the same memory, not copies.
        assert buf.numpy()[: 2 * MiB].tobytes() == _expected()[: 2 * MiB]
        torch = pytest.importorskip("torch")
        assert bytes(buf.tensor(torch.uint8)[:MiB].numpy()) == _expected()[:MiB]
        stats = client.stats()
        assert stats["buffers"] == agent.workers  # one mapping per worker
        assert stats["bytes_read"] >= 64 * MiB


def test_read_ranges_into_and_async_form(agent: AgentProcess) -> None:
    import asyncio

    with usrbio.connect(agent.socket) as client:
        buf = client.register_buffer(4 * MiB)
        views = client.read_ranges_into([("/data", 5, 100), ("/data", len(DATA) - 10, 50)], buf)
        assert [bytes(v) for v in views] == [DATA[5:105], DATA[-10:]]  # the second is short
        got = asyncio.run(client.read_async([("/data", 7 * MiB, MiB, buf, 0)]))
        assert got[0].nbytes == MiB and bytes(buf.view[:MiB]) == DATA[7 * MiB : 8 * MiB]


def test_errors_carry_the_errno_per_read(agent: AgentProcess) -> None:
    with usrbio.connect(agent.socket) as client:
        buf = client.register_buffer(MiB)
        results = client.read(
            [
                ("/missing", 0, 10, buf, 0),
                ("/dir", 0, 10, buf, 0),
                ("/data", 0, 10, buf, 100),
                ("/data", len(DATA) + 5, 10, buf, 0),
            ]
        )
        assert [c.errno for c in results] == [errno.ENOENT, errno.EISDIR, 0, 0]
        assert [c.nbytes for c in results[2:]] == [10, 0]  # past the end: nothing, no error
        assert bytes(buf.view[100:110]) == DATA[:10]
        with pytest.raises(FileNotFoundError):
            client.read_ranges_into([("/missing", 0, 10)], buf)
        # Bad input is refused before anything is sent.
        with pytest.raises(ValueError):
            client.submit([("/data", 0, 2 * MiB, buf, 0)])  # overruns the buffer
        with pytest.raises(ValueError):
            client.submit([("relative", 0, 10, buf, 0)])


def test_agent_killed_mid_batch_then_back(
    cluster: LocalCluster, fs: FileSystem, tmp_path: Path
) -> None:
    agent = AgentProcess(cluster.address, tmp_path, workers=2).start()
    try:
        client = usrbio.connect(agent.socket)
        buf = client.register_buffer(64 * MiB)
        # Workers paused: the batch is surely in flight when the agent dies.
        agent.signal_workers(signal.SIGSTOP)
        ticket = client.submit(_batch(buf))
        agent.kill()
        with pytest.raises(ConnectionError) as e:
            client.wait(ticket)
        assert e.value.errno == errno.ECONNRESET and "agent" in str(e.value)
        with pytest.raises(ConnectionError) as e:  # no agent at all: refused, says so
            client.read(_batch(buf))
        assert e.value.errno == errno.ECONNREFUSED and "no chainfs agent" in str(e.value)
        agent.start()
        buf.view[:] = bytes(64 * MiB)
        results = client.read(_batch(buf))  # reconnects, registers the buffer again
        assert all(c.ok for c in results) and bytes(buf.view) == _expected()
        client.close()
    finally:
        agent.stop()


def test_workers_exit_when_the_agent_dies(
    cluster: LocalCluster, fs: FileSystem, tmp_path: Path
) -> None:
    agent = AgentProcess(cluster.address, tmp_path, workers=2).start()
    try:
        assert agent.proc is not None
        agent.proc.kill()
        agent.proc.wait()
        assert wait_gone(agent.worker_pids) == []
    finally:
        agent.stop()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    import chainfs.usrbio as usrbio
    client = usrbio.connect(sys.argv[1])
    bufs = [client.register_buffer(8 << 20) for _ in range(3)]
    assert client.read([("/data", 0, 1 << 20, bufs[0], 0)])[0].ok
    print("holding", flush=True)
    time.sleep(600)
    """
)


def _worker_memfds(pids: list[int]) -> int:
    """memfd mappings of our buffers in the agent's workers (from /proc/PID/maps)."""
    return sum(Path(f"/proc/{pid}/maps").read_text().count("memfd:chainfs-usrbio") for pid in pids)


def test_dead_user_process_frees_its_buffers(agent: AgentProcess) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, agent.socket], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"holding\n"
        with usrbio.connect(agent.socket) as watcher:
            before = watcher.stats()
            assert before["buffers"] == 3 * agent.workers
            assert before["buffer_bytes"] == 3 * 8 * MiB * agent.workers
            assert _worker_memfds(agent.worker_pids) > 0
            holder.kill()
            holder.wait()
            deadline = time.monotonic() + 30
            while watcher.stats()["buffers"] and time.monotonic() < deadline:
                time.sleep(0.1)
            after = watcher.stats()
            assert (after["buffers"], after["buffer_bytes"]) == (0, 0)
            assert after["connections"] == agent.workers  # the watcher's own
            assert _worker_memfds(agent.worker_pids) == 0  # unmapped: memory back to the system
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_dead_worker_is_restarted_and_users_reconnect(agent: AgentProcess) -> None:
    with usrbio.connect(agent.socket) as client:
        buf = client.register_buffer(64 * MiB)
        old = client.stats()["workers"][0]["pid"]
        os.kill(old, signal.SIGKILL)
        with pytest.raises(ConnectionError):  # this batch had a part on the dead worker
            client.read(_batch(buf))
        deadline = time.monotonic() + 60
        while True:  # the agent restarts it; until then calls fail clearly
            try:
                results = client.read(_batch(buf))
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "worker not restarted"
                time.sleep(0.2)
        assert all(c.ok for c in results) and bytes(buf.view) == _expected()
        assert client.stats()["workers"][0]["pid"] != old
