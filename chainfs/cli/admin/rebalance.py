"""Moving chain replicas between storage nodes while the cluster serves.

    chainfs admin add-node NODE_ID [--dry-run]     move replicas onto NODE_ID's free targets
    chainfs admin drain-node NODE_ID [--dry-run]   move every replica off NODE_ID
    chainfs admin rebalance [--dry-run]            even out replicas across the nodes
    chainfs admin rebalance-status                 progress of the current (or last) run

mgmtd plans and runs the moves (one replica each: the new target joins the
chain, resync fills it, then the old target leaves). ``--dry-run`` prints the
plan; otherwise the command follows the run with a progress line until it
ends (``--no-wait`` returns at once). ``--rate`` caps the resync bytes/s each
storage node sends while the run lasts (0 = unlimited; by default the nodes'
own ``resync_rate_bytes_per_s``).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import click

from chainfs.cli.admin.cluster import with_mgmt
from chainfs.cli.admin.common import admin, emit, emit_object, human_bytes, mgmt_command
from chainfs.cli.admin.layout import parse_size
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import mgmt_pb2 as mp

_POLL_S = 0.5
MOVE_COLUMNS = [
    "chain_id",
    "from_target",
    "from_node",
    "to_target",
    "to_node",
    "state",
    "moved_bytes",
]


def move_rows(moves: Any) -> list[dict[str, Any]]:
    return [
        {
            "chain_id": m.chain_id,
            "from_target": m.from_target,
            "from_node": m.from_node,
            "to_target": m.to_target,
            "to_node": m.to_node,
            "state": mp.MoveState.Name(m.state).removeprefix("MOVE_").lower(),
            "moved_bytes": m.bytes,
            **({"error": m.error} if m.error else {}),
        }
        for m in moves
    ]


def status_object(s: mp.RebalanceStatus) -> dict[str, Any]:
    return {
        "running": s.running,
        "mode": mp.RebalanceMode.Name(s.mode).lower() if s.mode else "",
        "node_id": s.node_id,
        "moves_total": s.moves_total,
        "moves_done": s.moves_done,
        "moves_failed": s.moves_failed,
        "bytes_moved": s.bytes_moved,
        "elapsed_s": round(s.elapsed_s, 3),
        "rate_bytes_per_s": int(s.bytes_moved / s.elapsed_s) if s.elapsed_s > 0 else 0,
        "moves": move_rows(s.moves),
    }


def progress_line(s: mp.RebalanceStatus) -> str:
    o = status_object(s)
    return (
        f"moves {o['moves_done']}/{o['moves_total']} done, {o['moves_failed']} failed, "
        f"{human_bytes(o['bytes_moved'])} moved in {o['elapsed_s']:.1f}s "
        f"({human_bytes(o['rate_bytes_per_s'])}/s)"
    )


async def follow(client: MgmtClient, as_json: bool) -> mp.RebalanceStatus:
    """Poll the run until it ends; a progress line on stderr (a terminal: one line)."""
    tty = sys.stderr.isatty()
    while True:
        s = await client.rebalance_status()
        if not as_json:
            end = "\r" if tty and s.running else "\n"
            sys.stderr.write(progress_line(s) + end)
            sys.stderr.flush()
        if not s.running:
            return s
        await asyncio.sleep(_POLL_S)


def _show(s: mp.RebalanceStatus, as_json: bool, title: str) -> None:
    if as_json:
        emit_object(status_object(s), True)
        return
    emit(move_rows(s.moves), MOVE_COLUMNS, False, title=f"{title}: {progress_line(s)}")


async def run_rebalance(
    address: str,
    timeout_s: float,
    req: mp.RebalanceReq,
    as_json: bool,
    wait: bool,
) -> None:
    async def go(c: MgmtClient) -> None:
        rsp = await c.rebalance(req)
        if req.dry_run:
            plan_title = f"plan: {len(rsp.plan)} moves"
            emit(move_rows(rsp.plan), MOVE_COLUMNS[:5], as_json, title=plan_title)
            return
        s = await follow(c, as_json) if wait else rsp.status
        _show(s, as_json, "rebalance" if wait else "rebalance started")
        if s.moves_failed:
            raise click.ClickException(f"{s.moves_failed} of {s.moves_total} moves failed")

    await with_mgmt(address, timeout_s, go)


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--dry-run", is_flag=True, help="Print the plan; move nothing.")(fn)
    fn = click.option(
        "--rate",
        default=None,
        help="Resync bytes/s per storage node while the run lasts (e.g. 200M; 0 = unlimited).",
    )(fn)
    fn = click.option(
        "--concurrency",
        type=click.IntRange(min=0),
        default=0,
        help="Moves at once (0 = mgmtd's rebalance_max_concurrent_moves).",
    )(fn)
    fn = click.option("--no-wait", is_flag=True, help="Start the run and return.")(fn)
    return fn


def _request(
    mode: int, node_id: int, dry_run: bool, rate: str | None, concurrency: int
) -> mp.RebalanceReq:
    req = mp.RebalanceReq(
        mode=mode,  # type: ignore[arg-type]
        node_id=node_id,
        dry_run=dry_run,
        max_concurrent_moves=concurrency,
    )
    if rate is not None:
        req.rate_bytes_per_s = parse_size(rate)
    return req


# One command per mode: (name, mode, takes a NODE_ID, help text).
_MODES = (
    (
        "add-node",
        mp.ADD_NODE,
        True,
        "Move chain replicas onto NODE_ID's free targets until it holds its share.",
    ),
    (
        "drain-node",
        mp.DRAIN_NODE,
        True,
        "Move every chain replica off NODE_ID (to free targets on other nodes).",
    ),
    ("rebalance", mp.BALANCE, False, "Even out chain replicas across the online storage nodes."),
)


def _register(name: str, mode: int, takes_node: bool, help_text: str) -> None:
    async def command(
        dry_run: bool,
        rate: str | None,
        concurrency: int,
        no_wait: bool,
        address: str,
        timeout_s: float,
        as_json: bool,
        node_id: int = 0,
    ) -> None:
        req = _request(mode, node_id, dry_run, rate, concurrency)
        await run_rebalance(address, timeout_s, req, as_json, not no_wait)

    command.__doc__ = help_text
    fn = _run_options(mgmt_command(command))
    if takes_node:
        fn = click.argument("node_id", type=click.IntRange(min=1))(fn)
    admin.command(name)(fn)


for _name, _mode, _takes_node, _help in _MODES:
    _register(_name, _mode, _takes_node, _help)


@admin.command("rebalance-status")
@mgmt_command
async def rebalance_status(address: str, timeout_s: float, as_json: bool) -> None:
    """Progress of the running rebalance, or how the last one ended."""

    async def go(c: MgmtClient) -> None:
        _show(await c.rebalance_status(), as_json, "rebalance")

    await with_mgmt(address, timeout_s, go)
