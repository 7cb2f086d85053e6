"""`chainfs admin query-chunk PATH|INODE INDEX` against a real cluster: a path is
resolved through the client to the file's inode; a missing path is ENOENT."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from chainfs.common.checksum import crc32c
from chainfs.local import LocalCluster
from tests.integration.client_fixtures import CHUNK, module_cluster, pattern

pytestmark = pytest.mark.timeout(180)
TAIL = 1000  # bytes in the file's second chunk


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "query-chunk", storage_nodes=3, replicas=3)


def query_chunk(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chainfs", "admin", "query-chunk", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )


def replicas(address: str, file: str, index: int) -> list[dict[str, Any]]:
    out = query_chunk(address, file, str(index), "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def test_query_chunk_by_path_equals_by_inode(cluster: LocalCluster) -> None:
    fs = cluster.client()
    data = pattern(CHUNK + TAIL, "query-chunk")
    fs.mkdir("/data", exist_ok=True)
    fs.write_file("/data/x.bin", data)
    by_path = replicas(cluster.address, "/data/x.bin", 1)
    assert len(by_path) == 3
    for r in by_path:
        assert r["state"] == "serving" and r["committed_version"] >= 1
        assert r["pending_version"] == 0
        assert r["length"] == TAIL and r["crc32c"] == crc32c(data[CHUNK:])
    ino = fs.stat("/data/x.bin").st_ino
    assert replicas(cluster.address, str(ino), 1) == by_path
    first = replicas(cluster.address, "/data/x.bin", 0)
    assert {r["length"] for r in first} == {CHUNK}


def test_query_chunk_of_a_missing_path_is_enoent(cluster: LocalCluster) -> None:
    out = query_chunk(cluster.address, "/data/missing.bin", "0")
    assert out.returncode == 1
    assert "ENOENT" in out.stderr and "/data/missing.bin" in out.stderr
    assert "Traceback" not in out.stderr


def test_query_chunk_of_a_directory_is_eisdir(cluster: LocalCluster) -> None:
    cluster.client().mkdir("/dir-has-no-chunks", exist_ok=True)
    out = query_chunk(cluster.address, "/dir-has-no-chunks", "0")
    assert out.returncode == 1 and "EISDIR" in out.stderr


def test_query_chunk_refuses_what_is_neither_path_nor_inode(cluster: LocalCluster) -> None:
    out = query_chunk(cluster.address, "data/x.bin", "0")
    assert out.returncode == 2  # a usage error: nothing was asked of the cluster
    assert "neither an absolute path nor an inode number" in out.stderr
