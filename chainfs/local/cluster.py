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
``kill_etcd(i)`` / ``restart_etcd(i)`` inject the faults. ``kv="postgresql"``
runs one local PostgreSQL server (``.postgres``) holding mgmtd's and meta's
stores in two schemas of one database.

``tls=True`` makes a CA and a certificate per process under
``base_dir/tls`` (see :mod:`chainfs.local.tls_material`): every process
serves gRPC and the data plane over TLS. ``.tls`` is the admin identity
(CA + admin certificate: gRPC and node calls); ``.client()`` connects as a
user, with the CA only; ``.tls_env()`` are the CHAINFS_TLS_* variables
for other programs.

``mgmtd_ports=[P]`` binds mgmtd to P (the address clients keep); a port some
other process listens on is refused with an error naming it.

Authentication is on: the cluster secret is ``base_dir/cluster.secret`` and the
first mgmtd start creates user "admin" (uid 0) whose token is in
``base_dir/admin.token`` (``.admin_token``; a token already in
$CHAINFS_TOKEN / $CHAINFS_TOKEN_FILE becomes the admin's, so a shell or a test
session keeps one token across clusters). ``.client()`` connects with it; a
mount uses user "mount" (admin, may impersonate: each process acts as its own
uid/gid, as on a local file system).

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
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from chainfs.common import config as cfg
from chainfs.common import tls as tls_mod
from chainfs.common.auth.secret import SECRET_FILE_NAME, create_secret_file
from chainfs.common.auth.tokens import (
    ADMIN_TOKEN_FILE_NAME,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    read_token_file,
    resolve_token,
    write_token_file,
)
from chainfs.common.dataplane.address import MAX_UNIX_PATH_BYTES
from chainfs.common.errors import ChainfsError, Code
from chainfs.local.private import make_private_dir, write_private_text
from chainfs.local.process import MountProcess, ServiceProcess, StopOnExit, check_port_free

if TYPE_CHECKING:
    from chainfs.client.sync import FileSystem
    from chainfs.common.routing import Routing
    from chainfs.common.rpc.mgmt_client import MgmtClient
    from chainfs.local.etcd import EtcdCluster
    from chainfs.local.postgres import PostgresServer

T = TypeVar("T")

DEFAULT_START_TIMEOUT_S = 60.0  # a whole cluster on 2 busy cores
_POLL_S = 0.05


