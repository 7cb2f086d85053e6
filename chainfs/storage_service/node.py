"""A storage node's state: its targets, CRAQ, resync, repair, and its
registration with mgmtd and heartbeats.

:class:`StorageNode` opens every target directory (a ChunkEngine each), serves
the framed data plane and StorageControl over gRPC with the handlers it is
given (:mod:`service` builds them), registers its targets with mgmtd (ids
persisted in each target's ``target.json`` so a restart re-registers with the
same ids) and heartbeats. The process entry is :mod:`server`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc.aio

from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.secret import load_secret, node_credential
from chainfs.common.background import Periodic
from chainfs.common.dataplane.address import MAX_UNIX_PATH_BYTES, parse_address
from chainfs.common.dataplane.client import DataClient
from chainfs.common.dataplane.server import DataServer, EagerHandler
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.metrics import NodeMetrics
from chainfs.common.routing import Routing, data_address
from chainfs.common.rpc import grpc_util
from chainfs.common.rpc.mgmt_client import (
    HeartbeatLoop,
    MgmtClient,
    RoutingCache,
)
from chainfs.common.rpc.user_cache import UserCache
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp
from chainfs.proto import storage_pb2_grpc as sg
from chainfs.storage_service import drop_chunks, extra_targets
from chainfs.storage_service.access import Access
from chainfs.storage_service.chunk_copy import ChunkCopier
from chainfs.storage_service.chunk_engine import ChunkEngine
from chainfs.storage_service.chunk_files import FdCache, open_files_bound
from chainfs.storage_service.config import StorageConfig
from chainfs.storage_service.craq import Craq, LocalTarget, record_to_meta
from chainfs.storage_service.fencing import Fence
from chainfs.storage_service.metrics import node_collector
from chainfs.storage_service.resync import Resyncer, SyncReceiver
from chainfs.storage_service.scrubber import Repairer, Scrubber

log = logging.getLogger(__name__)


def is_storage_host(routing: Routing | None, host: str) -> bool:
    """Whether a data-plane connection from ``host`` ("unix" for the owner-only unix
    socket) comes from a storage node, for the connection slots kept for cluster
    peers. By address until connections authenticate: a client on a storage
    host passes too."""
    if host == "unix":
        return True
    if routing is None:
        return False
    for node in routing.nodes.values():
        if node.type == mp.STORAGE and node.data_address:
            sockaddr = parse_address(node.data_address)[1]
            if isinstance(sockaddr, tuple) and sockaddr[0] == host:
                return True
    return False


class DataPlaneForwarder:
    """CRAQ's successor calls over the data plane."""

    def __init__(self, client: DataClient) -> None:
        self.client = client

    @staticmethod
    def address(node: mp.NodeInfo) -> str:
        return data_address(node)

    async def update(
        self, node: mp.NodeInfo, req: sp.UpdateReq, payload: Sequence[memoryview], timeout_s: float
    ) -> sp.UpdateRsp:
        reply = await self.client.request(
            self.address(node),
            sp.UPDATE,
            req.SerializeToString(),
            payload=list(payload),
            timeout_s=timeout_s,
        )
        return sp.UpdateRsp.FromString(bytes(reply.header))

    async def remove(
        self, node: mp.NodeInfo, req: sp.RemoveChunksReq, timeout_s: float
    ) -> sp.RemoveChunksRsp:
        reply = await self.client.request(
            self.address(node), sp.REMOVE_CHUNKS, req.SerializeToString(), timeout_s=timeout_s
        )
        return sp.RemoveChunksRsp.FromString(bytes(reply.header))


