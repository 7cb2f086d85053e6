"""Operator commands on targets and chains: take a target out, bring it back, reshape a chain.

    chainfs admin offline-target TARGET      mark a target offline (moves to its chain's end)
    chainfs admin online-target TARGET       undo that: it resyncs, then serves (waits)
    chainfs admin remove-target TARGET       drop it from its chain and the registry
    chainfs admin rotate-lastsrv TARGET      let another target of a lastsrv chain take over
    chainfs admin update-chain CHAIN --add T --remove T
    chainfs admin sync-status [--watch]      resync progress of syncing targets

mgmtd does the work (UpdateTarget / UpdateChain); these print the result.
A target added to a chain joins at its end and is filled by resync.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from chainfs.cli.admin.cluster import (
    chain_rows,
    fetch_routing,
    public_state_name,
    target_rows,
    with_mgmt,
)
from chainfs.cli.admin.common import (
    DEFAULT_TIMEOUT_S,
    admin,
    admin_options,
    async_command,
    emit,
    human_bytes,
    mgmt_command,
)
from chainfs.cli.options import seconds_option
from chainfs.common.routing import Routing
from chainfs.proto import mgmt_pb2 as mp

_WATCH_INTERVAL_S = 0.5
# A resync runs as long as the bytes take: generous, and --timeout changes it.
DEFAULT_ONLINE_TIMEOUT_S = 600.0
# A released target starts resyncing at its node's next heartbeat (well under this).
DEFAULT_SYNC_START_TIMEOUT_S = 60.0


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


def about_to_resync(routing: Routing) -> list[int]:
    """Offline targets released from a hold whose node is up: its next heartbeat
    makes them waiting, then syncing (nothing shows in sync_rows until then)."""
    nodes = routing.nodes
    return [
        t.target_id
        for t in sorted(routing.info.targets, key=lambda t: t.target_id)
        if t.public_state in (mp.OFFLINE, mp.LASTSRV)
        and not t.held_offline
        and t.node_id in nodes
        and nodes[t.node_id].status == mp.NODE_ONLINE
    ]


async def poll_routing(address: str, call_timeout_s: float) -> Routing:
    """Routing info, retried while mgmtd is briefly unreachable (a failover)."""
    deadline = time.monotonic() + call_timeout_s
    while True:
        try:
            return await with_mgmt(address, call_timeout_s, fetch_routing)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(_WATCH_INTERVAL_S)


class SyncBars:
    """One progress bar per target in resync: bytes copied of bytes left at first sight."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[int, TaskID] = {}
        self.totals: dict[int, int] = {}

    def show(self, target_id: int, state: str, left: int, rate_bytes_per_s: int) -> None:
        total = self.totals[target_id] = max(self.totals.get(target_id, 0), left, 1)
        rate = f"{human_bytes(rate_bytes_per_s)}/s"
        if target_id not in self.tasks:
            self.tasks[target_id] = self.progress.add_task(
                "", total=total, target=target_id, state=state, rate=rate
            )
        self.progress.update(
            self.tasks[target_id], total=total, completed=total - left, state=state, rate=rate
        )

    def show_rows(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            left = int(r["sync_bytes_left"] or 0)
            self.show(r["target_id"], r["state"], left, int(r["sync_rate_bytes_per_s"] or 0))

    def done(self, target_id: int) -> None:
        if target_id in self.tasks:
            total = self.totals[target_id]
            self.progress.update(self.tasks[target_id], completed=total, state="serving")


def sync_progress(quiet: bool = False) -> Progress:
    """Bars on stderr (stdout stays for the result); ``quiet`` draws nothing (--json)."""
    return Progress(
        TextColumn("target {task.fields[target]} ({task.fields[state]})"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} B"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=quiet,
    )


_SYNC_COLUMNS = [
    "target_id",
    "node_id",
    "chain_id",
    "state",
    "sync_bytes_left",
    "sync_rate_bytes_per_s",
]


@admin.command("sync-status")
@click.option("--watch", is_flag=True, help="Progress bars until no target is syncing.")
@seconds_option(
    "--start-timeout",
    "start_timeout_s",
    DEFAULT_SYNC_START_TIMEOUT_S,
    "With --watch: seconds to wait for a released target to start resyncing.",
)
@mgmt_command
async def sync_status_cmd(
    address: str, as_json: bool, timeout_s: float, watch: bool, start_timeout_s: float
) -> None:
    """Targets waiting for or doing a resync: bytes left and rate."""
    routing = await with_mgmt(address, timeout_s, fetch_routing)
    if not watch or as_json:
        emit(sync_rows(routing), _SYNC_COLUMNS, as_json, title="resync status")
        return
    routing = await _wait_resync_start(address, timeout_s, start_timeout_s, routing)
    if not sync_rows(routing):
        click.echo("no target is waiting for or doing a resync")
        return
    with sync_progress() as progress:
        bars = SyncBars(progress)
        while rows := sync_rows(routing):
            bars.show_rows(rows)
            await asyncio.sleep(_WATCH_INTERVAL_S)
            routing = await poll_routing(address, timeout_s)
            active = {r["target_id"] for r in sync_rows(routing)}
            for tid in set(bars.tasks) - active:
                bars.done(tid)
    click.echo("resync done: no target is waiting or syncing")


async def _wait_resync_start(
    address: str, call_timeout_s: float, start_timeout_s: float, routing: Routing
) -> Routing:
    """While nothing syncs yet but released targets are about to: say so and wait (bounded)."""
    deadline = time.monotonic() + start_timeout_s
    said: list[int] = []
    while not sync_rows(routing) and (pending := about_to_resync(routing)):
        if pending != said:
            ids = ", ".join(map(str, pending))
            click.echo(f"waiting for target(s) {ids} to start resyncing (offline, node up)")
            said = pending
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"target(s) {', '.join(map(str, pending))} did not start resyncing "
                f"within {start_timeout_s:g}s (see `chainfs admin targets`)"
            )
        await asyncio.sleep(_WATCH_INTERVAL_S)
        routing = await poll_routing(address, call_timeout_s)
    return routing


