"""Indexed, read-only view of mgmtd's RoutingInfo."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from functools import cached_property

from chainfs.common.errors import ChainfsError, Code
from chainfs.proto import mgmt_pb2 as mp

_HOSTNAME = socket.gethostname()

SERVING = mp.SERVING
SYNCING = mp.SYNCING


def distinct_capacity(targets: Iterable[mp.TargetInfo]) -> int:
    """Capacity of the file systems under ``targets``, each disk counted once
    (targets reporting the same ``fs_id`` share one; none reported = its own)."""
    by_fs: dict[str, int] = {}
    for t in targets:
        by_fs[t.fs_id or f"target:{t.target_id}"] = t.capacity_bytes
    return sum(by_fs.values())


class Routing:
    """Wraps a ``RoutingInfo`` message with lookups by id."""

    def __init__(self, info: mp.RoutingInfo) -> None:
        self.info = info

    @property
    def version(self) -> int:
        return self.info.version

    @cached_property
    def nodes(self) -> dict[int, mp.NodeInfo]:
        return {n.node_id: n for n in self.info.nodes}

    @cached_property
    def targets(self) -> dict[int, mp.TargetInfo]:
        return {t.target_id: t for t in self.info.targets}

    @cached_property
    def chains(self) -> dict[int, mp.ChainInfo]:
        return {c.chain_id: c for c in self.info.chains}

    def chain_ids(self) -> list[int]:
        return sorted(self.chains)

    def nodes_of_type(self, node_type: int, online_only: bool = True) -> list[mp.NodeInfo]:
        return [
            n
            for n in self.info.nodes
            if n.type == node_type and (not online_only or n.status == mp.NODE_ONLINE)
        ]

    def chain_targets(self, chain_id: int, states: tuple[int, ...] = ()) -> list[mp.TargetInfo]:
        """Targets of a chain in chain order, optionally only those in ``states``."""
        chain = self.chains[chain_id]
        out = [self.targets[t] for t in chain.targets]
        if states:
            out = [t for t in out if t.public_state in states]
        return out

    def head(self, chain_id: int) -> mp.TargetInfo | None:
        """The first serving target: where writes enter the chain."""
        serving = self.chain_targets(chain_id, (SERVING,))
        return serving[0] if serving else None

    def node_of_target(self, target_id: int) -> mp.NodeInfo:
        return self.nodes[self.targets[target_id].node_id]


def data_address(node: mp.NodeInfo, prefer_unix_socket: bool = True) -> str:
    """Where to reach a node's data plane: its unix socket when it runs on
    this host (and has one), else its TCP address."""
    if prefer_unix_socket and node.unix_socket and node.hostname == _HOSTNAME:
        return "unix:" + node.unix_socket
    if not node.data_address:
        raise ChainfsError(Code.UNAVAILABLE, f"node {node.node_id} has no data address")
    return node.data_address
