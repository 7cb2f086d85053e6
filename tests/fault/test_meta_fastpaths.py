"""kill -9 of meta (rocksdb) under creates that end their session in the
background, writes and unlinks: after a restart every acknowledged create
exists with its length, every acknowledged unlink is gone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from chainfs.local import cluster as cluster_mod
from tests.fault import faultlib as fl


@pytest.mark.timeout(240)
def test_kill9_meta_keeps_fast_creates_writes_and_unlinks(tmp_path: Path) -> None:
    with cluster_mod.LocalCluster(
        tmp_path, storage_nodes=3, targets_per_node=1, replicas=3, kv="rocksdb"
    ) as c:
        fs = c.client()
        fs.makedirs("/k", exist_ok=True)
        empty: list[str] = []  # created, closed without writing (session ended in the background)
        written: dict[str, bytes] = {}
        removed: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                path = f"/k/f{i:05d}"
                try:
                    if i % 3 == 1:
                        data = f"{path} {i}".encode() * (1 + i % 50)
                        fs.write_file(path, data)
                        written[path] = data
                    elif i % 6 == 5 and empty:
                        doomed = empty.pop()
                        fs.remove(doomed)
                        removed.append(doomed)
                    else:
                        fs.open(path, "wb").close()
                        empty.append(path)
                except OSError as e:
                    errors.append(f"{path}: {e!r}")
                i += 1

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            fl.poll(lambda: len(empty) >= 30 and len(removed) >= 10, 90, "load before the kill")
            c.kill_meta(0)  # SIGKILL, mid-load
            stop.set()
            c.restart_meta(0)
        finally:
            stop.set()
            t.join(120)
        assert not t.is_alive()
        check = c.client()
        for path in empty:
            assert check.stat(path).st_size == 0, path
        for path, data in written.items():
            assert check.stat(path).st_size == len(data), path
            assert check.read_file(path) == data, path
        for path in removed:
            assert not check.exists(path), path
        print(
            f"meta kill -9: {len(empty)} empty, {len(written)} written, "
            f"{len(removed)} removed acknowledged; {len(errors)} failed: {errors[:3]}"
        )