@admin.command("online-target")
@click.argument("target_id", type=int)
@click.option("--no-wait", is_flag=True, help="Return once released, while it resyncs.")
@seconds_option(
    "--timeout",
    "timeout_s",
    DEFAULT_ONLINE_TIMEOUT_S,
    f"Seconds to wait until the target serves (each mgmtd call: at most {DEFAULT_TIMEOUT_S:g}s).",
)
@admin_options
@async_command
async def online_target_cmd(
    target_id: int, no_wait: bool, timeout_s: float, address: str, as_json: bool
) -> None:
    """Undo offline-target: TARGET_ID resyncs from its chain; wait until it serves."""
    call_timeout_s = min(timeout_s, DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S
    routing = await _update_target(address, call_timeout_s, target_id, mp.UpdateTargetReq.ONLINE)
    if not no_wait:
        routing = await _wait_serving(address, call_timeout_s, timeout_s, target_id, as_json)
    _show_target(routing, target_id, as_json)
    if no_wait and not as_json:
        click.echo("resyncing; watch with `chainfs admin sync-status --watch`")


async def _wait_serving(
    address: str, call_timeout_s: float, timeout_s: float, target_id: int, quiet: bool
) -> Routing:
    """Poll until ``target_id`` serves, with a progress bar of its resync (bounded)."""
    deadline = time.monotonic() + timeout_s
    with sync_progress(quiet) as progress:
        bars = SyncBars(progress)
        while True:
            routing = await poll_routing(address, call_timeout_s)
            t = routing.targets.get(target_id)
            if t is None:
                raise click.ClickException(f"target {target_id} was removed while resyncing")
            if t.public_state == mp.SERVING:
                bars.done(target_id)
                return routing
            state = public_state_name(t.public_state)
            bars.show(target_id, state, t.sync_bytes_left, t.sync_rate_bytes_per_s)
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"target {target_id} is {state} after {timeout_s:g}s "
                    f"({human_bytes(t.sync_bytes_left)} left to resync); "
                    "watch with `chainfs admin sync-status --watch`"
                )
            await asyncio.sleep(_WATCH_INTERVAL_S)
