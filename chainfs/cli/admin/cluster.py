"""`chainfs admin status|nodes|targets|chains|init-cluster|create-chains|config`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from chainfs.cli.admin.common import (
    admin,
    emit,
    emit_object,
    mgmt_command,
)
from chainfs.common.cluster_config import SETTINGS, parse_setting
from chainfs.common.errors import ChainfsError
from chainfs.common.routing import Routing
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import mgmt_pb2 as mp

T = TypeVar("T")


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
@mgmt_command
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
@mgmt_command
async def nodes_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """Registered nodes and their heartbeat status."""
    columns = ["node_id", "type", "status", "rpc_address", "data_address", "targets"]
    columns.append("heartbeat_age_s")
    await _show_routing_rows(address, timeout_s, as_json, "nodes", node_rows, columns)


async def _show_routing_rows(
    address: str,
    timeout_s: float,
    as_json: bool,
    what: str,
    rows_of: Callable[[Routing], list[dict[str, Any]]],
    columns: list[str],
) -> None:
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    emit(rows_of(routing), columns, as_json, title=f"{what} (routing version {routing.version})")


@admin.command("targets")
@mgmt_command
async def targets_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """Storage targets: chain, public state, local state, usage, resync progress."""
    columns = ["target_id", "node_id", "chain_id", "state", "local_state", "used_bytes"]
    columns += ["sync_bytes_left", "path"]
    await _show_routing_rows(address, timeout_s, as_json, "targets", target_rows, columns)


@admin.command("chains")
@mgmt_command
async def chains_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """The chain table: targets head first, with their states."""
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    _emit_chains(chain_rows(routing), as_json, f"chains (routing version {routing.version})")


def _emit_chains(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        emit(rows, [], True)
        return
    columns = ["chain_id", "chain_version", "writable", "targets"]
    emit(_chain_table(rows), columns, False, title=title)


async def _create(
    address: str, timeout_s: float, replicas: int, num_chains: int, init: bool, as_json: bool
) -> None:
    rsp = await with_mgmt(
        address, timeout_s, lambda c: c.create_chains(replicas, num_chains, init=init)
    )
    rows = chain_rows(Routing(rsp.routing), list(rsp.chains))
    _emit_chains(rows, as_json, f"created {len(rows)} chains of {replicas} replicas")


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


def _chains_command(name: str, init: bool, doc: str) -> None:
    async def command(
        address: str, as_json: bool, timeout_s: float, replicas: int, num_chains: int
    ) -> None:
        await _create(address, timeout_s, replicas, num_chains, init, as_json)

    command.__doc__ = doc
    admin.command(name)(_replicas(_num_chains(mgmt_command(command))))


_chains_command(
    "init-cluster", True, "Create the chain table from the registered storage targets (once)."
)
_chains_command("create-chains", False, "Add chains built from targets that are in no chain yet.")


@admin.group("config")
def config_group() -> None:
    """Cluster-wide settings kept by mgmtd."""


@config_group.command("get")
@click.argument("key", required=False, default="")
@mgmt_command
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
@mgmt_command
async def config_set_cmd(
    key: str, value: str, address: str, as_json: bool, timeout_s: float
) -> None:
    """Set KEY to VALUE (only the keys `config keys` lists; type and range checked)."""
    try:
        parse_setting(key, value)  # mgmtd checks too; this names the error before any call
    except ChainfsError as e:
        raise click.ClickException(e.message) from None
    version = await with_mgmt(address, timeout_s, lambda c: c.set_config(key, value))
    setting = SETTINGS[key]
    obj = {"key": key, "value": value, "version": version}
    emit_object({**obj, "read_by": setting.consumer, "applies": setting.applies}, as_json)


@config_group.command("keys")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_keys_cmd(as_json: bool) -> None:
    """The settable keys: type, which processes read each and when a change applies."""
    rows = [
        {
            "key": s.key,
            "type": s.type.__name__,
            "allowed": s.requirement,
            "read_by": s.consumer,
            "applies": s.applies,
            "meaning": s.help,
        }
        for s in SETTINGS.values()
    ]
    emit(rows, ["key", "type", "allowed", "read_by", "applies", "meaning"], as_json)