def _run_async(
    fn: Callable[[], Coroutine[Any, Any, T]], tls_config: tls_mod.TlsConfig | None = None
) -> T:
    """Run a coroutine to completion on a fresh loop in a helper thread
    (under ``tls_config``, when given, instead of the process's TLS settings).

    LocalCluster is synchronous but may be used from inside a running event
    loop (an async test): a private thread keeps the two loops apart.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with tls_mod.using(tls_config or tls_mod.current()):
                box["value"] = asyncio.run(fn())
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, name="chainfs-cluster-admin", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _stop_all(procs: list[ServiceProcess], kv_servers: list[StopOnExit]) -> None:
    """Stop processes in reverse start order; used by stop() and the finalizer."""
    for p in reversed(procs):
        with contextlib.suppress(Exception):
            p.stop()
    for e in kv_servers:
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
    shared = kv in ("etcd", "postgresql")  # a store several processes can open
    if (not shared and (mgmtds > 1 or metas > 1)) or (kv != "etcd" and etcd_members > 1):
        raise ChainfsError(
            Code.EINVAL,
            "several mgmtd or meta servers share one store (kv='etcd' or 'postgresql'), "
            "and several etcd members are etcd (kv='etcd')",
        )
    if storage_nodes < 1 or targets_per_node < 1:
        raise ChainfsError(Code.EINVAL, "need at least one storage node and one target")
    if not 1 <= replicas <= storage_nodes:
        raise ChainfsError(
            Code.EINVAL,
            f"replicas must be between 1 and the number of storage nodes "
            f"({storage_nodes}), not {replicas}",
        )
    if kv not in ("rocksdb", "etcd", "postgresql", "memory"):
        raise ChainfsError(
            Code.EINVAL, f"kv must be rocksdb, etcd, postgresql or memory, not {kv!r}"
        )


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
        configure_mgmtd: Callable[[int, Any], None] | None = None,
        mgmtd_ports: Sequence[int] = (),
        tls: bool = False,
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
        self.configure_mgmtd = configure_mgmtd  # (mgmtd index, MgmtdConfig) -> None
        # The port of each mgmtd (0 = any free one): the cluster address clients keep.
        self.mgmtd_ports = list(mgmtd_ports) or [0] * mgmtds
        # tls=True: the admin identity (set in _start, once the CA exists); None = plain.
        self._tls_dir = self.base_dir / "tls" if tls else None
        self.tls: tls_mod.TlsConfig | None = None

        self.mgmtd: ServiceProcess | None = None  # the first mgmtd (mgmtds[0])
        self.meta: ServiceProcess | None = None  # the first meta server (metas[0])
        self.mgmtds: list[ServiceProcess] = []
        self.metas: list[ServiceProcess] = []
        self.storage: list[ServiceProcess] = []
        self._procs: list[ServiceProcess] = []  # everything started, in start order
        self._etcd: list[EtcdCluster] = []
        self._postgres: list[PostgresServer] = []
        self._kv_servers: list[StopOnExit] = []  # etcd or postgres, stopped last
        self._killed: set[str] = set()  # processes stopped on purpose (kill_storage)
        self._clients: list[FileSystem] = []
        self._mount_proc: MountProcess | None = None
        self._stopped = False
        # Kill our processes when the cluster object is collected or at exit.
        self._finalizer = weakref.finalize(self, _stop_all, self._procs, self._kv_servers)

        make_private_dir(self.base_dir)
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
    def mount_process(self) -> MountProcess | None:
        """The FUSE mount's process, if mounted (SIGUSR2 logs its request counts)."""
        return self._mount_proc

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

    @property
    def postgres(self) -> PostgresServer:
        """The PostgreSQL server (kv="postgresql" only)."""
        if not self._postgres:
            raise ChainfsError(Code.EINVAL, "this cluster runs no postgres (kv != 'postgresql')")
        return self._postgres[0]

    # -- credentials ---------------------------------------------------------
    @property
    def secret_file(self) -> Path:
        return self.base_dir / SECRET_FILE_NAME

    @property
    def admin_token_file(self) -> Path:
        return self.base_dir / ADMIN_TOKEN_FILE_NAME

    @property
    def admin_token(self) -> str:
        """The token of user "admin" (uid 0), written by mgmtd's first start."""
        return read_token_file(self.admin_token_file)

    @contextlib.contextmanager
    def admin_environment(self) -> Iterator[None]:
        """While active, $CHAINFS_TOKEN_FILE names the admin token (and
        $CHAINFS_TOKEN is unset): clients made without a token, here and in
        child processes (bench workers), act as "admin"."""
        saved = {k: os.environ.pop(k, None) for k in (TOKEN_ENV, TOKEN_FILE_ENV)}
        os.environ[TOKEN_FILE_ENV] = str(self.admin_token_file)
        try:
            yield
        finally:
            os.environ.pop(TOKEN_FILE_ENV, None)
            os.environ.update({k: v for k, v in saved.items() if v is not None})

    def _admin_mgmt(self, address: str, timeout_s: float) -> MgmtClient:
        from chainfs.common.rpc.mgmt_client import MgmtClient
        from chainfs.proto import common_pb2 as cpb

        return MgmtClient(address, timeout_s, credential=cpb.Credential(token=self.admin_token))

    def _prepare_credentials(self) -> None:
        create_secret_file(self.secret_file)
        preset = resolve_token()
        if preset and not self.admin_token_file.exists():
            write_token_file(self.admin_token_file, preset)

    # -- start ---------------------------------------------------------------
    def _kv_url(self, service: str) -> str:
        if self.kv == "memory":
            return "memory://"
        if self.kv == "etcd":
            return self._etcd[0].url(f"chainfs-{service}")
        if self.kv == "postgresql":  # one server, one database, a schema per service
            return self._postgres[0].url("chainfs", schema=service)
        # Embedded RocksDB: one store per service process (it is single-opener).
        return f"rocksdb://{self.base_dir / service / 'kv'}"

    def _start(self) -> None:
        if self._tls_dir is not None:
            self.tls = self._tls_material("admin", node=False)
        self._prepare_credentials()
        if self.kv == "etcd":
            from chainfs.local.etcd import EtcdCluster

            self._etcd.append(EtcdCluster(self.base_dir / "etcd", members=self.etcd_members))
            self._kv_servers.append(self._etcd[0])
        if self.kv == "postgresql":
            from chainfs.local.postgres import PostgresServer

            self._postgres.append(PostgresServer(self.base_dir / "postgres"))
            self._kv_servers.append(self._postgres[0])
            self._postgres[0].create_database("chainfs")
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
        make_private_dir(workdir)
        config_path = workdir / f"{kind}.toml"
        if self._tls_dir is not None:
            config_obj.tls = self._tls_material(name, node=True)
        write_private_text(config_path, cfg.to_toml(config_obj))
        proc = ServiceProcess(kind, config_path, workdir, name=name, prefix=self.exec_prefix(name))
        self._procs.append(proc)
        proc.start(timeout_s=self.start_timeout_s)
        return proc

    def exec_prefix(self, name: str) -> list[str]:
        """What process ``name`` is started under (subclasses: another host); none here."""
        return []

    def _tls_material(self, name: str, node: bool) -> tls_mod.TlsConfig:
        """The certificate of ``name`` (made now; the CA on first use)."""
        from chainfs.local.tls_material import init_tls_dir

        assert self._tls_dir is not None
        nodes, clients = ([name], []) if node else ([], [name])
        return init_tls_dir(self._tls_dir, nodes=nodes, clients=clients)[name]

    def tls_env(self, admin: bool = False) -> dict[str, str]:
        """CHAINFS_TLS_* variables for another program to reach this cluster: as a
        user (the CA only), or ``admin`` (with the admin certificate, which gRPC
        requires); {} without TLS."""
        if self.tls is None:
            return {}
        env = {tls_mod.CA_FILE_ENV: self.tls.ca_file}
        if admin:
            env[tls_mod.CERT_FILE_ENV] = self.tls.cert_file
            env[tls_mod.KEY_FILE_ENV] = self.tls.key_file
        return env

    def _mgmtd_config(self, i: int) -> Any:
        from chainfs.mgmt_service.config import MgmtdConfig

        c = MgmtdConfig()
        c.port = self.mgmtd_ports[i]
        c.kv_url = self._kv_url("mgmtd")
        c.cluster_secret_file = str(self.secret_file)
        c.admin_token_file = str(self.admin_token_file)
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
        if self.configure_mgmtd is not None:
            self.configure_mgmtd(i, c)
        return c

    def _storage_config(self, i: int) -> Any:
        from chainfs.storage_service.config import StorageConfig

        c = StorageConfig()
        c.mgmtd_addresses = self.mgmtd_addresses
        c.cluster_secret_file = str(self.secret_file)
        node_dir = self.base_dir / f"storage{i}"
        c.targets = [str(node_dir / f"target{j}") for j in range(self.targets_per_node)]
        if self.heartbeat_interval_ms is not None:
            c.heartbeat_interval_ms = self.heartbeat_interval_ms
        if self.configure_storage is not None:
            self.configure_storage(i, c)
        return c

    def _meta_config(self, i: int = 0) -> Any:
        from chainfs.meta_service.config import MetaConfig

        c = MetaConfig()
        c.kv_url = self._kv_url("meta")
        sock = self.base_dir / ("meta" if i == 0 else f"meta{i}") / "meta.sock"
        if len(os.fsencode(str(sock))) < MAX_UNIX_PATH_BYTES:
            c.unix_socket = str(sock)  # this host's clients and mount use it, not TCP
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
            async with self._admin_mgmt(self.address, timeout_s) as mgmt:
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

        _run_async(go, self.tls)

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
            mountpoint,
            self.address,
            self.base_dir / "mount",
            self.mount_options,
            token_file=self._mount_token_file(),
        )
        self._mount_proc.env = self.tls_env()
        self._mount_proc.start(self.start_timeout_s)
        self.mountpoint = mountpoint

    def _mount_token_file(self) -> Path:
        """The token of user "mount" (admin, impersonating), created once."""
        path = self.base_dir / "mount.token"
        if path.exists():
            return path

        async def add() -> str:
            from chainfs.proto import mgmt_pb2 as mp

            user = mp.User(name="mount", uid=0, gid=0, admin=True, impersonate=True)
            async with self._admin_mgmt(self.address, self.start_timeout_s) as mgmt:
                return (await mgmt.user_add(user)).token

        write_token_file(path, _run_async(add))
        return path

    # -- use -----------------------------------------------------------------
    def client(self, token: str | None = None, **kwargs: Any) -> FileSystem:
        """A connected sync FileSystem (as "admin" unless ``token``); closed by stop()."""
        import chainfs

        if self.tls is not None:
            kwargs["config"] = self._user_tls_config(kwargs.get("config"))
        fs = chainfs.connect(self.address, token=token or self.admin_token, **kwargs)
        self._clients.append(fs)
        return fs

    def _user_tls_config(self, config: Any) -> Any:
        """``config`` (or the default ClientConfig) with this cluster's CA, unless it names TLS."""
        import dataclasses

        from chainfs.client.config import ClientConfig

        assert self.tls is not None
        config = config if config is not None else ClientConfig()
        if config.tls is not None:
            return config
        return dataclasses.replace(config, tls=tls_mod.TlsConfig(ca_file=self.tls.ca_file))

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

    def add_storage(self) -> int:
        """Start one more storage node (``targets_per_node`` targets, in no chain yet);
        returns its index in ``.storage`` once mgmtd lists its targets."""
        i = len(self.storage)
        self.storage.append(self._spawn("storage", f"storage{i}", self._storage_config(i)))
        self.n_storage += 1
        want = self.n_storage * self.targets_per_node
        self._wait_routing(
            lambda r: len(r.targets) >= want,
            lambda r: f"only {len(r.targets)} of {want} storage targets registered",
        )
        return i

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
            deadline = time.monotonic() + bound_s
            while True:
                for i, p in enumerate(self.mgmtds):
                    if not p.alive():
                        continue
                    async with self._admin_mgmt(str(p.info["rpc_address"]), 1.0) as m:
                        try:
                            if (await m.get_status()).primary:
                                return i
                        except ChainfsError as e:
                            if e.code not in (Code.UNAVAILABLE, Code.ETIMEDOUT, Code.NOT_PRIMARY):
                                raise
                if time.monotonic() > deadline:
                    raise ChainfsError(Code.ETIMEDOUT, f"no mgmtd primary after {bound_s}s")
                await asyncio.sleep(_POLL_S)

        return _run_async(go, self.tls)

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
        write_private_text(p.config_path, cfg.to_toml(c))
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
        _stop_all(self._procs, self._kv_servers)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            _stop_all(self._procs, self._kv_servers)
