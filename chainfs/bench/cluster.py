"""The one way the benchmarks bring up chainfs: ``LocalCluster``, real processes.

Every benchmark that needs servers starts them here (the suite's clusters, the
storage, HA, FUSE and metadata studies), so there is one place that knows
where the cluster machinery lives.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

from chainfs.common.auth import capability
from chainfs.common.auth.capability import READ, WRITE
from chainfs.common.auth.secret import capability_key, load_secret
from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.mgmt_client import MgmtClient, RoutingCache
from chainfs.common.rpc.storage_client import StorageClient, StorageClientConfig
from chainfs.local import LocalCluster, MountProcess
from chainfs.local.etcd import EtcdCluster
from chainfs.local.postgres import PostgresServer
from chainfs.proto import common_pb2 as cpb

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


class SignedCapabilities:
    """Capabilities the bench signs itself with the cluster's key (it started the
    cluster and holds its secret): the storage studies name chunks of inodes no
    file owns, and storage still checks each of their requests as a client's."""

    TTL_MS = 10 * 60_000

    def __init__(self, secret_file: Path, client_id: bytes) -> None:
        self._key = capability_key(load_secret(secret_file), 1)
        self._client_id = client_id
        self._caps: dict[int, cpb.Capability] = {}

    def _cap(self, inode: int) -> cpb.Capability:
        cap = self._caps.get(inode)
        if cap is None or cap.expires_ms - time.time() * 1000 < self.TTL_MS / 2:
            cap = capability.sign(self._key, 1, inode, READ | WRITE, self._client_id, self.TTL_MS)
            self._caps[inode] = cap
        return cap

    async def get(
        self, inodes: Collection[int], right: int, fetch: bool = False
    ) -> dict[int, cpb.Capability]:
        return {ino: self._cap(ino) for ino in inodes}

    async def any_of(self, inode: int, fetch: bool = False) -> cpb.Capability | None:
        return self._cap(inode)

    def forget(self, inodes: Iterable[int]) -> None:
        for ino in inodes:
            self._caps.pop(ino, None)

    def peek(self, inode: int, right: int) -> cpb.Capability | None:
        return self._caps.get(inode)

    @property
    def signed(self) -> bool:
        return True


async def storage_client(
    address: str, secret_file: Path | None = None, **config: Any
) -> tuple[StorageClient, MgmtClient]:
    """A data-plane client of the cluster at ``address`` (close both when done);
    with the cluster's ``secret_file``, its requests carry capabilities."""
    mgmt = MgmtClient(address)
    routing = RoutingCache(mgmt)
    await routing.refresh()
    client_id = os.urandom(16)
    caps = SignedCapabilities(secret_file, client_id) if secret_file is not None else None
    return StorageClient(routing, client_id, StorageClientConfig(**config), caps=caps), mgmt


async def chain_ids(mgmt: MgmtClient) -> list[int]:
    """The cluster's chains, in id order."""
    routing = await mgmt.get_routing()
    assert routing is not None
    return routing.chain_ids()
