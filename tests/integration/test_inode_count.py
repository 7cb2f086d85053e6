"""`df -i` through the client: the inodes meta counts in use grow with every
create (file, directory, symlink, special file) and fall back when they are
removed (written files once GC has dropped their chunks)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from chainfs.client.sync import FileSystem
from chainfs.local import LocalCluster
from chainfs.meta_service.config import INODES_TOTAL
from tests.integration.client_fixtures import module_cluster, pattern

pytestmark = pytest.mark.timeout(180)

GC_WAIT_S = 60.0  # how long written files may take to leave GC


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from module_cluster(tmp_path_factory, "inode-count")


def used(fs: FileSystem) -> int:
    s = fs.statfs()
    assert s.f_files == INODES_TOTAL
    return s.f_files - s.f_ffree


def test_used_inodes_follow_creates_and_removals(cluster: LocalCluster) -> None:
    fs = cluster.client()
    before = used(fs)
    assert before >= 1  # the root
    fs.mkdir("/icount")
    for i in range(5):
        fs.write_file(f"/icount/w{i}", pattern(1000 + i, str(i)))
    for i in range(3):
        fs.write_file(f"/icount/e{i}", b"")
    fs.symlink("w0", "/icount/link")
    fs.link("/icount/w1", "/icount/w1-again")  # a second name is no new inode
    assert used(fs) == before + 1 + 5 + 3 + 1
    for name in fs.listdir("/icount"):
        fs.remove(f"/icount/{name}")
    fs.rmdir("/icount")
    deadline = time.monotonic() + GC_WAIT_S
    while used(fs) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert used(fs) == before
