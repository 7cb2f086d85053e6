"""A chainfs cluster spread over network-namespace hosts (chainfs.testing.hosts).

Hosts: mgmtd, meta, storage0..2 (one storage node each, 2 targets), client
(the FUSE mount); this machine, where the tests run, is one more client host.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from chainfs.testing.hosts import HostNetwork, MultiHostCluster
from tests.conftest import require
from tests.integration.fuse_fixtures import force_unmount, is_mounted

HOSTS = ["mgmtd", "meta", "storage0", "storage1", "storage2", "client"]


def require_hosts() -> None:
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b) is None]
    require(
        "network namespaces",
        os.geteuid() == 0 and not missing,
        "needs root and ip, nsenter, unshare (iproute2, util-linux)"
        + (f"; missing {missing}" if missing else ""),
    )


def fuse_available() -> bool:
    import importlib.util

    return (
        os.path.exists("/dev/fuse")
        and importlib.util.find_spec("pyfuse3") is not None
        and shutil.which("fusermount3") is not None
    )


def hosts_cluster(base: Path, mount: bool = False, **kwargs: object) -> Iterator[MultiHostCluster]:
    """Body of a fixture: network + cluster (+ mount); all of it gone after, also on failure."""
    require_hosts()
    mountpoint: Path | None = None
    try:
        with (
            HostNetwork.create(HOSTS) as net,
            MultiHostCluster(
                base / "cluster",
                net,
                mount=base if mount else None,
                **kwargs,  # type: ignore[arg-type]
            ) as cluster,
        ):
            mountpoint = cluster.mountpoint
            yield cluster
            dead = cluster.dead_processes()
            assert not dead, f"processes died during the tests: {dead}"
    finally:
        if mountpoint is not None:
            force_unmount(mountpoint)
    assert mountpoint is None or not is_mounted(mountpoint), f"{mountpoint} still mounted"


@pytest.fixture(scope="package")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostCluster]:
    """The package's cluster, mounted on the client host when FUSE is available."""
    base = Path(tmp_path_factory.mktemp("multihost"))
    yield from hosts_cluster(base, mount=fuse_available())
