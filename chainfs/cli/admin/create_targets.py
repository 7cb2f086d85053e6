"""`chainfs admin create-targets`: add storage targets to a running cluster.

    chainfs admin create-targets --node-id 3 --count 2 --path /mnt/disk7
    chainfs admin create-targets --node-id 3 --chain 5 --chain 9   # one target per chain
    chainfs admin create-targets --node-id 3 --count 1 --auto --wait

1. Check everything first (node registered, a storage node, online; chains
   exist, have no target on that node): an error names the thing and changes
   nothing.
2. The storage node creates the target directories (``<path>/target<j>``,
   default beside its first target), records them so they are opened at every
   start, and registers them with mgmtd (StorageControl.CreateTargets).
3. With ``--chain``/``--auto`` each new target joins a chain at its end: it
   waits, is filled by resync from its predecessor (syncing), then serves.
   ``--auto`` picks the chains missing a replica (fewer targets than the
   cluster's replication factor), fewest targets first: a replacement disk.
   Without either the targets stay free; once several nodes have free targets,
   ``chainfs admin create-chains`` builds new chains from them (new capacity).
"""

from __future__ import annotations

import asyncio
import time

import click

from chainfs.cli.admin.cluster import fetch_routing, target_rows, with_mgmt
from chainfs.cli.admin.common import admin, admin_options, async_command, emit, timeout_option
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp

CREATE_TIMEOUT_S = 120.0  # the node creates RocksDB stores and fsyncs: slower than a lookup
_WAIT_POLL_S = 0.5
COLUMNS = ["target_id", "node_id", "chain_id", "state", "local_state", "path"]


def check_node(routing: Routing, node_id: int) -> mp.NodeInfo:
    node = routing.nodes.get(node_id)
    storage = sorted(n.node_id for n in routing.nodes_of_type(mp.STORAGE, online_only=False))
    if node is None:
        raise ChainfsError(
            Code.UNKNOWN_NODE,
            f"node {node_id} is not registered (storage nodes: {storage or 'none'})",
        )
    if node.type != mp.STORAGE:
        raise ChainfsError(
            Code.EINVAL,
            f"node {node_id} is a {mp.NodeType.Name(node.type).lower()} node, not a storage "
            f"node (storage nodes: {storage or 'none'})",
        )
    if node.status != mp.NODE_ONLINE:
        age = ""
        if node.last_heartbeat_ms:
            age = (
                f", last heartbeat {(time.time() * 1000 - node.last_heartbeat_ms) / 1000:.0f}s ago"
            )
        raise ChainfsError(
            Code.EHOSTUNREACH,
            f"storage node {node_id} ({node.rpc_address}) is "
            f"{mp.NodeStatus.Name(node.status).removeprefix('NODE_').lower()}{age}",
        )
    return node


def _nodes_of_chain(routing: Routing, chain: mp.ChainInfo) -> set[int]:
    return {routing.targets[t].node_id for t in chain.targets if t in routing.targets}


def plan_chains(
    routing: Routing, node_id: int, count: int, chains: tuple[int, ...], auto: bool
) -> list[int]:
    """The chain each new target joins (empty: none), checked against ``routing``."""
    if auto:
        replicas = routing.info.replicas
        short = [
            c
            for c in routing.chains.values()
            if len(c.targets) < replicas and node_id not in _nodes_of_chain(routing, c)
        ]
        short.sort(key=lambda c: (len(c.targets), c.chain_id))
        if len(short) < count:
            raise ChainfsError(
                Code.NOT_ENOUGH_NODES,
                f"--auto: {len(short)} chains lack a replica (of {replicas}) and have no target "
                f"on node {node_id} ({[c.chain_id for c in short] or 'none'}); "
                f"{count} new targets asked for. Name chains with --chain, or add free targets "
                "without either and use create-chains",
            )
        return [c.chain_id for c in short[:count]]
    if len(set(chains)) != len(chains):
        raise ChainfsError(Code.EINVAL, f"--chain names a chain twice: {list(chains)}")
    for cid in chains:
        c = routing.chains.get(cid)
        if c is None:
            raise ChainfsError(
                Code.UNKNOWN_CHAIN, f"chain {cid} does not exist (chains: {routing.chain_ids()})"
            )
        if node_id in _nodes_of_chain(routing, c):
            mine = [t for t in c.targets if routing.targets[t].node_id == node_id]
            raise ChainfsError(
                Code.EINVAL,
                f"chain {cid} already has target {mine[0]} on node {node_id}: a chain's "
                "replicas must be on distinct nodes",
            )
    return list(chains)


