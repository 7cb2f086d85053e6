"""Reads while a storage node crashes (kill -9) and comes back, cycle after cycle.

A node killed in the middle of a reply leaves the client a connection that
ends mid-frame; two healthy replicas remain, so no read may fail: the client
library (open/read, read_ranges, the KV cache) and the FUSE mount retry on another
replica. Every byte read is checked. The kills are seeded; every wait is a
bounded poll. The client readers go over the nodes' unix sockets or over TCP
(the mount always takes the unix sockets: its options do not choose).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chainfs.client.config import ClientConfig
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.testing import cluster as cluster_mod
from tests.fault import faultlib as fl
from tests.integration.fuse_fixtures import force_unmount, require_fuse

MiB = 1024 * 1024
FILE_BYTES = 16 * MiB
FILES = 3
CYCLES = 5
CLIENT_READERS = 4


class _Readers:
    """Threads reading whole files in a loop; every result checked, every failure kept."""

    def __init__(self, want: dict[str, str]) -> None:
        self.want = want  # name -> sha256 of its bytes
        self.ok = 0
        self.ok_by_reader: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, name: str, read: Callable[[str], bytes]) -> None:
        t = threading.Thread(target=self._loop, args=(name, read), daemon=True)
        self._threads.append(t)
        t.start()

    def _loop(self, who: str, read: Callable[[str], bytes]) -> None:
        names = sorted(self.want)
        k = 0
        while not self._stop.is_set():
            name = names[k % len(names)]
            k += 1
            try:
                got = read(name)
            except OSError as e:
                with self._lock:
                    self.failures.append(f"{who} {name}: {e!r}")
                continue
            with self._lock:
                if hashlib.sha256(got).hexdigest() != self.want[name]:
                    self.failures.append(f"{who} {name}: {len(got)} bytes, wrong content")
                else:
                    self.ok += 1
                    self.ok_by_reader[who] = self.ok_by_reader.get(who, 0) + 1

    def count(self) -> int:
        with self._lock:
            return self.ok

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
            assert not t.is_alive(), "reader thread did not stop"


def _read_whole(fs: Any) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        with fs.open("/" + name, "rb") as f:
            return bytes(f.read())

    return read


def _read_ranges(fs: Any) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        # Uneven pieces, so one call spans several chunks and replicas.
        cuts = [0, 3 * MiB + 17, 9 * MiB, FILE_BYTES]
        got = fs.read_ranges([("/" + name, a, b - a) for a, b in itertools.pairwise(cuts)])
        return b"".join(bytes(g) for g in got)

    return read


def _read_cached(kv: Any) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        got = kv.get(name)
        if got is None:
            raise OSError(f"kv cache lost {name}")
        return bytes(got)

    return read


def _read_mounted(mnt: Path) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        with open(mnt / name, "rb", buffering=0) as f:
            return f.read()

    return read


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_reads_survive_a_storage_node_killed_and_restarted(tmp_path: Path, transport: str) -> None:
    require_fuse()
    mnt = tmp_path / "mnt"
    try:
        with cluster_mod.LocalCluster(
            tmp_path / "cluster",
            storage_nodes=3,
            targets_per_node=2,
            replicas=3,
            heartbeat_interval_ms=300,
            heartbeat_timeout_ms=3000,
            mount=mnt,
            mount_options=["direct_io"],  # every read reaches the mount, not the page cache
        ) as c:
            _kill_loop_while_reading(c, mnt, transport)
    finally:
        force_unmount(mnt)


def _kill_loop_while_reading(c: cluster_mod.LocalCluster, mnt: Path, transport: str) -> None:
    storage = StorageClientConfig(prefer_unix_socket=transport == "unix")
    fs = c.client(config=ClientConfig(storage=storage))
    rng = random.Random(1234)
    want: dict[str, str] = {}
    for i in range(FILES):
        data = rng.randbytes(FILE_BYTES)
        fs.write_file(f"/f{i}", data)
        want[f"f{i}"] = hashlib.sha256(data).hexdigest()
    kv = fs.kvcache("/kv")
    for name in want:  # the same bytes as values of the KV cache
        with fs.open("/" + name, "rb") as f:
            assert kv.put(name, f.read())
    readers = _Readers(want)
    for k in range(CLIENT_READERS):
        readers.start(f"client{k}", _read_ranges(fs) if k == 0 else _read_whole(fs))
    readers.start("kvcache", _read_cached(kv))
    readers.start("mount0", _read_mounted(mnt))
    readers.start("mount1", _read_mounted(mnt))
    try:
        for cycle in range(CYCLES):
            before = readers.count()
            fl.poll(lambda b=before: readers.count() >= b + 3, 60, f"reads before kill {cycle}")
            victim = rng.randrange(len(c.storage))
            time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a reply
            c.kill_storage(victim)
            time.sleep(rng.uniform(0.5, 2.0))
            c.restart_storage(victim)
            # Back to three serving replicas before the next crash: a read may
            # then fail only if the client gave up while a replica could serve.
            fl.poll(lambda: fl.all_serving(c.address), 90, f"all targets serving, cycle {cycle}")
        after = readers.count()
        fl.poll(lambda: readers.count() >= after + 3, 60, "reads after the last restart")
    finally:
        readers.stop()
    assert readers.failures == [], "\n".join(readers.failures[:20])
    # Every reader, the mount's too, kept reading through the crashes.
    assert sorted(readers.ok_by_reader) == sorted(
        [*(f"client{k}" for k in range(CLIENT_READERS)), "kvcache", "mount0", "mount1"]
    ), readers.ok_by_reader
