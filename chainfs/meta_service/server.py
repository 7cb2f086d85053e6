"""The meta server process: `chainfs serve meta --config F`.

Stateless: everything lives in the KV store named by ``kv_url``, so any
number of meta servers may serve one store. On start a server formats the
store if it is new (root inode, allocator parameters; idempotent), serves
gRPC, registers with mgmtd as a META node and heartbeats, and runs its share
of the background work (GC, session pruning, idempotency expiry).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc.aio

from chainfs.common import config as config_mod
from chainfs.common import logging as chainfs_logging
from chainfs.common import tls
from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.secret import load_secret, node_credential
from chainfs.common.background import Periodic, start_all
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.metrics import NodeMetrics
from chainfs.common.process import run_service, write_ready_file
from chainfs.common.routing import Routing, distinct_capacity
from chainfs.common.rpc import grpc_util
from chainfs.common.rpc.storage_client import StorageClient, StorageClientConfig
from chainfs.common.rpc.user_cache import UserCache
from chainfs.kv import KVStore
from chainfs.kv import open as kv_open
from chainfs.meta_service import metrics as meta_metrics
from chainfs.meta_service.alloc import InodeAllocator
from chainfs.meta_service.background import (
    GarbageCollector,
    IdempotencyCleaner,
    SessionPruner,
)
from chainfs.meta_service.chunks import ChunkStorage
from chainfs.meta_service.cluster_settings import ClusterSettings
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.gc_admin import GcAdmin, MetaAdminServicer
from chainfs.meta_service.namespace import ClusterView, Namespace
from chainfs.meta_service.ops.trash import TrashPurger
from chainfs.meta_service.service import MetaServicer, framed_handler
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2_grpc as pbg
from chainfs.proto import mgmt_pb2 as mp

log = logging.getLogger(__name__)


class StaticCluster:
    """Standalone: a fixed chain list, no capacity figures."""

    def __init__(self, chains: list[int]) -> None:
        self._chains = list(chains)

    def chains(self) -> list[int]:
        return list(self._chains)

    def capacity(self) -> tuple[int, int]:
        return 0, 0


class RoutingCluster:
    """Chains and capacity from the latest routing info."""

    def __init__(self, current: Callable[[], Routing | None]) -> None:
        self._current = current

    def chains(self) -> list[int]:
        routing = self._current()
        return routing.chain_ids() if routing is not None else []

    def capacity(self) -> tuple[int, int]:
        """(capacity, used) in bytes a user can store: each disk counted once
        however many targets share it, raw bytes divided by the replica count."""
        routing = self._current()
        if routing is None:
            return 0, 0
        replicas = max(routing.info.replicas, 1)
        capacity = distinct_capacity(routing.info.targets)
        used = sum(t.used_bytes for t in routing.info.targets)
        return capacity // replicas, used // replicas


class MetaServer:
    """One meta server. Tests may inject the store, storage and cluster view."""

    def __init__(
        self,
        cfg: MetaConfig,
        *,
        kv: KVStore | None = None,
        storage: ChunkStorage | None = None,
        cluster: ClusterView | None = None,
    ) -> None:
        self.cfg = cfg
        self.kv = kv
        self._own_kv = kv is None
        self.storage = storage
        self.cluster = cluster
        self.client_id = os.urandom(16)
        self.ns: Namespace | None = None
        self.rpc_address = ""
        self.data_address = ""  # framed transport, "" when disabled
        self.unix_socket = ""  # the same on a unix socket for this host's clients, "" when none
        self._dataplane: Any = None
        self.node_id = 0
        self.tasks: list[Periodic] = []
        self._grpc: grpc.aio.Server | None = None
        self._stop_tasks: Callable[[], Awaitable[None]] | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.metrics: NodeMetrics | None = None
        self.auth: Authenticator | None = None
        self.users: UserCache | None = None

    async def start(self) -> None:
        cfg = self.cfg
        # Read first: a missing or world-readable secret stops the start (CONFIG_ERROR).
        secret = load_secret(cfg.cluster_secret_file) if cfg.cluster_secret_file else None
        if secret is None:
            log.warning("no cluster_secret_file: callers' uid/gid claims are believed")
        if self.kv is None:
            self.kv = kv_open(cfg.kv_url)
        fmt = await Namespace.format(self.kv, cfg)
        if (fmt.alloc_shards, fmt.alloc_batch) != (cfg.alloc_shards, cfg.alloc_batch):
            log.info(
                "inode allocator: the store was formatted with %d shards x %d ids; using those",
                fmt.alloc_shards,
                fmt.alloc_batch,
            )
        alloc = InodeAllocator(self.kv, fmt)

        heartbeat = None
        settings: list[Periodic] = []  # cluster-wide settings, with a mgmtd to read them from
        if cfg.mgmtd_addresses:
            from chainfs.common.rpc.mgmt_client import (
                HeartbeatLoop,
                MgmtClient,
                RoutingCache,
            )

            mgmt = MgmtClient(
                cfg.mgmtd_addresses,
                timeout_s=cfg.mgmtd_timeout_ms / 1000,
                retry=cfg.mgmtd_retry,
                # The join credential until registration gives this server its id.
                credential=node_credential(secret, 0) if secret is not None else cpb.Credential(),
            )
            self._closers.append(mgmt.close)
            # Routing arrives with the registration below (which retries while
            # mgmtd is unreachable) and is then kept fresh by a watch.
            routing = RoutingCache(mgmt)
            routing.start()
            self._closers.insert(0, routing.stop)
            if self.cluster is None:
                self.cluster = RoutingCluster(lambda: routing.current)
            if self.storage is None:
                scfg = StorageClientConfig(timeout_ms=cfg.storage_timeout_ms)
                client = StorageClient(routing, self.client_id, scfg)
                self._closers.insert(0, client.close)
                self.storage = client

            def on_routing(r: Routing) -> None:
                routing.install(r)

            node = mp.NodeInfo(type=mp.META, hostname=socket.gethostname(), pid=os.getpid())
            interval = cfg.heartbeat_interval_ms / 1000 if cfg.heartbeat_interval_ms else None
            heartbeat = HeartbeatLoop(mgmt, node, lambda: [], on_routing, interval, secret=secret)
            settings.append(ClusterSettings(mgmt, cfg))
            if secret is not None:
                users = UserCache(
                    mgmt, cfg.user_refresh_interval_ms / 1000, cfg.user_miss_refresh_min_ms / 1000
                )
                settings.append(users.refresher())
                self.auth = Authenticator(secret, users)
                self.users = users
        if self.cluster is None:
            self.cluster = StaticCluster(cfg.static_chains)

        self.ns = Namespace(self.kv, cfg, alloc, self.cluster, self.storage)
        meta_metrics.instrument(self.ns)
        self.metrics = await NodeMetrics.start(
            cfg.listen_host, cfg.metrics_port, meta_metrics.kv_collector(self.kv)
        )
        self._closers.append(self.metrics.stop)
        srv = grpc_util.server(cfg.grpc, self.auth)
        pbg.add_MetaServicer_to_server(MetaServicer(self.ns), srv)
        gc_admin = GcAdmin(self.kv, cfg)
        pbg.add_MetaAdminServicer_to_server(MetaAdminServicer(gc_admin, self.ns), srv)
        port = grpc_util.bind(srv, cfg.listen_host, cfg.port)
        await srv.start()
        self._grpc = srv
        self.rpc_address = f"{cfg.listen_host}:{port}"
        if cfg.frame_enabled:
            from chainfs.common.dataplane.server import DataServer, run_eagerly

            handler = framed_handler(
                self.ns,
                authenticated=self.auth is not None,
                admit=self.users.admit if self.users is not None else None,
                metrics=meta_metrics.REQUESTS,
            )
            if cfg.unix_socket:
                _make_socket_dir(cfg.unix_socket)
            dp = DataServer(
                # A stat on the embedded store never waits: answered without a task.
                run_eagerly(handler),
                cfg.listen_host,
                cfg.frame_port,
                unix_path=cfg.unix_socket or None,
                config=cfg.dataplane,
                authenticator=self.auth,
            )
            await dp.start()
            self._dataplane = dp
            self.data_address = dp.address
            self.unix_socket = cfg.unix_socket

        if heartbeat is not None:
            heartbeat.node.rpc_address = self.rpc_address
            heartbeat.node.data_address = self.data_address
            heartbeat.node.unix_socket = self.unix_socket
            heartbeat.node.tags.update(self.metrics.tags())
            await heartbeat.start()
            self._closers.insert(0, heartbeat.stop)
            self.node_id = heartbeat.node_id
            if cfg.cluster_secret_file and isinstance(self.storage, StorageClient):
                # GC and truncates reach storage as this node: no capability needed.
                secret = load_secret(cfg.cluster_secret_file)
                await self.storage.set_credential(node_credential(secret, self.node_id))

        self.tasks = [IdempotencyCleaner(self.kv, cfg), SessionPruner(self.kv, cfg, self.ns)]
        self.tasks.append(meta_metrics.SessionCounter(self.kv, cfg))
        self.tasks.extend(settings)
        self.tasks.append(TrashPurger(self.ns))
        if self.storage is not None:
            gc_admin.collector = GarbageCollector(self.kv, cfg, self.storage)
            self.tasks.append(gc_admin.collector)
        else:
            log.warning("standalone: no storage, removed files stay queued for GC")
        self._stop_tasks = start_all(self.tasks)
        log.info(
            "meta serving on %s (node %d, store %s)", self.rpc_address, self.node_id, cfg.kv_url
        )

    def task(self, cls: type[Periodic]) -> Periodic:
        return next(t for t in self.tasks if isinstance(t, cls))

    def ready_info(self) -> dict[str, object]:
        return {
            "rpc_address": self.rpc_address,
            "data_address": self.data_address,
            "unix_socket": self.unix_socket,
            "node_id": self.node_id,
            **(self.metrics.ready_info() if self.metrics else {}),
        }

    async def stop(self) -> None:
        if self._stop_tasks is not None:
            await self._stop_tasks()
            self._stop_tasks = None
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        if self._dataplane is not None:
            await self._dataplane.stop()
            self._dataplane = None
        for close in self._closers:
            try:
                await close()
            except Exception:
                log.exception("closing %r failed", close)
        self._closers = []
        if self.kv is not None and self._own_kv:
            # commits, conflicts, and for rocksdb synced batches vs transactions in them
            log.info("kv store %s: %s", self.kv.url, self.kv.stats)
            await self.kv.close()


def main(config_path: str | None, ready_file: str | None) -> int:
    cfg = config_mod.load(MetaConfig, config_path)
    tls.configure_process(cfg.tls)
    chainfs_logging.setup(f"meta@{socket.gethostname()}", cfg.log_level)
    if not cfg.mgmtd_addresses and not cfg.static_chains:
        log.warning("no mgmtd_addresses and no static_chains: files cannot be created")

    async def run(stop: asyncio.Event) -> None:
        server = MetaServer(cfg)
        try:
            await server.start()
            write_ready_file(ready_file, server.ready_info())
            await stop.wait()
        finally:
            await server.stop()

    try:
        return run_service(run)
    except ChainfsError as e:
        if e.code == Code.CONFIG_ERROR:
            raise
        log.error("meta server failed: %s", e)
        return 1


def _make_socket_dir(path: str) -> None:
    """The unix socket's directory, made private (0700) when it does not exist
    (/run/chainfs-meta outside systemd, which otherwise makes it)."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ChainfsError(
            Code.CONFIG_ERROR, f"unix_socket {path}: cannot make its directory: {e}", path=path
        ) from None