class StorageNode:
    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="storage-io")
        self.engines: list[ChunkEngine] = []
        self.targets: dict[int, LocalTarget] = {}
        self.node_id = config.node_id
        self.secret = (
            load_secret(config.cluster_secret_file) if config.cluster_secret_file else None
        )
        self.mgmt = MgmtClient(
            config.mgmtd_addresses,
            timeout_s=config.mgmtd_timeout_ms / 1000,
            credential=node_credential(self.secret, config.node_id)
            if self.secret is not None
            else cpb.Credential(),
        )
        self.routing = RoutingCache(self.mgmt)
        if self.secret is None:
            log.warning("no cluster_secret_file: the data plane serves every caller unchecked")
        # Admin tokens (StorageControl) are checked against mgmtd's user directory.
        self.users = UserCache(
            self.mgmt,
            config.user_refresh_interval_ms / 1000,
            config.user_miss_refresh_min_ms / 1000,
        )
        self.authenticator = (
            Authenticator(self.secret, self.users) if self.secret is not None else None
        )
        self.access = Access(
            self.secret, config.max_batch_read_ios, config.capability_cache_entries
        )
        # Made once mgmtd gave this node its id (it presents its node key to peers).
        self.data_client: DataClient | None = None
        self.craq: Craq | None = None
        self.heartbeat: HeartbeatLoop | None = None
        self.data_server: DataServer | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.user_refresher: Periodic | None = None
        self.rpc_address = ""
        self.data_address = ""
        self.unix_path = ""
        # Failure handling: fencing, resync (both sides), repair, scrubbing.
        self.fence = Fence(lambda: self.heartbeat, config.failure.fence_after_timeout_ratio)
        self.sync_receiver = SyncReceiver(lambda: self.routing.current, self._beat_soon)
        self.resyncer: Resyncer | None = None
        self.repairer: Repairer | None = None
        self.copier: ChunkCopier | None = None
        self.scrubber: Scrubber | None = None
        self._create_lock = asyncio.Lock()  # one create-targets at a time
        self.metrics: NodeMetrics | None = None
        # Chunk files open for reads, one bound for all targets (open_chunk_files).
        self.fd_cache = FdCache(open_files_bound(config.open_chunk_files))

    def chain_of(self, target_id: int, routing: Routing | None) -> int:
        if routing is None:
            return 0
        t = routing.targets.get(target_id)
        return t.chain_id if t is not None else 0

    def open_targets(self) -> list[mp.TargetInfo]:
        """The configured targets, then those added at runtime (extra_targets)."""
        opts = self.config.engine_options()
        infos = []
        for path in [*self.config.targets, *extra_targets.load(self.config)]:
            eng = ChunkEngine(path, opts, self.fd_cache)
            self.engines.append(eng)
            ids = eng.load_ids()
            node_id = ids.get("node_id", 0)
            if node_id:
                if self.node_id and self.node_id != node_id:
                    raise ChainfsError(
                        Code.CONFIG_ERROR,
                        f"target {path} belongs to node {node_id}, this node is {self.node_id}",
                    )
                self.node_id = node_id
            infos.append(mp.TargetInfo(target_id=ids.get("target_id", 0), path=str(path)))
        return infos

    async def create_targets(self, count: int, parent_dir: str) -> sp.CreateTargetsRsp:
        """Create ``count`` new targets under ``parent_dir``, register them with
        mgmtd and serve them; on any error nothing is left behind.

        Shielded: a caller that gives up (deadline) does not cut it in half.
        """
        return await asyncio.shield(self._create_targets(count, parent_dir))

    async def _create_targets(self, count: int, parent_dir: str) -> sp.CreateTargetsRsp:
        cfg = self.config
        if self.heartbeat is None or self.craq is None:
            raise ChainfsError(Code.TARGET_NOT_SERVING, "storage node is starting")
        if not 1 <= count <= cfg.max_new_targets:
            raise ChainfsError(
                Code.EINVAL,
                f"count must be 1..{cfg.max_new_targets} (max_new_targets), not {count}",
            )
        loop = asyncio.get_running_loop()
        async with self._create_lock:
            parent = extra_targets.check_parent(
                parent_dir or extra_targets.default_parent(cfg), self.node_id
            )
            recorded = extra_targets.load(cfg)
            dirs = extra_targets.pick_dirs(
                parent, count, [str(e.path) for e in self.engines] + recorded
            )
            opts = self.config.engine_options()
            engines: list[ChunkEngine] = []
            try:
                for d in dirs:
                    engines.append(
                        await loop.run_in_executor(
                            self.executor, ChunkEngine, d, opts, self.fd_cache
                        )
                    )
                await loop.run_in_executor(
                    self.executor,
                    extra_targets.save,
                    cfg,
                    [*recorded, *(str(d) for d in dirs)],
                )
                infos = [
                    mp.TargetInfo(path=str(e.path), capacity_bytes=e.usage()[1]) for e in engines
                ]
                try:
                    rsp = await self.mgmt.add_targets(self.node_id, infos)
                except BaseException as e:
                    await loop.run_in_executor(self.executor, extra_targets.save, cfg, recorded)
                    if isinstance(e, ChainfsError) and e.code in (Code.UNAVAILABLE, Code.ETIMEDOUT):
                        await self._forget_at_mgmtd([str(d) for d in dirs])
                    raise
            except BaseException as e:
                for eng in engines:
                    eng.close()
                extra_targets.remove_dirs(dirs)
                if isinstance(e, OSError) and not isinstance(e, ChainfsError):
                    raise ChainfsError(
                        Code.EIO, f"creating targets under {parent} failed: {e}"
                    ) from e
                raise
            assert len(rsp.target_ids) == len(engines)
            out = sp.CreateTargetsRsp(node_id=self.node_id)
            for eng, info, tid in zip(engines, infos, rsp.target_ids, strict=True):
                eng.save_ids({"target_id": tid, "node_id": self.node_id})
                info.target_id = tid
                info.node_id = self.node_id
                self.engines.append(eng)
                self.targets[tid] = LocalTarget(tid, eng)
                used, cap = eng.usage()
                out.targets.append(
                    sp.LocalTarget(
                        target_id=tid, path=str(eng.path), used_bytes=used, capacity_bytes=cap
                    )
                )
            self.heartbeat.add_registered_targets(infos)
            self.routing.install(Routing(rsp.routing))
            log.info(
                "created targets %s under %s",
                list(rsp.target_ids),
                parent,
            )
            return out

    async def repair_chunk(self, req: sp.RepairChunkReq) -> sp.RepairChunkRsp:
        """fsck --repair: copy one chunk onto a local target from its healthy replica."""
        repairer = self.repairer
        if repairer is None:
            raise ChainfsError(Code.TARGET_NOT_SERVING, "storage node is starting")
        self.fence.check()
        target = self.targets.get(req.target_id)
        if target is None:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {req.target_id} is not on this node")
        key = (req.chunk.inode, req.chunk.index)
        got = await repairer.repair_now(req.target_id, key, req.prefer_target)
        rsp = sp.RepairChunkRsp(
            copied=got.copied,
            from_target=got.from_target,
            bytes_copied=got.bytes_copied,
            reason=got.reason,
        )
        if got.record is not None:
            rsp.meta.CopyFrom(record_to_meta(key[0], key[1], got.record))
        return rsp

    async def drop_chunks(self, req: sp.DropChunksReq) -> sp.DropChunksRsp:
        """Remove every chunk of a local target that is in no chain (after a rebalance)."""
        return await drop_chunks.drop_chunks(
            req, self.targets, self._refresh_routing, self.executor, self.config.max_list_chunks
        )

    def is_lost(self, target_id: int, inode: int, index: int) -> bool:
        return self.repairer is not None and self.repairer.is_lost(target_id, inode, index)

    async def _forget_at_mgmtd(self, paths: list[str]) -> None:
        """After an ambiguous AddTargets failure: remove any of ``paths`` mgmtd
        registered after all (best effort; what is left is logged)."""
        try:
            routing = await self.mgmt.get_routing(0)
            assert routing is not None
            for t in routing.info.targets:
                if t.node_id == self.node_id and t.path in paths and not t.chain_id:
                    await self.mgmt.update_target(t.target_id, mp.UpdateTargetReq.REMOVE)
        except ChainfsError as e:
            log.error(
                "mgmtd may hold targets at %s that this node does not serve "
                "(remove them with `chainfs admin remove-target`): %s",
                paths,
                e,
            )

    def heartbeat_targets(self) -> list[mp.TargetHeartbeat]:
        out = []
        for tid, t in self.targets.items():
            used, cap = t.engine.usage()
            hb = self.sync_receiver.heartbeat(tid, used, cap)
            hb.fs_id = t.engine.fs_id
            out.append(hb)
        return out

    async def start(self, control: sg.StorageControlServicer, framed: EagerHandler) -> None:
        """Serve with these handlers (see :mod:`service`), then register and heartbeat."""
        cfg = self.config
        infos = self.open_targets()
        # Both servers listen (from bind on) before mgmtd or the ready file name
        # this node, so whoever learns an address can connect to it at once.
        # Control plane.
        self.grpc_server = grpc_util.server(cfg.grpc, self.authenticator)
        sg.add_StorageControlServicer_to_server(control, self.grpc_server)
        port = grpc_util.bind(self.grpc_server, cfg.listen_host, cfg.port)
        await self.grpc_server.start()
        self.rpc_address = f"{cfg.listen_host}:{port}"
        # Data plane.
        if cfg.unix_socket and cfg.targets:
            path = str(Path(cfg.targets[0]) / cfg.unix_socket)
            if len(os.fsencode(path)) < MAX_UNIX_PATH_BYTES:
                self.unix_path = path
            else:
                # The kernel's sun_path holds 108 bytes: serve over TCP only.
                log.warning(
                    "unix socket path too long (%d bytes), TCP only: %s",
                    len(os.fsencode(path)),
                    path,
                )
        self.data_server = DataServer(
            framed,
            cfg.listen_host,
            cfg.data_port,
            unix_path=self.unix_path or None,
            config=cfg.dataplane,
            is_cluster_peer=lambda host: is_storage_host(self.routing.current, host),
            authenticator=self.authenticator,
        )
        await self.data_server.start()
        self.data_address = self.data_server.address
        self.metrics = await NodeMetrics.start(
            cfg.listen_host, cfg.metrics_port, node_collector(self)
        )
        # Register with mgmtd and heartbeat.
        node = mp.NodeInfo(
            node_id=self.node_id,
            type=mp.STORAGE,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            rpc_address=self.rpc_address,
            data_address=self.data_address,
            unix_socket=self.unix_path,
            tags=self.metrics.tags(),
        )
        self.heartbeat = HeartbeatLoop(
            self.mgmt,
            node,
            self.heartbeat_targets,
            on_routing=self._on_routing,
            interval_s=cfg.heartbeat_interval_ms / 1000,
            targets=infos,
            on_response=self._on_heartbeat,
            secret=self.secret,
        )
        await self.heartbeat.start()
        self.node_id = self.heartbeat.node_id
        assert len(self.heartbeat.target_ids) == len(self.engines)
        for eng, tid in zip(self.engines, self.heartbeat.target_ids, strict=True):
            if eng.load_ids() != {"target_id": tid, "node_id": self.node_id}:
                eng.save_ids({"target_id": tid, "node_id": self.node_id})
            self.targets[tid] = LocalTarget(tid, eng)
        credential = self.credential()
        self.data_client = DataClient(cfg.dataplane, credential)
        self.craq = Craq(
            cfg,
            self.targets,
            lambda: self.routing.current,
            self._refresh_routing,
            DataPlaneForwarder(self.data_client),
            self.executor,
        )
        # Read replies hold read-pool buffers until sent: readers waiting for them
        # make a peer that does not read its replies a slow peer to drop.
        self.data_server.pressure_pools.append(self.craq.read_pool)
        self.routing.start()
        fcfg = cfg.failure
        self.resyncer = Resyncer(
            fcfg,
            self.targets,
            lambda: self.routing.current,
            self.data_client,
            self.executor,
            self.fence.fenced,
            credential,
            on_start=self._beat_soon,
        )
        self.copier = ChunkCopier(
            self.targets,
            lambda: self.routing.current,
            self.data_client,
            self.executor,
            fcfg.repair_timeout_ms / 1000,
            credential,
        )
        self.repairer = Repairer(fcfg, self.targets, self.copier)
        self.scrubber = Scrubber(
            fcfg, self.targets, self.repairer, self.executor, self.fence.fenced
        )
        self.resyncer.start()
        # A target turning SYNCING starts its fill now, not at the next scan.
        resyncer = self.resyncer
        self.routing.add_listener(lambda _: resyncer.wake())
        self.repairer.start()
        self.scrubber.start()
        if self.secret is not None:
            self.user_refresher = self.users.refresher()
            self.user_refresher.start()

    def credential(self) -> cpb.Credential | None:
        """What this node presents to its peers (None without a cluster secret)."""
        if self.secret is None:
            return None
        return node_credential(self.secret, self.node_id)

    def _on_routing(self, routing: Routing) -> None:
        self.routing.install(routing)

    def _beat_soon(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat_soon()

    def _on_heartbeat(self, rsp: mp.HeartbeatRsp) -> None:
        # A rebalance run may set the resync rate; without one the node's own applies.
        if self.resyncer is not None:
            rate = rsp.resync_rate_bytes_per_s if rsp.HasField("resync_rate_bytes_per_s") else None
            self.resyncer.set_rate(rate)

    async def _refresh_routing(self, min_version: int) -> Routing | None:
        try:
            return await self.routing.refresh(min_version)
        except ChainfsError as e:
            log.warning("routing refresh failed: %s", e)
            return None

    def ready_info(self) -> dict[str, object]:
        return {
            "rpc_address": self.rpc_address,
            "data_address": self.data_address,
            "unix_socket": self.unix_path,
            "node_id": self.node_id,
            "target_ids": sorted(self.targets),
            "targets": {str(tid): str(t.engine.path) for tid, t in self.targets.items()},
            **(self.metrics.ready_info() if self.metrics else {}),
        }

    async def stop(self) -> None:
        for svc in (self.user_refresher, self.scrubber, self.repairer, self.resyncer):
            if svc is not None:
                await svc.stop()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        await self.routing.stop()
        if self.data_server is not None:
            await self.data_server.stop()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=1.0)
        if self.data_client is not None:
            await self.data_client.close()
        await self.mgmt.close()
        self.executor.shutdown(wait=True)
        for eng in self.engines:
            eng.close()
