"""Operator commands on targets and chains: take a target out, bring it back, reshape a chain.

    chainfs admin offline-target TARGET      mark a target offline (moves to its chain's end)
    chainfs admin online-target TARGET       undo that: it resyncs, then serves
    chainfs admin remove-target TARGET       drop it from its chain and the registry
    chainfs admin rotate-lastsrv TARGET      let another target of a lastsrv chain take over
    chainfs admin update-chain CHAIN --add T --remove T
    chainfs admin sync-status [--watch]      resync progress of syncing targets

mgmtd does the work (UpdateTarget / UpdateChain); these print the result.
A target added to a chain joins at its end and is filled by resync.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from chainfs.cli.admin.cluster import (
    chain_rows,
    fetch_routing,
    target_rows,
    with_mgmt,
)
from chainfs.cli.admin.common import admin, emit, mgmt_command
from chainfs.common.routing import Routing
from chainfs.proto import mgmt_pb2 as mp

_WATCH_INTERVAL_S = 0.5
_SYNC_STATES = (mp.SYNCING, mp.WAITING)


async def _update_target(address: str, timeout_s: float, target_id: int, action: int) -> Routing:
    async def go(c: Any) -> Routing:
        await c.update_target(target_id, action)
        return await fetch_routing(c)

    return await with_mgmt(address, timeout_s, go)


def _show_target(routing: Routing, target_id: int, as_json: bool) -> None:
    rows = [r for r in target_rows(routing) if r["target_id"] == target_id]
    emit(
        rows or [{"target_id": target_id, "state": "removed"}],
        ["target_id", "node_id", "chain_id", "state", "local_state"],
        as_json,
        title=f"target {target_id} (routing version {routing.version})",
    )


# One command per target action: (name, action, help text).
_TARGET_ACTIONS = (
    (
        "offline-target",
        mp.UpdateTargetReq.OFFLINE,
        """Mark TARGET_ID offline: it stops serving and moves to the end of its chain.

        It stays offline (its node's heartbeats do not revive it) until
        `online-target` or `remove-target`.""",
    ),
    (
        "online-target",
        mp.UpdateTargetReq.ONLINE,
        "Undo offline-target: TARGET_ID resyncs from its chain, then serves.",
    ),
    (
        "remove-target",
        mp.UpdateTargetReq.REMOVE,
        "Remove TARGET_ID from its chain and from the registry.",
    ),
    (
        "rotate-lastsrv",
        mp.UpdateTargetReq.ROTATE_LASTSRV,
        """Give up on a chain's lastsrv target TARGET_ID (e.g. its disk is lost): another
        target of the chain serves instead. Writes acknowledged only by it are lost.""",
    ),
)


def _target_command(name: str, action: int, doc: str) -> None:
    async def command(address: str, as_json: bool, timeout_s: float, target_id: int) -> None:
        routing = await _update_target(address, timeout_s, target_id, action)
        _show_target(routing, target_id, as_json)

    command.__doc__ = doc
    command.__name__ = name.replace("-", "_") + "_cmd"
    admin.command(name)(click.argument("target_id", type=int)(mgmt_command(command)))


for _name, _action, _doc in _TARGET_ACTIONS:
    _target_command(_name, _action, _doc)


@admin.command("update-chain")
@click.argument("chain_id", type=int)
@click.option("--add", "add", type=int, multiple=True, help="Target to add (joins at the end).")
@click.option("--remove", "remove", type=int, multiple=True, help="Target to remove.")
@mgmt_command
async def update_chain_cmd(
    address: str,
    as_json: bool,
    timeout_s: float,
    chain_id: int,
    add: tuple[int, ...],
    remove: tuple[int, ...],
) -> None:
    """Add targets to (they resync, then serve) or remove targets from CHAIN_ID."""
    if not add and not remove:
        raise click.UsageError("give --add and/or --remove")

    async def go(c: Any) -> tuple[Routing, mp.ChainInfo]:
        rsp = await c.update_chain(chain_id, add, remove)
        return await fetch_routing(c), rsp.chain

    routing, chain = await with_mgmt(address, timeout_s, go)
    emit(
        chain_rows(routing, [chain]),
        ["chain_id", "chain_version", "targets", "states"],
        as_json,
        title=f"chain {chain_id}",
    )


def sync_rows(routing: Routing) -> list[dict[str, Any]]:
    return [r for r in target_rows(routing) if r["state"] in ("syncing", "waiting")]


@admin.command("sync-status")
@click.option("--watch", is_flag=True, help="Progress bars until no target is syncing.")
@mgmt_command
async def sync_status_cmd(address: str, as_json: bool, timeout_s: float, watch: bool) -> None:
    """Targets waiting for or doing a resync: bytes left and rate."""
    columns = [
        "target_id",
        "node_id",
        "chain_id",
        "state",
        "sync_bytes_left",
        "sync_rate_bytes_per_s",
    ]
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    if not watch or as_json:
        emit(sync_rows(routing), columns, as_json, title="resync status")
        return
    bars: dict[int, Any] = {}
    totals: dict[int, int] = {}
    with Progress(
        TextColumn("target {task.fields[target]} ({task.fields[state]})"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} B"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ) as progress:
        while True:
            rows = sync_rows(routing)
            for r in rows:
                tid = r["target_id"]
                left = int(r["sync_bytes_left"] or 0)
                totals[tid] = max(totals.get(tid, 0), left, 1)
                rate = f"{int(r['sync_rate_bytes_per_s'] or 0) / 1e6:.1f} MB/s"
                if tid not in bars:
                    bars[tid] = progress.add_task(
                        "", total=totals[tid], target=tid, state=r["state"], rate=rate
                    )
                progress.update(
                    bars[tid],
                    total=totals[tid],
                    completed=totals[tid] - left,
                    state=r["state"],
                    rate=rate,
                )
            active = {r["target_id"] for r in rows}
            for tid, task in bars.items():
                if tid not in active:
                    progress.update(task, completed=totals[tid], state="serving")
            if not rows:
                return
            await asyncio.sleep(_WATCH_INTERVAL_S)
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    routing = await with_mgmt(address, timeout_s, fetch_routing)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(_WATCH_INTERVAL_S)
