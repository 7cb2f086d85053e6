"""A whole chainfs cluster on this machine, as real processes: `chainfs up`, tests, benches.

    with LocalCluster(tmp_path, storage_nodes=3, targets_per_node=2, replicas=3) as c:
        fs = c.client()
        with fs.open("/x", "wb") as f:
            f.write(b"...")
        c.kill_storage(0)      # SIGKILL one storage node
        c.restart_storage(0)   # same config, same target dirs

High availability: ``LocalCluster(d, kv="etcd", etcd_members=3,
mgmtds=2, metas=2)`` runs a 3-member etcd, two mgmtd (one primary by lease)
and two meta servers; ``.address`` lists every mgmtd, and so do the storage
and meta configs. ``kill_mgmtd_primary()``, ``kill_meta(i)``,
``kill_etcd(i)`` / ``restart_etcd(i)`` inject the faults.

``mgmtd_ports=[P]`` binds mgmtd to P (the address clients keep); a port some
other process listens on is refused with an error naming it.

Start order: (etcd), mgmtd, the storage nodes (each serving its target
directories), wait until every target is registered, create the chain table
(unless the data directory already has one), then meta. Every service gets a
TOML config generated from its own config dataclass, written under
``base_dir/<name>/``, next to its log. Only the pids started here are ever
signalled, also when start-up fails half-way and at interpreter exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from chainfs.common import config as cfg
from chainfs.common.auth.secret import SECRET_FILE_NAME, create_secret_file
from chainfs.common.errors import ChainfsError, Code
from chainfs.local.process import MountProcess, ServiceProcess, StopOnExit, check_port_free

if TYPE_CHECKING:
    from chainfs.client.sync import FileSystem
    from chainfs.common.routing import Routing
    from chainfs.common.rpc.mgmt_client import MgmtClient
    from chainfs.local.etcd import EtcdCluster

T = TypeVar("T")

DEFAULT_START_TIMEOUT_S = 60.0  # a whole cluster on 2 busy cores
_POLL_S = 0.05


def _run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a fresh loop in a helper thread.

    LocalCluster is synchronous but may be used from inside a running event
    loop (an async test): a private thread keeps the two loops apart.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(fn())
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, name="chainfs-cluster-admin", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _stop_all(procs: list[ServiceProcess], etcd: list[EtcdCluster]) -> None:
    """Stop processes in reverse start order; used by stop() and the finalizer."""
    for p in reversed(procs):
        with contextlib.suppress(Exception):
            p.stop()
    for e in etcd:
        with contextlib.suppress(Exception):
            e.stop()


def _check_shape(
    storage_nodes: int,
    targets_per_node: int,
    replicas: int,
    kv: str,
    mgmtds: int,
    metas: int,
    etcd_members: int,
) -> None:
    """Refuse a cluster that cannot be built, before anything starts."""
    if mgmtds < 1 or metas < 1 or etcd_members < 1:
        raise ChainfsError(Code.EINVAL, "need at least one mgmtd, meta and etcd member")
    if kv != "etcd" and (mgmtds > 1 or metas > 1 or etcd_members > 1):
        raise ChainfsError(
            Code.EINVAL,
            "several mgmtd or meta servers share one store, and several etcd members "
            "are etcd: use kv='etcd'",
        )
    if storage_nodes < 1 or targets_per_node < 1:
        raise ChainfsError(Code.EINVAL, "need at least one storage node and one target")
    if not 1 <= replicas <= storage_nodes:
        raise ChainfsError(
            Code.EINVAL,
            f"replicas must be between 1 and the number of storage nodes "
            f"({storage_nodes}), not {replicas}",
        )
    if kv not in ("rocksdb", "etcd", "memory"):
        raise ChainfsError(Code.EINVAL, f"kv must be rocksdb, etcd or memory, not {kv!r}")


class LocalCluster(StopOnExit):
    """mgmtd + N storage nodes (M targets each) + meta, started as separate processes."""

    def __init__(
        self,
        base_dir: str | Path,
        storage_nodes: int = 3,
        targets_per_node: int = 2,
        replicas: int = 3,
        kv: str = "rocksdb",
        mount: str | Path | None = None,
        *,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        heartbeat_interval_ms: int | None = None,
        heartbeat_timeout_ms: int | None = None,
        configure_storage: Callable[[int, Any], None] | None = None,
        mount_options: Sequence[str] = (),
        mgmtds: int = 1,
        metas: int = 1,
        etcd_members: int = 1,
        lease_ms: int | None = None,
        lease_renew_interval_ms: int | None = None,
        configure_meta: Callable[[int, Any], None] | None = None,
        mgmtd_ports: Sequence[int] = (),
    ) -> None:
        _check_shape(storage_nodes, targets_per_node, replicas, kv, mgmtds, metas, etcd_members)
        if len(mgmtd_ports) not in (0, mgmtds) or not all(0 <= p <= 65535 for p in mgmtd_ports):
            raise ChainfsError(
                Code.EINVAL,
                f"mgmtd_ports: one port in 0..65535 per mgmtd ({mgmtds}), not {list(mgmtd_ports)}",
            )
        self.base_dir = Path(base_dir).resolve()
        self.n_storage = storage_nodes
        self.targets_per_node = targets_per_node
        self.replicas = replicas
        self.kv = kv
        self.start_timeout_s = start_timeout_s
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.configure_storage = configure_storage  # (node index, StorageConfig) -> None
        self._mount_request = Path(mount).resolve() if mount is not None else None
        self.mountpoint: Path | None = None
        self.mount_options = list(mount_options)  # `chainfs mount -o` items
        self.n_mgmtd = mgmtds
        self.n_meta = metas
        self.etcd_members = etcd_members
        self.lease_ms = lease_ms
        self.lease_renew_interval_ms = lease_renew_interval_ms
        self.configure_meta = configure_meta  # (meta index, MetaConfig) -> None
        # The port of each mgmtd (0 = any free one): the cluster address clients keep.
        self.mgmtd_ports = list(mgmtd_ports) or [0] * mgmtds

        self.mgmtd: ServiceProcess | None = None  # the first mgmtd (mgmtds[0])
        self.meta: ServiceProcess | None = None  # the first meta server (metas[0])
        self.mgmtds: list[ServiceProcess] = []
        self.metas: list[ServiceProcess] = []
        self.storage: list[ServiceProcess] = []
        self._procs: list[ServiceProcess] = []  # everything started, in start order
        self._etcd: list[EtcdCluster] = []
        self._killed: set[str] = set()  # processes stopped on purpose (kill_storage)
        self._clients: list[FileSystem] = []
        self._mount_proc: MountProcess | None = None
        self._stopped = False
        # Kill our processes when the cluster object is collected or at exit.
        self._finalizer = weakref.finalize(self, _stop_all, self._procs, self._etcd)

        self.base_dir.mkdir(parents=True, exist_ok=True)
        # The cluster secret every server reads (node keys, capabilities).
        self.secret_file = self.base_dir / SECRET_FILE_NAME
        create_secret_file(self.secret_file)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    # -- addresses -----------------------------------------------------------
    @property
    def address(self) -> str:
        """Every mgmtd address, comma-separated: what `chainfs.connect` and `--address` take."""
        return ",".join(self.mgmtd_addresses)

    @property
    def mgmtd_addresses(self) -> list[str]:
        """The address of each mgmtd started (killed ones included: they may come back)."""
        assert self.mgmtds and all(p.info for p in self.mgmtds), "cluster not started"
        return [str(p.info["rpc_address"]) for p in self.mgmtds]

    def metrics_addresses(self) -> dict[str, str]:
        """Process name -> host:port of its /metrics, from the ready files (running ones)."""
        procs: list[ServiceProcess | MountProcess] = [*self._procs]
        if self._mount_proc is not None:
            procs.append(self._mount_proc)
        return {
            p.name: str(p.info["metrics_address"])
            for p in procs
            if p.alive() and p.info.get("metrics_address")
        }

    @property
    def status_url(self) -> str:
        """The first mgmtd's status page ("" when it serves none)."""
        assert self.mgmtd is not None, "cluster not started"
        address = self.mgmtd.info.get("status_address")
        return f"http://{address}/" if address else ""

    @property
    def etcd(self) -> EtcdCluster:
        """The etcd cluster (kv="etcd" only)."""
        if not self._etcd:
            raise ChainfsError(Code.EINVAL, "this cluster runs no etcd (kv != 'etcd')")
        return self._etcd[0]

    # -- start ---------------------------------------------------------------
    def _kv_url(self, service: str) -> str:
        if self.kv == "memory":
            return "memory://"
        if self.kv == "etcd":
            return self._etcd[0].url(f"chainfs-{service}")
        # Embedded RocksDB: one store per service process (it is single-opener).
        return f"rocksdb://{self.base_dir / service / 'kv'}"

    def _start(self) -> None:
        if self.kv == "etcd":
            from chainfs.local.etcd import EtcdCluster

            self._etcd.append(EtcdCluster(self.base_dir / "etcd", members=self.etcd_members))
        for i in range(self.n_mgmtd):
            # The first keeps its old name (logs under base_dir/mgmtd) for callers that look.
            name = "mgmtd" if i == 0 else f"mgmtd{i}"
            if self.mgmtd_ports[i]:
                check_port_free(self.mgmtd_ports[i], f"the address of {name}")
            self.mgmtds.append(self._spawn("mgmtd", name, self._mgmtd_config(i)))
        self.mgmtd = self.mgmtds[0]
        for i in range(self.n_storage):
            self.storage.append(self._spawn("storage", f"storage{i}", self._storage_config(i)))
        self._wait_targets_and_chains()
        for i in range(self.n_meta):
            name = "meta" if i == 0 else f"meta{i}"
            self.metas.append(self._spawn("meta", name, self._meta_config(i)))
        self.meta = self.metas[0]
        self._wait_meta(self.n_meta)
        if self._mount_request is not None:
            self._mount(self._mount_request)

    def _spawn(self, kind: str, name: str, config_obj: Any) -> ServiceProcess:
        workdir = self.base_dir / name
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / f"{kind}.toml"
        config_path.write_text(cfg.to_toml(config_obj))
        proc = ServiceProcess(kind, config_path, workdir, name=name)
        self._procs.append(proc)
        proc.start(timeout_s=self.start_timeout_s)
        return proc

    def _mgmtd_config(self, i: int) -> Any:
        from chainfs.mgmt_service.config import MgmtdConfig

        c = MgmtdConfig()
        c.port = self.mgmtd_ports[i]
        c.kv_url = self._kv_url("mgmtd")
        if self.heartbeat_interval_ms is not None:
            c.heartbeat_interval_ms = self.heartbeat_interval_ms
        if self.heartbeat_timeout_ms is not None:
            c.heartbeat_timeout_ms = self.heartbeat_timeout_ms
        if self.lease_ms is not None:
            c.lease_ms = self.lease_ms
        if self.lease_renew_interval_ms is not None:
            c.lease_renew_interval_ms = self.lease_renew_interval_ms
        if self.lease_ms is not None or self.lease_renew_interval_ms is not None:
            # Keep the margin valid for short test leases: a quarter of the lease.
            c.lease_safety_margin_ms = min(
                c.lease_safety_margin_ms, (c.lease_ms - c.lease_renew_interval_ms) // 2
            )
        return c

    def _storage_config(self, i: int) -> Any:
        from chainfs.storage_service.config import StorageConfig

        c = StorageConfig()
        c.mgmtd_addresses = self.mgmtd_addresses
        node_dir = self.base_dir / f"storage{i}"
        c.targets = [str(node_dir / f"target{j}") for j in range(self.targets_per_node)]
        c.cluster_secret_file = str(self.secret_file)
        if self.heartbeat_interval_ms is not None:
            c.heartbeat_interval_ms = self.heartbeat_interval_ms
        if self.configure_storage is not None:
            self.configure_storage(i, c)
        return c

    def _meta_config(self, i: int = 0) -> Any:
        from chainfs.meta_service.config import MetaConfig

        c = MetaConfig()
        c.kv_url = self._kv_url("meta")
        c.mgmtd_addresses = self.mgmtd_addresses
        c.cluster_secret_file = str(self.secret_file)
        if self.configure_meta is not None:
            self.configure_meta(i, c)
        return c

    def _wait_targets_and_chains(self) -> None:
        """Wait until every target is registered; create the chain table if absent."""
        want = self.n_storage * self.targets_per_node

        async def create_chains(mgmt: MgmtClient, routing: Routing) -> None:
            if not routing.chains:
                await mgmt.create_chains(self.replicas)

        self._wait_routing(
            lambda r: len(r.targets) >= want,
            lambda r: f"only {len(r.targets)} of {want} storage targets registered",
            then=create_chains,
        )

    def _wait_meta(self, count: int = 1) -> None:
        """Wait until mgmtd lists ``count`` online meta servers (clients find them there)."""
        from chainfs.proto import mgmt_pb2 as mp

        self._wait_routing(
            lambda r: len(r.nodes_of_type(mp.META)) >= count,  # online ones
            lambda r: f"{len(r.nodes_of_type(mp.META))} of {count} meta servers registered",
        )

    def _wait_routing(
        self,
        ready: Callable[[Routing], bool],
        progress: Callable[[Routing], str],
        then: Callable[[MgmtClient, Routing], Awaitable[None]] | None = None,
    ) -> None:
        """Poll mgmtd's routing until ``ready``, then run ``then`` (bounded by start-up)."""
        timeout_s = self.start_timeout_s

        async def go() -> None:
            from chainfs.common.rpc.mgmt_client import MgmtClient

            async with MgmtClient(self.address, timeout_s=timeout_s) as mgmt:
                deadline = time.monotonic() + timeout_s
                while True:
                    routing = await mgmt.get_routing()
                    assert routing is not None  # asked with no known version
                    if ready(routing):
                        break
                    if time.monotonic() > deadline:
                        raise ChainfsError(
                            Code.ETIMEDOUT,
                            f"{progress(routing)} after {timeout_s}s (logs under {self.base_dir})",
                        )
                    self._check_alive()
                    await asyncio.sleep(_POLL_S)
                if then is not None:
                    await then(mgmt, routing)

        _run_async(go)

    def _check_alive(self) -> None:
        dead = self.dead_processes()
        if dead:
            name = dead[0]
            proc = next(p for p in self._procs if p.name == name)
            raise ChainfsError(
                Code.EIO, f"{name} exited during start-up; log {proc.log_path}:\n{proc.tail_log()}"
            )

    def _mount(self, mountpoint: Path) -> None:
        """Start `chainfs mount MNT --foreground` as one more process; wait until mounted."""
        try:
            import chainfs.fuse_mount.mount  # noqa: F401
        except ImportError as e:
            raise ChainfsError(
                Code.ENOSYS, f"LocalCluster(mount=...): the FUSE mount is not available ({e})"
            ) from None
        mountpoint.mkdir(parents=True, exist_ok=True)
        self._mount_proc = MountProcess(
            mountpoint, self.address, self.base_dir / "mount", self.mount_options
        )
        self._mount_proc.start(self.start_timeout_s)
        self.mountpoint = mountpoint

    # -- use -----------------------------------------------------------------
    def client(self, **kwargs: Any) -> FileSystem:
        """A connected sync FileSystem; closed by stop()."""
        import chainfs

        fs = chainfs.connect(self.address, **kwargs)
        self._clients.append(fs)
        return fs

    def dead_processes(self) -> list[str]:
        """Names of our processes that exited without being stopped on purpose."""
        if self._stopped:
            return []
        return [
            p.name
            for p in self._procs
            if p.proc is not None and not p.alive() and p.name not in self._killed
        ]

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self._procs if p.pid is not None and p.alive()}

    # -- faults --------------------------------------------------------------
    def kill_storage(self, i: int) -> None:
        """SIGKILL storage node ``i`` (a crash)."""
        self._kill(self.storage[i])

    def stop_storage(self, i: int) -> None:
        """SIGTERM storage node ``i`` (a clean shutdown)."""
        p = self.storage[i]
        self._killed.add(p.name)
        p.stop()

    def restart_storage(self, i: int) -> None:
        """Start storage node ``i`` again with its config and target directories."""
        self._restart(self.storage[i])

    def _kill(self, p: ServiceProcess) -> None:
        self._killed.add(p.name)
        p.kill()

    def _restart(self, p: ServiceProcess) -> None:
        p.start(timeout_s=self.start_timeout_s)  # EBUSY while it still runs
        self._killed.discard(p.name)

    def mgmtd_primary(self, timeout_s: float | None = None) -> int:
        """Index in ``.mgmtds`` of the live mgmtd that answers it is primary (polled, bounded)."""
        bound_s = self.start_timeout_s if timeout_s is None else timeout_s

        async def go() -> int:
            from chainfs.common.rpc.mgmt_client import MgmtClient

            deadline = time.monotonic() + bound_s
            while True:
                for i, p in enumerate(self.mgmtds):
                    if not p.alive():
                        continue
                    async with MgmtClient(str(p.info["rpc_address"]), timeout_s=1.0) as m:
                        try:
                            if (await m.get_status()).primary:
                                return i
                        except ChainfsError as e:
                            if e.code not in (Code.UNAVAILABLE, Code.ETIMEDOUT, Code.NOT_PRIMARY):
                                raise
                if time.monotonic() > deadline:
                    raise ChainfsError(Code.ETIMEDOUT, f"no mgmtd primary after {bound_s}s")
                await asyncio.sleep(_POLL_S)

        return _run_async(go)

    def kill_mgmtd(self, i: int) -> None:
        """SIGKILL mgmtd ``i`` (index in ``.mgmtds``)."""
        self._kill(self.mgmtds[i])

    def kill_mgmtd_primary(self) -> int:
        """SIGKILL whichever mgmtd is primary now; returns its index."""
        i = self.mgmtd_primary()
        self.kill_mgmtd(i)
        return i

    def restart_mgmtd(self, i: int) -> None:
        """Start mgmtd ``i`` again on the same port (storage, meta and clients list it)."""
        from chainfs.mgmt_service.config import MgmtdConfig

        p = self.mgmtds[i]
        c = cfg.load(MgmtdConfig, p.config_path)
        c.port = int(str(p.info["rpc_address"]).rsplit(":", 1)[1])
        p.config_path.write_text(cfg.to_toml(c))
        self._restart(p)

    def kill_meta(self, i: int) -> None:
        """SIGKILL meta server ``i`` (index in ``.metas``)."""
        self._kill(self.metas[i])

    def restart_meta(self, i: int) -> None:
        """Start meta server ``i`` again (a fresh port; it registers again)."""
        self._restart(self.metas[i])

    def kill_etcd(self, i: int) -> None:
        """SIGKILL etcd member ``i`` (kv="etcd")."""
        self.etcd.kill(i)

    def restart_etcd(self, i: int, wait: bool = True) -> None:
        """Start etcd member ``i`` again on its ports and data dir; wait until healthy."""
        self.etcd.restart(i, wait=wait)

    def etcd_leader(self, timeout_s: float | None = None) -> int:
        """Index of the etcd member that is the Raft leader now."""
        return self.etcd.leader_index(timeout_s)

    # -- stop ----------------------------------------------------------------
    def stop(self) -> None:
        """Close our clients, then stop every process we started (idempotent)."""
        for fs in self._clients:
            with contextlib.suppress(Exception):
                fs.close()
        self._clients.clear()
        self._stopped = True
        if self._mount_proc is not None:
            with contextlib.suppress(Exception):
                self._mount_proc.stop()
        _stop_all(self._procs, self._etcd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            _stop_all(self._procs, self._etcd)
