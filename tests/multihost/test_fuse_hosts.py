"""The FUSE mount on the client host: tar a tree in and out (test_fuse_posix's check).

The mount process runs on host "client" (its own network namespace, this
machine's mount namespace): tar here reads and writes through it, and the
mount reaches meta and the storage hosts across the bridge.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chainfs.testing.hosts import MultiHostCluster
from tests.integration import test_fuse_posix as posix
from tests.integration.fuse_fixtures import require_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

src = posix.src
d = posix.d
test_tar_round_trip = posix.test_tar_round_trip


@pytest.fixture(scope="module")
def mnt(hosts: MultiHostCluster) -> Path:
    require_fuse()
    assert hosts.mountpoint is not None, "FUSE is available but the cluster was not mounted"
    mount = hosts.mount_process
    assert mount is not None and mount.alive()
    # The mount process is on the client host: its network namespace is not ours.
    client_ns = os.stat(f"/run/netns/{hosts.host_of('mount').namespace}").st_ino
    assert os.stat(f"/proc/{mount.pid}/ns/net").st_ino == client_ns
    return hosts.mountpoint
