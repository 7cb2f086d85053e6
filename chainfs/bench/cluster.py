"""The one way the benchmarks bring up chainfs: ``LocalCluster``, real processes.

Every benchmark that needs servers starts them here (the suite's clusters, the
storage, HA, FUSE and metadata studies), so there is one place that knows
where the cluster machinery lives.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import StorageClient, StorageClientConfig
from chainfs.local import LocalCluster, MountProcess
from chainfs.local.etcd import EtcdCluster
from chainfs.local.postgres import PostgresServer

__all__ = [
    "EtcdCluster",
    "LocalCluster",
    "MountProcess",
    "PostgresServer",
    "chain_ids",
    "fuse_unavailable",
    "storage_client",
    "suite_cluster",
]

Log = Callable[[str], None]


def fuse_unavailable() -> str | None:
    """Why this machine cannot mount FUSE at all, or None.

    Only the machine and the optional ``fuse`` extra count: a chainfs FUSE
    module that fails to import is a failure of the run, not a reason.
    """
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing on this machine"
    if importlib.util.find_spec("pyfuse3") is None:
        return "pyfuse3 is not installed (pip install 'chainfs[fuse]')"
    return None


@contextlib.contextmanager
def suite_cluster(
    base: Path, want_mount: bool, log: Log, **kwargs: Any
) -> Iterator[tuple[LocalCluster, Path | None, str]]:
    """A started LocalCluster, with a FUSE mount if asked for and the machine can.

    Yields (cluster, mountpoint or None, why there is no mount: "not run: ..."
    when the machine cannot or nobody asked, "failed: ..." when mounting broke).
    """
    missing = fuse_unavailable() if want_mount else "not asked for (--no-fuse or 1 replica)"
    reason = f"not run: {missing}"
    cluster = None
    if missing is None:
        try:
            cluster = LocalCluster(base / "cm", mount=base / "mnt", **kwargs)
        except (OSError, ChainfsError) as e:
            reason = (
                f"failed: the cluster did not start with a FUSE mount: {str(e).splitlines()[0]}"
            )
            log(f"{reason}; starting without")
    if cluster is None:
        cluster = LocalCluster(base / "c", **kwargs)
    try:
        with cluster.admin_environment():  # the bench's worker processes act as "admin"
            yield cluster, cluster.mountpoint, reason
    finally:
        cluster.stop()


async def storage_client(address: str, **config: Any) -> tuple[StorageClient, MgmtClient]:
    """A data-plane client of the cluster at ``address`` (close both when done)."""
    mgmt = MgmtClient(address)
    routing = RoutingCache(mgmt)
    await routing.refresh()
    return StorageClient(routing, os.urandom(16), StorageClientConfig(**config)), mgmt


async def chain_ids(mgmt: MgmtClient) -> list[int]:
    """The cluster's chains, in id order."""
    routing = await mgmt.get_routing()
    assert routing is not None
    return routing.chain_ids()