async def create_on_node(
    node: mp.NodeInfo, count: int, parent_dir: str, timeout_s: float
) -> sp.CreateTargetsRsp:
    try:
        async with StorageControl(node.rpc_address, timeout_s) as control:
            return await control.create_targets(count, parent_dir)
    except ChainfsError as e:
        hint = ""
        if e.code in (Code.ETIMEDOUT, Code.UNAVAILABLE):
            hint = " (it may still finish: check `chainfs admin targets` before retrying)"
        raise ChainfsError(
            e.code, f"storage node {node.node_id} ({node.rpc_address}): {e.message}{hint}"
        ) from None


async def create_targets(
    mgmt: MgmtClient,
    node_id: int,
    count: int,
    parent_dir: str,
    chains: tuple[int, ...] = (),
    auto: bool = False,
    create_timeout_s: float = CREATE_TIMEOUT_S,
) -> list[int]:
    """Create targets on ``node_id`` and add them to chains -> the new target ids."""
    if parent_dir and not parent_dir.startswith("/"):
        raise ChainfsError(Code.EINVAL, f"--path {parent_dir!r} must be an absolute directory")
    routing = await fetch_routing(mgmt)
    node = check_node(routing, node_id)
    joins = plan_chains(routing, node_id, count, chains, auto)
    rsp = await create_on_node(node, count, parent_dir, create_timeout_s)
    ids = [t.target_id for t in rsp.targets]
    assert len(ids) == count, f"node made {len(ids)} targets, not {count}"
    for tid, cid in zip(ids, joins, strict=False):
        try:
            await mgmt.update_chain(cid, add_targets=[tid])
        except ChainfsError as e:
            raise ChainfsError(
                e.code,
                f"created targets {ids} on node {node_id}, but adding target {tid} to chain "
                f"{cid} failed: {e.message}. Targets not in a chain stay free (waiting): add "
                f"one with `chainfs admin update-chain CHAIN --add TARGET`",
            ) from None
    return ids


async def wait_serving(mgmt: MgmtClient, ids: list[int], timeout_s: float) -> Routing:
    """Poll until every target of ``ids`` that is in a chain serves."""
    deadline = time.monotonic() + timeout_s
    while True:
        routing = await fetch_routing(mgmt)
        pending = [
            t
            for t in ids
            if t in routing.targets
            and routing.targets[t].chain_id
            and routing.targets[t].public_state != mp.SERVING
        ]
        if not pending:
            return routing
        if time.monotonic() > deadline:
            states = {
                t: mp.PublicTargetState.Name(routing.targets[t].public_state) for t in pending
            }
            raise ChainfsError(
                Code.ETIMEDOUT,
                f"targets not serving after {timeout_s:.0f}s: {states} "
                "(see `chainfs admin sync-status --watch`)",
            )
        await asyncio.sleep(_WAIT_POLL_S)


@admin.command("create-targets")
@click.option("--node-id", type=int, required=True, help="Storage node to add targets to.")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Targets to create (default: one per --chain, else 1).",
)
@click.option(
    "--path",
    "parent_dir",
    default="",
    help="Absolute directory on the node to create target<j> directories in "
    "(default: beside the node's first target).",
)
@click.option("--chain", "chains", type=int, multiple=True, help="Chain the i-th new target joins.")
@click.option(
    "--auto", is_flag=True, help="Join the chains missing a replica (fewest targets first)."
)
@click.option("--wait", is_flag=True, help="Return once the new chain members serve.")
@click.option(
    "--wait-timeout",
    "wait_timeout_s",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds --wait waits for resync.",
)
@admin_options
@timeout_option
@async_command
async def create_targets_cmd(
    address: str,
    as_json: bool,
    timeout_s: float,
    node_id: int,
    count: int | None,
    parent_dir: str,
    chains: tuple[int, ...],
    auto: bool,
    wait: bool,
    wait_timeout_s: float,
) -> None:
    """Create new storage targets on storage node --node-id (new disks, more capacity).

    With --chain/--auto they join chains and are filled by resync; without,
    they stay free for `create-chains`. Nothing changes if a check fails.
    """
    if chains and auto:
        raise click.UsageError("give --chain or --auto, not both")
    if count is None:
        count = len(chains) or 1
    if chains and len(chains) != count:
        raise click.UsageError(f"--count {count} but {len(chains)} --chain given (one per target)")

    async def go(c: MgmtClient) -> tuple[list[int], Routing]:
        ids = await create_targets(c, node_id, count, parent_dir, chains, auto)
        if wait:
            return ids, await wait_serving(c, ids, wait_timeout_s)
        return ids, await fetch_routing(c)

    ids, routing = await with_mgmt(address, timeout_s, go)
    rows = [r for r in target_rows(routing) if r["target_id"] in set(ids)]
    emit(rows, COLUMNS, as_json, title=f"new targets on node {node_id}")


__all__ = ["check_node", "create_targets", "plan_chains", "wait_serving"]
