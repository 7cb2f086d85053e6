"""`chainfs admin status|nodes|targets|chains|init-cluster|create-chains|config`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from chainfs.cli.admin.common import admin, admin_options, async_command, emit, emit_object
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import mgmt_pb2 as mp

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5.0  # admin calls give up (exit 1) after this

_NODE_TYPES: dict[int, str] = {
    mp.MGMTD: "mgmtd",
    mp.META: "meta",
    mp.STORAGE: "storage",
    mp.CLIENT: "client",
}
_NODE_STATUS: dict[int, str] = {
    mp.NODE_ONLINE: "online",
    mp.NODE_OFFLINE: "offline",
    mp.NODE_DISABLED: "disabled",
}
PUBLIC_STATE_NAMES: dict[int, str] = {
    mp.SERVING: "serving",
    mp.SYNCING: "syncing",
    mp.WAITING: "waiting",
    mp.LASTSRV: "lastsrv",
    mp.OFFLINE: "offline",
}
LOCAL_STATE_NAMES: dict[int, str] = {
    mp.UPTODATE: "uptodate",
    mp.ONLINE: "online",
    mp.LOCAL_OFFLINE: "offline",
}


def public_state_name(state: int) -> str:
    return PUBLIC_STATE_NAMES.get(state, "unknown")


def local_state_name(state: int) -> str:
    return LOCAL_STATE_NAMES.get(state, "unknown")


def timeout_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--timeout",
        "timeout_s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        show_default=True,
        help="Seconds to wait for mgmtd before failing.",
    )(fn)


async def with_mgmt(address: str, timeout_s: float, fn: Callable[[MgmtClient], Awaitable[T]]) -> T:
    client = MgmtClient(address, timeout_s=timeout_s)
    try:
        return await fn(client)
    finally:
        await client.close()


async def fetch_routing(client: MgmtClient) -> Routing:
    routing = await client.get_routing(0)
    assert routing is not None, "known_version 0 always returns routing info"
    return routing


def node_rows(routing: Routing) -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    targets_per_node: dict[int, int] = {}
    for t in routing.info.targets:
        targets_per_node[t.node_id] = targets_per_node.get(t.node_id, 0) + 1
    return [
        {
            "node_id": n.node_id,
            "type": _NODE_TYPES.get(n.type, "unknown"),
            "status": _NODE_STATUS.get(n.status, "unknown"),
            "rpc_address": n.rpc_address,
            "data_address": n.data_address,
            "hostname": n.hostname,
            "pid": n.pid,
            "targets": targets_per_node.get(n.node_id, 0),
            "heartbeat_age_s": round((now_ms - n.last_heartbeat_ms) / 1000.0, 1)
            if n.last_heartbeat_ms
            else None,
        }
        for n in sorted(routing.info.nodes, key=lambda n: n.node_id)
    ]


def target_rows(routing: Routing) -> list[dict[str, Any]]:
    return [
        {
            "target_id": t.target_id,
            "node_id": t.node_id,
            "chain_id": t.chain_id,
            "state": public_state_name(t.public_state),
            "local_state": local_state_name(t.local_state),
            "held_offline": t.held_offline,
            "path": t.path,
            "used_bytes": t.used_bytes,
            "capacity_bytes": t.capacity_bytes,
            "sync_bytes_left": t.sync_bytes_left,
            "sync_rate_bytes_per_s": t.sync_rate_bytes_per_s,
        }
        for t in sorted(routing.info.targets, key=lambda t: t.target_id)
    ]


def chain_rows(routing: Routing, chains: list[mp.ChainInfo] | None = None) -> list[dict[str, Any]]:
    out = []
    for c in sorted(
        chains if chains is not None else routing.info.chains, key=lambda c: c.chain_id
    ):
        states = [
            public_state_name(routing.targets[t].public_state)
            if t in routing.targets
            else "unknown"
            for t in c.targets
        ]
        nodes = [routing.targets[t].node_id if t in routing.targets else 0 for t in c.targets]
        out.append(
            {
                "chain_id": c.chain_id,
                "chain_version": c.chain_version,
                "targets": list(c.targets),
                "states": states,
                "nodes": nodes,
                "head": c.targets[0] if c.targets else None,
                "writable": "serving" in states,
            }
        )
    return out


def _chain_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **r,
            "targets": " ".join(
                f"{t}({s})@n{n}"
                for t, s, n in zip(r["targets"], r["states"], r["nodes"], strict=True)
            ),
            "writable": "yes" if r["writable"] else "NO",
        }
        for r in rows
    ]


@admin.command("status")
@admin_options
@timeout_option
@async_command
async def status_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """Cluster summary: primary mgmtd, routing version, nodes, targets, chains."""
    st = await with_mgmt(address, timeout_s, lambda c: c.get_status())
    obj: dict[str, Any] = {
        "cluster_id": st.cluster_id,
        "mgmtd": address,
        "mgmtd_id": st.self_id,
        "primary": st.primary,
        "primary_address": st.primary_address,
        "routing_version": st.routing_version,
        "nodes_online": st.nodes_online,
        "nodes_total": st.nodes_total,
        "targets_serving": st.targets_serving,
        "targets_total": st.targets_total,
        "chains_writable": st.chains_writable,
        "chains_total": st.chains_total,
        "used_bytes": st.used_bytes,
        "capacity_bytes": st.capacity_bytes,
        "kv_url": st.kv_url,
        "mgmtds": [
            {"node_id": m.node_id, "rpc_address": m.rpc_address, "primary": m.primary}
            for m in st.mgmtds
        ],
    }
    if as_json:
        emit_object(obj, True)
        return
    obj["mgmtds"] = ", ".join(
        f"{m['rpc_address']}{' (primary)' if m['primary'] else ''}" for m in obj["mgmtds"]
    )
    emit_object(obj, False, title="chainfs cluster")


@admin.command("nodes")
@admin_options
@timeout_option
@async_command
async def nodes_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """Registered nodes and their heartbeat status."""
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    rows = node_rows(routing)
    emit(
        rows,
        ["node_id", "type", "status", "rpc_address", "data_address", "targets", "heartbeat_age_s"],
        as_json,
        title=f"nodes (routing version {routing.version})",
    )


@admin.command("targets")
@admin_options
@timeout_option
@async_command
async def targets_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """Storage targets: chain, public state, local state, usage, resync progress."""
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    rows = target_rows(routing)
    emit(
        rows,
        [
            "target_id",
            "node_id",
            "chain_id",
            "state",
            "local_state",
            "used_bytes",
            "sync_bytes_left",
            "path",
        ],
        as_json,
        title=f"targets (routing version {routing.version})",
    )


@admin.command("chains")
@admin_options
@timeout_option
@async_command
async def chains_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """The chain table: targets head first, with their states."""
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    rows = chain_rows(routing)
    if as_json:
        emit(rows, [], True)
        return
    emit(
        _chain_table(rows),
        ["chain_id", "chain_version", "writable", "targets"],
        False,
        title=f"chains (routing version {routing.version})",
    )


async def _create(
    address: str, timeout_s: float, replicas: int, num_chains: int, init: bool, as_json: bool
) -> None:
    rsp = await with_mgmt(
        address, timeout_s, lambda c: c.create_chains(replicas, num_chains, init=init)
    )
    routing = Routing(rsp.routing)
    rows = chain_rows(routing, list(rsp.chains))
    if as_json:
        emit(rows, [], True)
        return
    emit(
        _chain_table(rows),
        ["chain_id", "chain_version", "writable", "targets"],
        False,
        title=f"created {len(rows)} chains of {replicas} replicas",
    )


_replicas = click.option(
    "--replicas", "-r", type=click.IntRange(min=1), required=True, help="Targets per chain."
)
_num_chains = click.option(
    "--num-chains",
    "-n",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Chains to create; 0 = as many as the free targets allow.",
)


@admin.command("init-cluster")
@admin_options
@timeout_option
@_replicas
@_num_chains
@async_command
async def init_cluster_cmd(
    address: str, as_json: bool, timeout_s: float, replicas: int, num_chains: int
) -> None:
    """Create the chain table from the registered storage targets (once)."""
    await _create(address, timeout_s, replicas, num_chains, True, as_json)


@admin.command("create-chains")
@admin_options
@timeout_option
@_replicas
@_num_chains
@async_command
async def create_chains_cmd(
    address: str, as_json: bool, timeout_s: float, replicas: int, num_chains: int
) -> None:
    """Add chains built from targets that are in no chain yet."""
    await _create(address, timeout_s, replicas, num_chains, False, as_json)


@admin.group("config")
def config_group() -> None:
    """Cluster-wide settings kept by mgmtd."""


@config_group.command("get")
@click.argument("key", required=False, default="")
@admin_options
@timeout_option
@async_command
async def config_get_cmd(key: str, address: str, as_json: bool, timeout_s: float) -> None:
    """Show KEY (or every key)."""
    rsp = await with_mgmt(address, timeout_s, lambda c: c.get_config(key))
    if key and key not in rsp.values:
        raise click.ClickException(f"config key {key!r} is not set")
    rows = [{"key": k, "value": v} for k, v in sorted(rsp.values.items())]
    emit(rows, ["key", "value"], as_json)


@config_group.command("set")
@click.argument("key")
@click.argument("value")
@admin_options
@timeout_option
@async_command
async def config_set_cmd(
    key: str, value: str, address: str, as_json: bool, timeout_s: float
) -> None:
    """Set KEY to VALUE."""
    version = await with_mgmt(address, timeout_s, lambda c: c.set_config(key, value))
    emit_object({"key": key, "value": value, "version": version}, as_json)
