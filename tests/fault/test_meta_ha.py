"""Two meta servers over one etcd: kill -9 one under metadata load; nothing acknowledged
is lost and clients carry on through the other."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from chainfs.local import cluster as cluster_mod
from chainfs.proto import mgmt_pb2 as mp
from tests.conftest import require_binary
from tests.fault import faultlib as fl


@pytest.mark.timeout(180)
def test_kill9_one_meta_server_under_load(tmp_path: Path) -> None:
    require_binary("etcd")
    with cluster_mod.LocalCluster(
        tmp_path, storage_nodes=3, targets_per_node=1, replicas=3, kv="etcd"
    ) as c:
        second = c._spawn("meta", "meta2", c._meta_config())  # same store, second server
        fl.poll(
            lambda: len(fl.routing(c.address).nodes_of_type(mp.META)) >= 2, 30, "two meta servers"
        )
        fs = c.client()
        fs.makedirs("/m", exist_ok=True)
        acked: dict[str, str] = {}
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                path = f"/m/d{i % 7}/f{i:05d}"
                data = f"{path} {i}".encode() * 20
                try:
                    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                    fs.write_file(path, data)
                    fs.rename(path, path + ".done")
                except OSError as e:
                    errors.append(f"{path}: {e!r}")
                else:
                    acked[path + ".done"] = hashlib.sha256(data).hexdigest()
                i += 1

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            fl.poll(lambda: len(acked) >= 20, 60, "20 files before the kill")
            assert c.meta is not None
            c._killed.add(c.meta.name)
            c.meta.kill()
            n = len(acked)
            fl.poll(lambda: len(acked) >= n + 20, 60, "metadata ops to continue")
        finally:
            stop.set()
            t.join(60)
        assert not t.is_alive()
        for path, digest in acked.items():
            assert hashlib.sha256(fs.read_file(path)).hexdigest() == digest, path
        assert second.alive()
        print(f"meta kill: {len(acked)} acknowledged, {len(errors)} failed ops: {errors[:3]}")
