"""The cluster state mgmtd keeps in the KV store, and every change to it.

:class:`ClusterState` is a plain value (the routing info plus id counters)
with one method per change: register a node, apply a heartbeat, time nodes
out, create chains, operator updates. Methods validate first and raise
ChainfsError before touching anything, so a rejected request changes nothing.
:meth:`ClusterState.finish` then steps every chain once through the target
state machine (``target_states``), bumps the version of each chain that
changed and, if anything changed at all, the routing-info version.

In the store the state is one key per node, target and chain plus a small
header (``schema``): :meth:`ClusterState.finish` records which records an
operation changed, and :meth:`ClusterState.save` writes only those, so a
heartbeat that flips one node writes a handful of keys however large the
cluster. Lookups go through an id index, and ``finish`` steps only the chains
an operation touched or that have not settled yet, so the cost of an
operation does not grow with the number of nodes, targets or chains (copy()
aside, which the caller does once per committed change).

Code that changes ``info`` records directly, not through these methods, must
say so with :meth:`ClusterState.mark_changed`, or the change is neither
stepped nor stored.

Nothing here does I/O beyond the KV transaction handed to load/save.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction, prefix_end
from chainfs.mgmt_service import chain_table
from chainfs.mgmt_service.schema import (
    KEY_CHAIN,
    KEY_COUNTERS,
    KEY_NODE,
    KEY_ROUTING,
    KEY_STATE_HEADER,
    KEY_TARGET,
    chain_key,
    node_key,
    target_key,
)
from chainfs.mgmt_service.target_states import LS, PS, Member, step_chain
from chainfs.proto import mgmt_pb2 as mp

REGISTRABLE_TYPES = (mp.META, mp.STORAGE, mp.CLIENT)
MAX_TARGETS_PER_NODE = 1024  # bound on one registration
MAX_TAGS_PER_NODE = 64


@dataclass
class Counters:
    next_node_id: int = 1
    next_target_id: int = 1

    def encode(self) -> bytes:
        return json.dumps(
            {"next_node_id": self.next_node_id, "next_target_id": self.next_target_id}
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Counters:
        if raw is None:
            return cls()
        d = json.loads(raw)
        return cls(int(d["next_node_id"]), int(d["next_target_id"]))


def _chain_signature(
    targets: dict[int, mp.TargetInfo], chain: mp.ChainInfo
) -> tuple[tuple[int, int], ...]:
    return tuple((t, targets[t].public_state if t in targets else 0) for t in chain.targets)


@dataclass
class _Index:
    """Id -> record (the records of ``info``, not copies), and each node's target ids.

    ``info``'s lists are kept sorted by id (load reads them in key order, new
    records are sorted in), which lets a copy reuse the ids: reading a field
    of every record costs about ten times more than pairing ids with records.
    """

    nodes: dict[int, mp.NodeInfo] = field(default_factory=dict)
    targets: dict[int, mp.TargetInfo] = field(default_factory=dict)
    chains: dict[int, mp.ChainInfo] = field(default_factory=dict)
    by_node: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, info: mp.RoutingInfo) -> _Index:
        idx = cls(
            {n.node_id: n for n in info.nodes},
            {t.target_id: t for t in info.targets},
            {c.chain_id: c for c in info.chains},
        )
        for tid, t in idx.targets.items():
            idx.by_node.setdefault(t.node_id, []).append(tid)
        return idx

    def for_copy(self, info: mp.RoutingInfo) -> _Index:
        """The same index over ``info``, a copy of the indexed RoutingInfo."""
        pairs = (
            (sorted(self.nodes), info.nodes),
            (sorted(self.targets), info.targets),
            (sorted(self.chains), info.chains),
        )
        for ids, records in pairs:
            if len(ids) != len(records) or (ids and _id_of(records[-1]) != ids[-1]):
                return _Index.of(info)  # changed behind the index: read every record
        nodes, targets, chains = (dict(zip(ids, records, strict=True)) for ids, records in pairs)
        by_node = {n: list(ids) for n, ids in self.by_node.items()}
        return _Index(nodes, targets, chains, by_node)  # type: ignore[arg-type]


def _id_of(record: mp.NodeInfo | mp.TargetInfo | mp.ChainInfo) -> int:
    if isinstance(record, mp.NodeInfo):
        return record.node_id
    if isinstance(record, mp.TargetInfo):
        return record.target_id
    return record.chain_id


@dataclass
class _Changes:
    """Ids of records an operation changed (or removed) since the last copy."""

    nodes: set[int] = field(default_factory=set)
    targets: set[int] = field(default_factory=set)
    chains: set[int] = field(default_factory=set)


class ClusterState:
    """Routing info + counters, with the operations mgmtd applies to them."""

    def __init__(self, info: mp.RoutingInfo, counters: Counters) -> None:
        self.info = info
        self.counters = counters
        self.from_single_key = False  # loaded from the old one-value layout
        self._idx: _Index | None = None
        self._changes = _Changes()
        # Chains whose last step changed them (another step may change them
        # again); None = not stepped since load, so every chain.
        self._unsettled: set[int] | None = None

    @classmethod
    def decode(cls, routing: bytes | None, counters: bytes | None, cluster_id: str) -> ClusterState:
        """From the old layout: the whole RoutingInfo in one value."""
        info = mp.RoutingInfo()
        if routing is not None:
            info.ParseFromString(routing)
        else:
            info.cluster_id = cluster_id
        return cls(info, Counters.decode(counters))

    @classmethod
    async def load(cls, tx: Transaction, cluster_id: str) -> ClusterState:
        """Read the stored state (header, then every record by range).

        A store still in the old one-value layout loads from that value, with
        ``from_single_key`` set: :meth:`save_all` converts it.
        """
        counters = await tx.get(KEY_COUNTERS)
        header = await tx.get(KEY_STATE_HEADER)
        if header is None:
            old = await tx.get(KEY_ROUTING)
            state = cls.decode(old, counters, cluster_id)
            state.from_single_key = old is not None
            return state
        info = mp.RoutingInfo()
        info.ParseFromString(header)
        for prefix, records in (
            (KEY_NODE, info.nodes),
            (KEY_TARGET, info.targets),
            (KEY_CHAIN, info.chains),
        ):
            for _, raw in await tx.get_range(prefix, prefix_end(prefix)):
                records.add().ParseFromString(raw)
        return cls(info, Counters.decode(counters))

    def _header(self) -> bytes:
        head = mp.RoutingInfo(
            version=self.info.version, replicas=self.info.replicas, cluster_id=self.info.cluster_id
        )
        return head.SerializeToString(deterministic=True)

    def save(self, tx: Transaction) -> None:
        """Write the header, the counters and the records :meth:`finish` found
        changed (removed ones are cleared)."""
        tx.set(KEY_STATE_HEADER, self._header())
        tx.set(KEY_COUNTERS, self.counters.encode())
        idx = self._index()
        for ids, records, key in (
            (self._changes.nodes, idx.nodes, node_key),
            (self._changes.targets, idx.targets, target_key),
            (self._changes.chains, idx.chains, chain_key),
        ):
            for i in sorted(ids):
                rec = records.get(i)
                if rec is None:
                    tx.clear(key(i))
                else:
                    tx.set(key(i), rec.SerializeToString(deterministic=True))

    def save_all(self, tx: Transaction) -> None:
        """Write every record (and drop the old one-value layout)."""
        self._changes = _Changes(
            {n.node_id for n in self.info.nodes},
            {t.target_id for t in self.info.targets},
            {c.chain_id for c in self.info.chains},
        )
        self.save(tx)
        tx.clear(KEY_ROUTING)
        self._changes = _Changes()

    def copy(self) -> ClusterState:
        info = mp.RoutingInfo()
        info.CopyFrom(self.info)
        out = ClusterState(info, Counters(self.counters.next_node_id, self.counters.next_target_id))
        out._unsettled = None if self._unsettled is None else set(self._unsettled)
        if self._idx is not None:
            out._idx = self._idx.for_copy(info)
        return out

    def encode(self) -> tuple[bytes, bytes]:
        return self.info.SerializeToString(deterministic=True), self.counters.encode()

    def mark_changed(
        self,
        node_ids: Iterable[int] = (),
        target_ids: Iterable[int] = (),
        chain_ids: Iterable[int] = (),
    ) -> None:
        """Records changed outside this class's methods: step and store them."""
        self._changes.nodes.update(node_ids)
        self._changes.targets.update(target_ids)
        self._changes.chains.update(chain_ids)

    def has_unsettled_chains(self) -> bool:
        """Would a step with no new input change some chain?"""
        return self._unsettled is None or bool(self._unsettled)

    # -- lookups -----------------------------------------------------------
    def _index(self) -> _Index:
        if self._idx is None:
            self._idx = _Index.of(self.info)
        return self._idx

    def node(self, node_id: int) -> mp.NodeInfo | None:
        return self._index().nodes.get(node_id)

    def target(self, target_id: int) -> mp.TargetInfo | None:
        return self._index().targets.get(target_id)

    def chain(self, chain_id: int) -> mp.ChainInfo | None:
        return self._index().chains.get(chain_id)

    def targets_of(self, node_id: int) -> list[mp.TargetInfo]:
        idx = self._index()
        return [idx.targets[tid] for tid in idx.by_node.get(node_id, ())]

    def take_node_id(self) -> int:
        nid = self.counters.next_node_id
        self.counters.next_node_id += 1
        return nid

    def _new_node(self, node_id: int) -> mp.NodeInfo:
        idx = self._index()
        n = self.info.nodes.add(node_id=node_id)
        if len(self.info.nodes) > 1 and self.info.nodes[-2].node_id > node_id:
            self.info.nodes.sort(key=lambda x: x.node_id)  # records keep their identity
        idx.nodes[node_id] = n
        self._changes.nodes.add(node_id)
        return n

    def _new_target(self, target_id: int, node_id: int) -> mp.TargetInfo:
        idx = self._index()
        t = self.info.targets.add(target_id=target_id, node_id=node_id, chain_id=0)
        if len(self.info.targets) > 1 and self.info.targets[-2].target_id > target_id:
            self.info.targets.sort(key=lambda x: x.target_id)
        idx.targets[target_id] = t
        idx.by_node.setdefault(node_id, []).append(target_id)
        self._changes.targets.add(target_id)
        return t

    def _set_public(self, t: mp.TargetInfo, state: int) -> None:
        if t.public_state != state:
            t.public_state = state  # type: ignore[assignment]
            self._changes.targets.add(t.target_id)

    def _set_local(self, t: mp.TargetInfo, state: int) -> None:
        if t.local_state != state:
            t.local_state = state  # type: ignore[assignment]
            self._changes.targets.add(t.target_id)

    def _set_status(self, n: mp.NodeInfo, status: int) -> None:
        if n.status != status:
            n.status = status  # type: ignore[assignment]
            self._changes.nodes.add(n.node_id)

    # -- registration ------------------------------------------------------
    def register(
        self, node: mp.NodeInfo, targets: Sequence[mp.TargetInfo], reregister: bool
    ) -> tuple[int, list[int]]:
        """Add or (``reregister``) refresh a node and its targets -> (node id, target ids).

        A refreshed node's known targets become locally offline: whatever they
        held before the restart must be resynced before they serve again.
        """
        if node.type not in REGISTRABLE_TYPES:
            raise ChainfsError(
                Code.EINVAL, f"cannot register a node of type {mp.NodeType.Name(node.type)}"
            )
        if node.type in (mp.META, mp.STORAGE) and not node.rpc_address:
            raise ChainfsError(Code.EINVAL, "a meta or storage node needs an rpc_address")
        if targets and node.type != mp.STORAGE:
            raise ChainfsError(Code.EINVAL, "only storage nodes have targets")
        if len(targets) > MAX_TARGETS_PER_NODE:
            raise ChainfsError(Code.EINVAL, f"more than {MAX_TARGETS_PER_NODE} targets")
        if len(node.tags) > MAX_TAGS_PER_NODE:
            raise ChainfsError(Code.EINVAL, f"more than {MAX_TAGS_PER_NODE} tags")
        ids = [t.target_id for t in targets if t.target_id]
        paths = [t.path for t in targets if t.path]
        if len(set(ids)) != len(ids) or len(set(paths)) != len(paths):
            raise ChainfsError(Code.EINVAL, "duplicate target id or path in one registration")

        existing = self.node(node.node_id) if node.node_id else None
        if existing is None and node.node_id == 0 and reregister and node.rpc_address:
            existing = next(
                (
                    n
                    for n in self.info.nodes
                    if n.rpc_address == node.rpc_address and n.type == node.type
                ),
                None,
            )
        if not reregister:
            if existing is not None:
                raise ChainfsError(
                    Code.ALREADY_REGISTERED,
                    f"node {existing.node_id} is already registered "
                    f"(at {existing.rpc_address or '-'}); a restarting node re-registers",
                )
            clash = next(
                (
                    n
                    for n in self.info.nodes
                    if node.rpc_address
                    and n.rpc_address == node.rpc_address
                    and n.status == mp.NODE_ONLINE
                ),
                None,
            )
            if clash is not None:
                raise ChainfsError(
                    Code.ALREADY_REGISTERED,
                    f"address {node.rpc_address} is already registered as node {clash.node_id}",
                )
        if existing is not None and existing.type != node.type:
            raise ChainfsError(
                Code.ALREADY_REGISTERED,
                f"node {existing.node_id} is registered as {mp.NodeType.Name(existing.type)}, "
                f"not {mp.NodeType.Name(node.type)}",
            )
        # Targets: validate every one before changing anything.
        node_id = existing.node_id if existing is not None else node.node_id
        plan: list[tuple[mp.TargetInfo | None, mp.TargetInfo]] = []  # (known, requested)
        for req in targets:
            known: mp.TargetInfo | None = None
            if req.target_id:
                known = self.target(req.target_id)
                if known is not None and known.node_id != node_id:
                    raise ChainfsError(
                        Code.ALREADY_REGISTERED,
                        f"target {req.target_id} belongs to node {known.node_id}",
                    )
            elif existing is not None and req.path:
                known = next((t for t in self.targets_of(node_id) if t.path == req.path), None)
            plan.append((known, req))

        # Apply.
        if existing is None:
            if node_id == 0:
                node_id = self.take_node_id()
            else:
                self.counters.next_node_id = max(self.counters.next_node_id, node_id + 1)
            entry = self._new_node(node_id)
        else:
            entry = existing
            self._changes.nodes.add(node_id)
            for t in self.targets_of(node_id):
                self._set_local(t, mp.LOCAL_OFFLINE)
                if not t.chain_id:
                    self._set_public(t, mp.OFFLINE)
        entry.type = node.type
        entry.hostname = node.hostname
        entry.pid = node.pid
        entry.rpc_address = node.rpc_address
        entry.data_address = node.data_address
        entry.unix_socket = node.unix_socket
        entry.tags.clear()
        entry.tags.update(node.tags)
        entry.status = mp.NODE_ONLINE
        out_ids: list[int] = []
        for known, req in plan:
            if known is None:
                tid = req.target_id
                if tid == 0:
                    tid = self.counters.next_target_id
                    self.counters.next_target_id += 1
                else:
                    self.counters.next_target_id = max(self.counters.next_target_id, tid + 1)
                t = self._new_target(tid, node_id)
                local = req.local_state or mp.ONLINE
                t.local_state = local
                t.public_state = mp.OFFLINE if local == mp.LOCAL_OFFLINE else mp.WAITING
                known = t
            known.path = req.path or known.path
            if req.capacity_bytes:
                known.capacity_bytes = req.capacity_bytes
            self._changes.targets.add(known.target_id)
            out_ids.append(known.target_id)
        return node_id, out_ids

    def add_targets(self, node_id: int, targets: Sequence[mp.TargetInfo]) -> list[int]:
        """New targets of a running storage node (admin create-targets) -> their ids.

        The node's other targets keep their states (a re-registration would mark
        them offline). A new target is in no chain: waiting, local state online.
        """
        n = self.node(node_id)
        if n is None:
            raise ChainfsError(Code.UNKNOWN_NODE, f"node {node_id} is not registered")
        if n.type != mp.STORAGE:
            raise ChainfsError(
                Code.EINVAL,
                f"node {node_id} is a {mp.NodeType.Name(n.type).lower()} node, not a storage node",
            )
        if n.status != mp.NODE_ONLINE:
            status = mp.NodeStatus.Name(n.status).removeprefix("NODE_").lower()
            raise ChainfsError(Code.EHOSTUNREACH, f"storage node {node_id} is {status}")
        if not targets:
            raise ChainfsError(Code.EINVAL, "no targets to add")
        have = self.targets_of(node_id)
        if len(have) + len(targets) > MAX_TARGETS_PER_NODE:
            raise ChainfsError(
                Code.EINVAL,
                f"node {node_id} has {len(have)} targets; {len(targets)} more would exceed "
                f"{MAX_TARGETS_PER_NODE}",
            )
        paths = [t.path for t in targets]
        if any(not p for p in paths) or len(set(paths)) != len(paths):
            raise ChainfsError(Code.EINVAL, "every new target needs its own path")
        if any(t.target_id for t in targets):
            raise ChainfsError(Code.EINVAL, "new targets get their ids from mgmtd")
        for t in have:
            if t.path in set(paths):
                raise ChainfsError(
                    Code.EEXIST, f"node {node_id} already has target {t.target_id} at {t.path}"
                )
        ids: list[int] = []
        for req in targets:
            t = self._new_target(self.counters.next_target_id, node_id)
            self.counters.next_target_id += 1
            t.local_state = mp.ONLINE
            t.public_state = mp.WAITING
            t.path = req.path
            t.capacity_bytes = req.capacity_bytes
            ids.append(t.target_id)
        return ids

    # -- heartbeats --------------------------------------------------------
    def check_heartbeat(self, req: mp.HeartbeatReq) -> mp.NodeInfo:
        """Validate a heartbeat; returns its node."""
        n = self.node(req.node_id)
        if n is None:
            raise ChainfsError(
                Code.UNKNOWN_NODE, f"node {req.node_id} is not registered; register first"
            )
        for th in req.targets:
            t = self.target(th.target_id)
            if t is not None and t.node_id != n.node_id:
                raise ChainfsError(
                    Code.UNKNOWN_TARGET,
                    f"target {th.target_id} belongs to node {t.node_id}, not {n.node_id}",
                )
            if th.local_state not in (0, mp.UPTODATE, mp.ONLINE, mp.LOCAL_OFFLINE):
                raise ChainfsError(Code.EINVAL, f"bad local state {th.local_state}")
        return n

    def heartbeat_changes(self, req: mp.HeartbeatReq) -> bool:
        """Would applying ``req`` change the stored state?"""
        n = self.check_heartbeat(req)
        if n.status != mp.NODE_ONLINE:
            return True
        for th in req.targets:
            t = self.target(th.target_id)
            if t is None or t.held_offline:
                continue
            if th.local_state and t.local_state != th.local_state:
                return True
        return False

    def apply_heartbeat(self, req: mp.HeartbeatReq) -> None:
        """Node online; reported local states recorded (unspecified = unchanged;
        targets mgmtd no longer knows, e.g. removed, are ignored)."""
        n = self.check_heartbeat(req)
        self._set_status(n, mp.NODE_ONLINE)
        for th in req.targets:
            t = self.target(th.target_id)
            if t is None or not th.local_state or t.held_offline:
                continue  # held offline: only online-target brings it back
            self._set_local(t, th.local_state)
            if not t.chain_id:
                self._set_public(
                    t, mp.OFFLINE if th.local_state == mp.LOCAL_OFFLINE else mp.WAITING
                )

    def mark_offline(self, node_ids: Iterable[int]) -> None:
        """Nodes that missed heartbeats: offline, and so are their targets."""
        for nid in node_ids:
            n = self.node(nid)
            if n is None:
                continue
            self._set_status(n, mp.NODE_OFFLINE)
            for t in self.targets_of(nid):
                self._set_local(t, mp.LOCAL_OFFLINE)
                if not t.chain_id:
                    self._set_public(t, mp.OFFLINE)

    # -- chains ------------------------------------------------------------
    def free_targets_by_node(self) -> dict[int, list[int]]:
        """Targets in no chain, on online storage nodes, not locally offline."""
        online = {
            n.node_id
            for n in self.info.nodes
            if n.type == mp.STORAGE and n.status == mp.NODE_ONLINE
        }
        out: dict[int, list[int]] = {}
        for t in sorted(self.info.targets, key=lambda t: t.target_id):
            if t.chain_id == 0 and t.node_id in online and t.local_state != mp.LOCAL_OFFLINE:
                out.setdefault(t.node_id, []).append(t.target_id)
        return out

    def position_counts(self, replicas: int) -> dict[int, list[int]]:
        counts: dict[int, list[int]] = {}
        node_of = {t.target_id: t.node_id for t in self.info.targets}
        for c in self.info.chains:
            for i, tid in enumerate(c.targets[:replicas]):
                counts.setdefault(node_of[tid], [0] * replicas)[i] += 1
        return counts

    def create_chains(self, replicas: int, num_chains: int, init: bool) -> list[int]:
        """New chains from free targets -> their chain ids (all targets serving)."""
        if init and len(self.info.chains):
            raise ChainfsError(
                Code.EEXIST,
                f"cluster already has {len(self.info.chains)} chains; "
                "use create-chains to add more",
            )
        plan = chain_table.plan_chains(
            self.free_targets_by_node(), replicas, num_chains, self.position_counts(replicas)
        )
        next_chain = max((c.chain_id for c in self.info.chains), default=0) + 1
        ids: list[int] = []
        idx = self._index()
        for members in plan:
            # chain_version 0: finish() sets 1 for a new chain
            c = self.info.chains.add(chain_id=next_chain, chain_version=0, targets=members)
            idx.chains[next_chain] = c
            self._changes.chains.add(next_chain)
            for tid in members:
                t = self.target(tid)
                assert t is not None and t.chain_id == 0
                t.chain_id = next_chain
                t.public_state = mp.SERVING
                self._changes.targets.add(tid)
            ids.append(next_chain)
            next_chain += 1
        if not self.info.replicas:
            self.info.replicas = replicas
        return ids

    def _chains_to_check(self, before: ClusterState | None) -> set[int]:
        """Chains this operation changed or whose targets it changed."""
        out = set(self._changes.chains)
        for tid in self._changes.targets:
            for s in (self, before):
                t = s.target(tid) if s is not None else None
                if t is not None and t.chain_id:
                    out.add(t.chain_id)
        return out

    def step_chains(self) -> None:
        """One state-machine step on every chain (a settled chain that nothing
        touched is a fixed point of the step, so only the others are stepped)."""
        idx = self._index()
        if self._unsettled is None:
            todo = set(idx.chains)
        else:
            todo = self._unsettled | self._chains_to_check(None)
        unsettled: set[int] = set()
        for cid in sorted(todo):
            c = idx.chains.get(cid)
            if c is None:
                continue
            members = [
                Member(tid, PS(idx.targets[tid].public_state), LS(idx.targets[tid].local_state))
                for tid in c.targets
            ]
            new = step_chain(members)
            if new == members:
                continue
            unsettled.add(cid)
            self._changes.chains.add(cid)
            del c.targets[:]
            c.targets.extend(m.target_id for m in new)
            for m in new:
                self._set_public(idx.targets[m.target_id], int(m.public))
        self._unsettled = unsettled

    def finish(self, before: ClusterState) -> bool:
        """Step chains, bump changed chains' versions and the routing version.

        ``before`` is the state this one was copied from. Returns True if
        anything differs from it; :meth:`save` then writes just that.
        """
        self.step_chains()
        targets = self._index().targets
        for cid in self._chains_to_check(before):
            c = self.chain(cid)
            if c is None:
                continue
            self._changes.chains.add(cid)
            prev = before.chain(cid)
            if prev is None:
                c.chain_version = max(c.chain_version, 0) + 1
            elif _chain_signature(targets, c) != _chain_signature(before._index().targets, prev):
                c.chain_version = prev.chain_version + 1
        changed = self._drop_unchanged(before)
        changed |= self.counters != before.counters
        changed |= (self.info.replicas, self.info.cluster_id) != (
            before.info.replicas,
            before.info.cluster_id,
        )
        self.info.version = before.info.version + (1 if changed else 0)
        return changed

    def _drop_unchanged(self, before: ClusterState) -> bool:
        """Forget marked records equal to ``before``'s; True if any is left."""
        for ids, lookup, prev_lookup in (
            (self._changes.nodes, self.node, before.node),
            (self._changes.targets, self.target, before.target),
            (self._changes.chains, self.chain, before.chain),
        ):
            for i in list(ids):
                if lookup(i) == prev_lookup(i):
                    ids.discard(i)
        c = self._changes
        return bool(c.nodes or c.targets or c.chains)

    # -- operator changes --------------------------------------------------
    def offline_target(self, target_id: int) -> None:
        """Offline, and held so: its node's heartbeats do not revive it (a disk
        the operator distrusts stays out until online_target or remove_target)."""
        t = self._target_or_raise(target_id)
        self._changes.targets.add(target_id)
        t.local_state = mp.LOCAL_OFFLINE
        t.held_offline = True
        if not t.chain_id:
            t.public_state = mp.OFFLINE

    def online_target(self, target_id: int) -> None:
        """Release an offline hold; the node's next heartbeat brings the target
        back (waiting, then resync from its predecessor, then serving)."""
        t = self._target_or_raise(target_id)
        if not t.held_offline:
            raise ChainfsError(
                Code.EINVAL, f"target {target_id} was not taken offline by offline-target"
            )
        t.held_offline = False
        self._changes.targets.add(target_id)

    def remove_target(self, target_id: int) -> None:
        t = self._target_or_raise(target_id)
        if t.chain_id:
            c = self.chain(t.chain_id)
            assert c is not None
            self._check_removable(c, t)
            c.targets.remove(target_id)
            self._changes.chains.add(c.chain_id)
        self._changes.targets.add(target_id)
        self.info.targets.remove(t)
        self._idx = None  # records after it moved

    def rotate_lastsrv(self, target_id: int) -> None:
        t = self._target_or_raise(target_id)
        c = self.chain(t.chain_id) if t.chain_id else None
        if c is None:
            raise ChainfsError(Code.EINVAL, f"target {target_id} is in no chain")
        head = self.target(c.targets[0])
        assert head is not None
        if len(c.targets) < 2 or head.public_state != mp.LASTSRV:
            raise ChainfsError(Code.EINVAL, f"chain {c.chain_id} has no lastsrv head to rotate")
        # The next target becomes lastsrv (an operator accepting its copy), the old head
        # goes last; everything else offline.
        order = [*c.targets[1:], c.targets[0]]
        del c.targets[:]
        c.targets.extend(order)
        self._changes.chains.add(c.chain_id)
        for i, tid in enumerate(order):
            x = self.target(tid)
            assert x is not None
            self._set_public(x, mp.LASTSRV if i == 0 else mp.OFFLINE)

    def update_chain(self, chain_id: int, add: Sequence[int], remove: Sequence[int]) -> None:
        c = self.chain(chain_id)
        if c is None:
            raise ChainfsError(Code.UNKNOWN_CHAIN, f"chain {chain_id} does not exist")
        for tid in remove:
            t = self._target_or_raise(tid)
            if t.chain_id != chain_id:
                raise ChainfsError(Code.EINVAL, f"target {tid} is not in chain {chain_id}")
        nodes_in_chain = {
            self._target_or_raise(x).node_id for x in c.targets if x not in set(remove)
        }
        for tid in add:
            t = self._target_or_raise(tid)
            if t.chain_id:
                raise ChainfsError(Code.EBUSY, f"target {tid} is already in chain {t.chain_id}")
            if t.node_id in nodes_in_chain:
                raise ChainfsError(
                    Code.EINVAL, f"chain {chain_id} already has a target on node {t.node_id}"
                )
            nodes_in_chain.add(t.node_id)
        remaining = [x for x in c.targets if x not in set(remove)]
        if not remaining and not add:
            raise ChainfsError(Code.EBUSY, f"chain {chain_id} would have no target left")
        serving_left = [x for x in remaining if self._target_or_raise(x).public_state == mp.SERVING]
        had_serving = any(self._target_or_raise(x).public_state == mp.SERVING for x in c.targets)
        if had_serving and not serving_left:
            raise ChainfsError(
                Code.EBUSY,
                f"removing {list(remove)} would leave chain {chain_id} no serving target",
            )
        for tid in remove:
            t = self._target_or_raise(tid)
            if t.public_state == mp.LASTSRV:
                raise ChainfsError(Code.EBUSY, f"target {tid} holds the chain's last copy")
        for tid in remove:
            t = self._target_or_raise(tid)
            t.chain_id = 0
            t.public_state = mp.OFFLINE if t.local_state == mp.LOCAL_OFFLINE else mp.WAITING
        del c.targets[:]
        c.targets.extend(remaining)
        for tid in add:
            t = self._target_or_raise(tid)
            t.chain_id = chain_id
            t.public_state = mp.OFFLINE  # joins at the end; resync fills it
            c.targets.append(tid)
        self.mark_changed(target_ids=[*add, *remove], chain_ids=[chain_id])

    def _check_removable(self, c: mp.ChainInfo, t: mp.TargetInfo) -> None:
        if t.public_state not in (mp.OFFLINE, mp.WAITING):
            raise ChainfsError(
                Code.EBUSY,
                f"target {t.target_id} is {mp.PublicTargetState.Name(t.public_state).lower()}; "
                "take it offline first",
            )
        if len(c.targets) == 1:
            raise ChainfsError(
                Code.EBUSY, f"target {t.target_id} is the last of chain {c.chain_id}"
            )

    def _target_or_raise(self, target_id: int) -> mp.TargetInfo:
        t = self.target(target_id)
        if t is None:
            raise ChainfsError(Code.UNKNOWN_TARGET, f"target {target_id} does not exist")
        return t
