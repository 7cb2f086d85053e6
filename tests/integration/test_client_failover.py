"""Reads survive a storage node dying under them (chains of 3: another replica answers)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import chainfs
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import CHUNK, module_cluster, pattern

pytestmark = pytest.mark.timeout(180)

SIZE = 24 * CHUNK + 123  # chunks on every chain, so every node holds some


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "client-failover")


def test_read_completes_when_a_storage_node_is_killed(cluster: LocalCluster) -> None:
    fs = cluster.client()
    data = pattern(SIZE, "failover")
    fs.write_file("/victim.bin", data)
    samples = [("/victim.bin", off, 300_000) for off in range(0, SIZE - 300_000, 1_500_007)]

    with fs.open("/victim.bin", "rb") as f:
        first = f.read(SIZE // 4)
        cluster.kill_storage(0)  # SIGKILL, mid-read: routing still lists its targets
        rest = f.read()
    assert first + rest == data

    # A fresh whole-file read and a batched sample read, still with the node dead.
    assert fs.read_file("/victim.bin") == data
    got = fs.read_ranges(samples)
    assert [bytes(g) for g in got] == [data[o : o + n] for _, o, n in samples]

    # Concurrent readers while a second node is killed: every read still completes.
    errors: list[BaseException] = []
    started = threading.Barrier(4)

    def reader() -> None:
        try:
            with chainfs.connect(cluster.address) as own:
                started.wait()
                assert own.read_file("/victim.bin") == data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait()
    cluster.kill_storage(1)
    for t in threads:
        t.join()
    assert not errors, errors

    # The killed nodes come back with their config and target directories.
    cluster.restart_storage(0)
    cluster.restart_storage(1)
    assert not cluster.dead_processes()
    assert fs.read_file("/victim.bin") == data
