"""The Mgmt service: every mgmtd RPC, on the primary's cached cluster state.

All cluster state (routing info, id counters, config) lives in the store; the
primary caches it, and it is the only writer. Heartbeat arrival times and
per-target usage figures are kept in the primary's memory only: after a
takeover every node gets a full heartbeat timeout of grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc.aio

from chainfs.common.auth.identity import current_identity
from chainfs.common.auth.secret import (
    JOIN_NODE_ID,
    MGMTD_NODE_ID,
    load_secret,
    node_credential,
)
from chainfs.common.cluster_config import parse_setting
from chainfs.common.dataplane.server import Handler, message_handler
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import distinct_capacity
from chainfs.common.rpc.grpc_util import rpc_handler
from chainfs.common.rpc.mgmt_client import not_primary_message
from chainfs.common.rpc.mgmt_wire import WIRE_BY_MSG_TYPE
from chainfs.kv import KVStore, Transaction, prefix_end
from chainfs.mgmt_service.cluster_state import ClusterState, Counters
from chainfs.mgmt_service.config import MgmtdConfig, redact_url
from chainfs.mgmt_service.election import Election
from chainfs.mgmt_service.rebalance import Rebalancer, plan
from chainfs.mgmt_service.schema import (
    KEY_CONFIG,
    KEY_CONFIG_VERSION,
    KEY_COUNTERS,
    KEY_PEER,
    KEY_PRIMARY,
    KEY_REBALANCE,
    wall_ms,
)
from chainfs.mgmt_service.users import UserStore
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import mgmt_pb2_grpc as mg

log = logging.getLogger(__name__)
T = TypeVar("T")

WATCH_RECHECK_S = 1.0  # a watch stream re-checks primacy at least this often

# The policy key of each framed msg_type (mgmtd's framed calls are authorized
# like their gRPC twins).
POLICY_KEYS = {t: f"chainfs.mgmt.Mgmt/{w.name}" for t, w in WIRE_BY_MSG_TYPE.items()}


def check_own_node(node_id: int, what: str, joining: bool = False) -> None:
    """A node may report only for itself (``joining``: a new node without an
    id may register); admins (and callers of a server without authentication)
    may name any node."""
    who = current_identity()
    if not who.is_node:
        return
    if who.node_id == node_id or (joining and who.node_id == JOIN_NODE_ID):
        return
    raise ChainfsError(Code.EPERM, f"{who.describe()} may not {what} for node {node_id}")


class Mgmtd(mg.MgmtServicer):
    """The Mgmt servicer; its background rounds are run by ``mgmt_service.background``."""

    def __init__(
        self,
        cfg: MgmtdConfig,
        store: KVStore,
        self_id: int,
        address: str,
        store_url: str = "",
        exclusive_store: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.clock = clock  # heartbeat arrival and deadlines (seconds); simulations pass theirs
        self.store = store
        self.store_url = store_url
        self.self_id = self_id
        self.address = address
        self.election = Election(store, self_id, address, cfg, exclusive_store)
        self.state: ClusterState | None = None  # primary's cache of the stored state
        self._epoch_loaded = 0
        self._mutex = asyncio.Lock()
        self._last_hb: dict[int, float] = {}  # node id -> monotonic time of last heartbeat
        self._last_hb_ms: dict[int, int] = {}  # node id -> wall clock, for display
        self._target_stats: dict[int, mp.TargetHeartbeat] = {}
        # _routing_out's last answer: (routing version, clock at build, info).
        self._routing_cache: tuple[int, float, mp.RoutingInfo] | None = None
        self._stale_rsp: tuple[mp.RoutingInfo, mp.HeartbeatRsp] | None = None  # per routing out
        self._watchers: set[asyncio.Event] = set()
        self.stopping = False  # set by stop_serving(): answer as a standby from now on
        self.rebalancer = Rebalancer(
            self._mutate,
            self._require_primary,
            self._routing_change,
            self._used_bytes,
            cfg.check_interval_ms,
            cfg.rebalance_move_timeout_ms / 1000,
            cfg.rebalance_drop_timeout_ms / 1000,
            node_credential(load_secret(cfg.cluster_secret_file), MGMTD_NODE_ID)
            if cfg.cluster_secret_file
            else None,
            persist=self._store_rebalance,
        )
        self.users = UserStore(store, cfg.max_users)

    # -- primary state -----------------------------------------------------
    def _not_primary(self) -> ChainfsError:
        addr = self.election.primary_address
        return ChainfsError(
            Code.NOT_PRIMARY, not_primary_message(addr if addr != self.address else None)
        )

    def _require_primary(self) -> ClusterState:
        if self.stopping or not self.election.is_primary() or self.state is None:
            raise self._not_primary()
        if self._epoch_loaded != self.election.epoch:
            raise self._not_primary()
        return self.state

    async def _check_primary(self, tx: Transaction, epoch: int) -> None:
        raw = await tx.get(KEY_PRIMARY)
        primary = json.loads(raw) if raw else None
        if not primary or primary["node_id"] != self.self_id or primary["epoch"] != epoch:
            raise self._not_primary()

    async def _load_state(self) -> None:
        epoch = self.election.epoch

        async def fn(tx: Transaction) -> tuple[ClusterState, bytes | None]:
            state = await ClusterState.load(tx, self.cfg.cluster_id)
            if state.from_single_key:  # the old layout: one key per record from now on
                await self._check_primary(tx, epoch)
                state.save_all(tx)
            return state, await tx.get(KEY_REBALANCE)

        state, run = await self.store.transact(fn)
        if state.from_single_key:
            log.info("cluster state converted to one key per node, target and chain")
        now = self.clock()
        self._last_hb = {n.node_id: now for n in state.info.nodes}  # grace after takeover
        self._target_stats.clear()
        self._routing_cache = None
        self.state = state
        self._epoch_loaded = self.election.epoch
        log.info(
            "primary (epoch %d): %d nodes, %d targets, %d chains, routing version %d",
            self.election.epoch,
            len(state.info.nodes),
            len(state.info.targets),
            len(state.info.chains),
            state.info.version,
        )
        self._notify_watchers()
        if run is not None:  # the last run: shown, and resumed if it had not finished
            self.rebalancer.resume(mp.RebalanceRun.FromString(run))

    async def _store_rebalance(self, run: mp.RebalanceRun) -> None:
        """Store the rebalance run (only while primary of the epoch it began in)."""
        epoch = self.election.epoch
        if self._epoch_loaded != epoch:
            raise self._not_primary()
        value = run.SerializeToString()

        async def fn(tx: Transaction) -> None:
            await self._check_primary(tx, epoch)
            tx.set(KEY_REBALANCE, value)

        await self.store.transact(fn)

    def stop_serving(self) -> None:
        """Shutdown begins: answer NOT_PRIMARY at once, and take no lease again
        (the lease itself is released once the background loops have ended)."""
        self.stopping = True
        self.step_down()

    def step_down(self) -> None:
        if self.state is not None:
            log.warning("no longer primary")
        self.rebalancer.stop()
        self.state = None
        self._epoch_loaded = 0
        self._notify_watchers()

    async def _mutate(self, op: Callable[[ClusterState], T]) -> tuple[T, ClusterState]:
        """Apply ``op`` and commit it (plus one chain step) in one transaction.

        ``op`` validates before changing anything, so an error changes nothing.
        Returns op's result and the committed state.
        """
        async with self._mutex:
            cached = self._require_primary()
            # Dry run on the cache: validation errors raise here, and nothing to
            # change means no transaction at all.
            trial = cached.copy()
            result = op(trial)
            if not trial.finish(cached):
                self.state = trial  # equal to the cache, and knows which chains settled
                return result, trial
            epoch = self.election.epoch

            async def fn(tx: Transaction) -> tuple[T, ClusterState, bool]:
                # The primary is the only writer of the state, so the cache is
                # what is stored; only the id counters are shared (a starting
                # mgmtd takes its id from them): redo the op if they moved.
                await self._check_primary(tx, epoch)
                stored = Counters.decode(await tx.get(KEY_COUNTERS))
                res, after, changed = result, trial, True
                if stored != cached.counters:
                    before = cached.copy()
                    before.counters = stored
                    after = before.copy()
                    res = op(after)
                    changed = after.finish(before)
                if changed:
                    after.save(tx)
                return res, after, changed

            try:
                result, after, changed = await self.store.transact(fn)
            except ChainfsError as e:
                if e.code == Code.NOT_PRIMARY:
                    self.election.epoch = 0
                    self.step_down()
                raise
            self.state = after
            if changed:
                self._notify_watchers()
            return result, after

    def _notify_watchers(self) -> None:
        for ev in self._watchers:
            ev.set()

    def _routing_out(self, state: ClusterState) -> mp.RoutingInfo:
        """Routing info with the in-memory figures (heartbeat times, usage) filled in.

        Built once per routing version and heartbeat interval, not per caller:
        after a change every node asks for it, and building it walks every
        target. Callers copy it, never change it.
        """
        now = self.clock()
        cached = self._routing_cache
        fresh_s = self.cfg.heartbeat_interval_ms / 1000.0
        if cached is not None and cached[0] == state.info.version and now - cached[1] < fresh_s:
            return cached[2]
        info = self._build_routing_out(state)
        self._routing_cache = (state.info.version, now, info)
        return info

    def _build_routing_out(self, state: ClusterState) -> mp.RoutingInfo:
        info = mp.RoutingInfo()
        info.CopyFrom(state.info)
        for n in info.nodes:
            n.last_heartbeat_ms = self._last_hb_ms.get(n.node_id, 0)
        stats = self._target_stats
        for t in info.targets:
            s = stats.get(t.target_id)
            if s is None:
                continue
            # Stored records hold none of these figures (zero, empty): set only
            # the reported ones, as setting a field costs more than testing it.
            if s.used_bytes:
                t.used_bytes = s.used_bytes
            if s.capacity_bytes:
                t.capacity_bytes = s.capacity_bytes
            if s.sync_bytes_left:
                t.sync_bytes_left = s.sync_bytes_left
            if s.sync_rate_bytes_per_s:
                t.sync_rate_bytes_per_s = s.sync_rate_bytes_per_s
            if s.fs_id:
                t.fs_id = s.fs_id
        return info

    def live_view(self) -> tuple[mp.RoutingInfo, dict[int, float]] | None:
        """Primary: routing with live figures, and each node's seconds since its
        last heartbeat (metrics, status page); None on a standby."""
        if self.state is None or not self.election.is_primary():
            return None
        now = self.clock()
        return self._routing_out(self.state), {n: now - t for n, t in self._last_hb.items()}

    # -- background rounds (run by mgmt_service.background) ---------------
    async def election_round(self) -> None:
        """Renew or take the lease, or stand by; load the state on taking over."""
        if self.stopping:
            return
        try:
            action = await self.election.round()
            if action == "took":
                log.info("took the primary lease (epoch %d)", self.election.epoch)
            if action in ("took", "renewed") and self._epoch_loaded != self.election.epoch:
                await self._load_state()
            elif action == "standby" and self.state is not None:
                self.step_down()
        finally:
            if self.state is not None and not self.election.is_primary():
                self.step_down()

    async def check_heartbeats(self) -> None:
        """Primary: time out silent nodes and step chains (waiting -> syncing ...)."""
        if self.state is None or not self.election.is_primary():
            return
        timeout_s = self.cfg.heartbeat_timeout_ms / 1000.0
        now = self.clock()
        silent = [
            n.node_id
            for n in self.state.info.nodes
            if n.status == mp.NODE_ONLINE and now - self._last_hb.get(n.node_id, now) > timeout_s
        ]

        def op(s: ClusterState) -> None:
            # Re-checked when the op runs (after waiting for the mutex, and
            # again in the transaction): a heartbeat that came meanwhile
            # keeps its node online.
            at = self.clock()
            late = [i for i in silent if at - self._last_hb.get(i, at) > timeout_s]
            s.mark_offline(late)

        if not silent and not self.state.has_unsettled_chains():
            return  # nothing to time out and every chain settled: no step would change one
        if silent:
            log.warning("nodes %s missed heartbeats for %.1fs: offline", silent, timeout_s)
        await self._mutate(op)

    # -- RPCs --------------------------------------------------------------
    @rpc_handler
    async def RegisterNode(
        self, request: mp.RegisterNodeReq, context: grpc.aio.ServicerContext
    ) -> mp.RegisterNodeRsp:
        new = request.node.node_id == 0 and not request.reregister
        check_own_node(request.node.node_id, "register", joining=new)

        def op(s: ClusterState) -> tuple[int, list[int]]:
            return s.register(request.node, list(request.targets), request.reregister)

        (node_id, target_ids), state = await self._mutate(op)
        self._last_hb[node_id] = self.clock()
        self._last_hb_ms[node_id] = wall_ms()
        log.info(
            "%s node %d (%s) at %s, targets %s",
            "re-registered" if request.reregister else "registered",
            node_id,
            mp.NodeType.Name(request.node.type),
            request.node.rpc_address,
            target_ids,
        )
        return mp.RegisterNodeRsp(
            node_id=node_id,
            target_ids=target_ids,
            routing=self._routing_out(state),
            heartbeat_interval_ms=self.cfg.heartbeat_interval_ms,
            heartbeat_timeout_ms=self.cfg.heartbeat_timeout_ms,
        )

    @rpc_handler
    async def Heartbeat(
        self, request: mp.HeartbeatReq, context: grpc.aio.ServicerContext
    ) -> mp.HeartbeatRsp:
        check_own_node(request.node_id, "heartbeat")
        state = self._require_primary()
        if state.heartbeat_changes(request):  # also validates (UNKNOWN_NODE ...)
            _, state = await self._mutate(lambda s: s.apply_heartbeat(request))
        self._last_hb[request.node_id] = self.clock()
        self._last_hb_ms[request.node_id] = wall_ms()
        for th in request.targets:
            self._target_stats[th.target_id] = th
        rate = self.rebalancer.rate_bytes_per_s if self.rebalancer.running else None
        if rate is not None:  # a rebalance paces resync: every answer carries its rate
            rsp = mp.HeartbeatRsp(routing_version=state.info.version, resync_rate_bytes_per_s=rate)
            if request.routing_version < state.info.version:
                rsp.routing.CopyFrom(self._routing_out(state))
            return rsp
        if request.routing_version >= state.info.version:
            return mp.HeartbeatRsp(routing_version=state.info.version)
        # After a change every node is behind: all get one shared answer.
        routing = self._routing_out(state)
        if self._stale_rsp is None or self._stale_rsp[0] is not routing:
            rsp = mp.HeartbeatRsp(routing_version=state.info.version)
            rsp.routing.CopyFrom(routing)
            self._stale_rsp = (routing, rsp)
        return self._stale_rsp[1]

    @rpc_handler
    async def GetRoutingInfo(
        self, request: mp.GetRoutingInfoReq, context: grpc.aio.ServicerContext
    ) -> mp.GetRoutingInfoRsp:
        state = self._require_primary()
        if request.wait_ms and request.known_version == state.info.version:
            state = await self._routing_change(request.known_version, request.wait_ms)
        if request.known_version and request.known_version == state.info.version:
            return mp.GetRoutingInfoRsp(unchanged=True)
        return mp.GetRoutingInfoRsp(routing=self._routing_out(state))

    async def _routing_change(self, known: int, wait_ms: int) -> ClusterState:
        """Primary: the state once its routing version differs from ``known``,
        or after ``wait_ms`` (at most max_routing_wait_ms): a long poll."""
        wait_s = min(wait_ms, self.cfg.max_routing_wait_ms) / 1000.0
        deadline = time.monotonic() + wait_s
        with self._watcher() as changed:
            while True:
                state = self._require_primary()
                left_s = deadline - time.monotonic()
                if state.info.version != known or left_s <= 0:
                    return state
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(left_s, WATCH_RECHECK_S))
                changed.clear()

    @contextlib.contextmanager
    def _watcher(self) -> Iterator[asyncio.Event]:
        """An event set on every routing change, for one watch (bounded in number)."""
        if len(self._watchers) >= self.cfg.max_watch_streams:
            raise ChainfsError(
                Code.EBUSY, f"too many routing watchers ({self.cfg.max_watch_streams})"
            )
        changed = asyncio.Event()
        self._watchers.add(changed)
        try:
            yield changed
        finally:
            self._watchers.discard(changed)

    @rpc_handler
    async def WatchRoutingInfo(
        self, request: mp.WatchRoutingInfoReq, context: grpc.aio.ServicerContext
    ) -> None:
        self._require_primary()
        known = request.known_version
        with self._watcher() as changed:
            while True:
                state = self._require_primary()
                if state.info.version != known:
                    known = state.info.version
                    await context.write(self._routing_out(state))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), WATCH_RECHECK_S)
                changed.clear()

    @rpc_handler
    async def CreateChains(
        self, request: mp.CreateChainsReq, context: grpc.aio.ServicerContext
    ) -> mp.CreateChainsRsp:
        def op(s: ClusterState) -> list[int]:
            return s.create_chains(request.replicas, request.num_chains, request.init)

        ids, state = await self._mutate(op)
        log.info("created %d chains of %d replicas: %s", len(ids), request.replicas, ids)
        chains = [c for c in state.info.chains if c.chain_id in set(ids)]
        return mp.CreateChainsRsp(chains=chains, routing=self._routing_out(state))

    @rpc_handler
    async def UpdateTarget(
        self, request: mp.UpdateTargetReq, context: grpc.aio.ServicerContext
    ) -> mp.UpdateTargetRsp:
        A = mp.UpdateTargetReq.Action
        target = self._require_primary().target(request.target_id)
        check_own_node(target.node_id if target is not None else 0, "update a target")
        if request.action == A.Value("OFFLINE"):
            _, state = await self._mutate(lambda s: s.offline_target(request.target_id))
        elif request.action == A.Value("REMOVE"):
            _, state = await self._mutate(lambda s: s.remove_target(request.target_id))
        elif request.action == A.Value("ONLINE"):
            _, state = await self._mutate(lambda s: s.online_target(request.target_id))
        elif request.action == A.Value("ROTATE_LASTSRV"):
            _, state = await self._mutate(lambda s: s.rotate_lastsrv(request.target_id))
        else:
            raise ChainfsError(Code.EINVAL, f"unknown target action {request.action}")
        return mp.UpdateTargetRsp(routing=self._routing_out(state))

    @rpc_handler
    async def UpdateChain(
        self, request: mp.UpdateChainReq, context: grpc.aio.ServicerContext
    ) -> mp.UpdateChainRsp:
        def op(s: ClusterState) -> None:
            s.update_chain(request.chain_id, request.add_targets, request.remove_targets)

        _, state = await self._mutate(op)
        chain = state.chain(request.chain_id)
        assert chain is not None
        return mp.UpdateChainRsp(chain=chain)

    @rpc_handler
    async def AddTargets(
        self, request: mp.AddTargetsReq, context: grpc.aio.ServicerContext
    ) -> mp.AddTargetsRsp:
        check_own_node(request.node_id, "add targets")

        def op(s: ClusterState) -> list[int]:
            return s.add_targets(request.node_id, list(request.targets))

        ids, state = await self._mutate(op)
        log.info("node %d added targets %s", request.node_id, ids)
        return mp.AddTargetsRsp(target_ids=ids, routing=self._routing_out(state))

    def _used_bytes(self, target_id: int) -> int:
        s = self._target_stats.get(target_id)
        return s.used_bytes if s is not None else 0

    @rpc_handler
    async def Rebalance(
        self, request: mp.RebalanceReq, context: grpc.aio.ServicerContext
    ) -> mp.RebalanceRsp:
        state = self._require_primary()
        if not request.dry_run and self.rebalancer.running:
            raise ChainfsError(Code.EBUSY, "a rebalance is already running")
        moves = plan(state, request.mode, request.node_id, self.cfg.rebalance_max_moves)
        if not request.dry_run:
            concurrency = request.max_concurrent_moves or self.cfg.rebalance_max_concurrent_moves
            await self.rebalancer.start(request, moves, concurrency)
            log.info("rebalance started: %d moves, %d at once", len(moves), concurrency)
        return mp.RebalanceRsp(plan=moves, status=self.rebalancer.status())

    @rpc_handler
    async def GetRebalanceStatus(
        self, request: mp.GetRebalanceStatusReq, context: grpc.aio.ServicerContext
    ) -> mp.GetRebalanceStatusRsp:
        self._require_primary()
        return mp.GetRebalanceStatusRsp(status=self.rebalancer.status())

    @rpc_handler
    async def SetConfig(
        self, request: mp.SetConfigReq, context: grpc.aio.ServicerContext
    ) -> mp.SetConfigRsp:
        self._require_primary()
        key = request.key
        if not key or len(key.encode()) > self.cfg.max_config_key_bytes:
            raise ChainfsError(
                Code.EINVAL, f"config key must be 1..{self.cfg.max_config_key_bytes} bytes"
            )
        if len(request.value.encode()) > self.cfg.max_config_value_bytes:
            raise ChainfsError(
                Code.EINVAL, f"config value longer than {self.cfg.max_config_value_bytes} bytes"
            )
        value = str(parse_setting(key, request.value))  # unknown key or bad value: nothing stored
        epoch = self.election.epoch

        async def fn(tx: Transaction) -> int:
            raw = await tx.get(KEY_PRIMARY)
            primary = json.loads(raw) if raw else None
            if not primary or primary["node_id"] != self.self_id or primary["epoch"] != epoch:
                raise self._not_primary()
            version = int(await tx.get(KEY_CONFIG_VERSION) or b"0") + 1
            tx.set(KEY_CONFIG + key.encode(), value.encode())
            tx.set(KEY_CONFIG_VERSION, str(version).encode())
            return version

        version = await self.store.transact(fn)
        log.info("config %s set (config version %d)", key, version)
        return mp.SetConfigRsp(version=version)

    @rpc_handler
    async def GetConfig(
        self, request: mp.GetConfigReq, context: grpc.aio.ServicerContext
    ) -> mp.GetConfigRsp:
        self._require_primary()

        async def fn(tx: Transaction) -> tuple[dict[str, str], int]:
            version = int(await tx.get(KEY_CONFIG_VERSION) or b"0")
            if request.key:
                raw = await tx.get(KEY_CONFIG + request.key.encode())
                return ({request.key: raw.decode()} if raw is not None else {}), version
            pairs = await tx.get_range(KEY_CONFIG, prefix_end(KEY_CONFIG))
            return {k[len(KEY_CONFIG) :].decode(): v.decode() for k, v in pairs}, version

        values, version = await self.store.transact(fn, read_only=True)
        return mp.GetConfigRsp(values=values, version=version)

    @rpc_handler
    async def GetStatus(
        self, request: mp.GetStatusReq, context: grpc.aio.ServicerContext
    ) -> mp.GetStatusRsp:
        """Answered by any mgmtd: the primary from its cache, a standby from the store."""
        primary = self.election.is_primary() and self.state is not None

        async def fn(tx: Transaction) -> tuple[ClusterState, list[dict[str, Any]]]:
            st = await ClusterState.load(tx, self.cfg.cluster_id)
            peers = [json.loads(v) for _, v in await tx.get_range(KEY_PEER, prefix_end(KEY_PEER))]
            return st, peers

        stored, peers = await self.store.transact(fn, read_only=True)
        state = self.state if primary and self.state is not None else stored
        info = self._routing_out(state) if primary else state.info
        rsp = mp.GetStatusRsp(
            cluster_id=info.cluster_id or self.cfg.cluster_id,
            self_id=self.self_id,
            primary=primary,
            primary_address=self.address if primary else self.election.primary_address,
            routing_version=info.version,
            nodes_online=sum(1 for n in info.nodes if n.status == mp.NODE_ONLINE),
            nodes_total=len(info.nodes),
            targets_serving=sum(1 for t in info.targets if t.public_state == mp.SERVING),
            targets_total=len(info.targets),
            chains_total=len(info.chains),
            used_bytes=sum(t.used_bytes for t in info.targets),
            capacity_bytes=distinct_capacity(info.targets),
            kv_url=redact_url(self.store_url),
        )
        serving = {t.target_id for t in info.targets if t.public_state == mp.SERVING}
        rsp.chains_writable = sum(1 for c in info.chains if any(t in serving for t in c.targets))
        stale_ms = 3 * self.cfg.lease_ms
        now_ms = wall_ms()
        for p in sorted(peers, key=lambda p: p["node_id"]):
            if now_ms - int(p["seen_ms"]) > stale_ms:
                continue
            is_primary = p["address"] == rsp.primary_address
            rsp.mgmtds.add(
                node_id=int(p["node_id"]),
                rpc_address=p["address"],
                primary=is_primary,
                lease_expires_ms=self.election.lease_expires_ms if is_primary else 0,
            )
        return rsp

    # -- users (any mgmtd answers: the store is transactional) --------------
    @rpc_handler
    async def UserAdd(
        self, request: mp.UserAddReq, context: grpc.aio.ServicerContext
    ) -> mp.UserAddRsp:
        user, token = await self.users.add(request.user)
        return mp.UserAddRsp(user=user, token=token)

    @rpc_handler
    async def UserList(
        self, request: mp.UserListReq, context: grpc.aio.ServicerContext
    ) -> mp.UserListRsp:
        return mp.UserListRsp(users=await self.users.list())

    @rpc_handler
    async def UserRemove(
        self, request: mp.UserRemoveReq, context: grpc.aio.ServicerContext
    ) -> mp.UserRemoveRsp:
        await self.users.remove(request.name)
        return mp.UserRemoveRsp()

    @rpc_handler
    async def TokenRotate(
        self, request: mp.TokenRotateReq, context: grpc.aio.ServicerContext
    ) -> mp.TokenRotateRsp:
        return mp.TokenRotateRsp(token=await self.users.rotate(request.name))

    @rpc_handler
    async def GetUserDirectory(
        self, request: mp.GetUserDirectoryReq, context: grpc.aio.ServicerContext
    ) -> mp.GetUserDirectoryRsp:
        return await self.users.directory(request.known_version)


def framed_handler(svc: Mgmtd, authenticated: bool = False) -> Handler:
    """The framed transport's handler (the client library's mgmtd calls): each
    request is answered like its gRPC method (NOT_PRIMARY names the primary)."""

    def call(method: Any) -> Callable[[Any], Awaitable[Any]]:
        # The framed calls never use the gRPC context.
        return lambda request: method(svc, request, None)

    calls = {
        t: (w.request, call(getattr(Mgmtd, w.name).__wrapped__))
        for t, w in WIRE_BY_MSG_TYPE.items()
    }
    return message_handler("mgmtd", calls, POLICY_KEYS if authenticated else None)
