"""`chainfs admin top`: live cluster throughput and ops, per node and in total.

mgmtd names the nodes and where each serves /metrics (the ``metrics_address``
tag nodes register with); every ``--interval`` each node is scraped and the
change of its counters since the last scrape is shown as rates. ``--json``
prints one JSON object per refresh instead (for scripts).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from chainfs.cli.admin.cluster import fetch_routing
from chainfs.cli.admin.common import admin, mgmt_command
from chainfs.common import metrics
from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.proto import mgmt_pb2 as mp

COLUMNS = ("read_bytes", "write_bytes", "read_ops", "write_ops", "meta_ops", "errors")


@dataclass
class NodeRates:
    node_id: int
    type: str
    address: str
    rates: dict[str, float] = field(default_factory=dict)
    error: str = ""


class Scraper:
    """Scrapes every node mgmtd lists; rates from the change since the last round."""

    def __init__(self, mgmt: MgmtClient, timeout_s: float) -> None:
        self.mgmt = mgmt
        self.timeout_s = timeout_s
        self.tracker = metrics.RateTracker()

    async def round(self) -> list[NodeRates]:
        routing = await fetch_routing(self.mgmt)
        nodes = [
            n
            for n in routing.info.nodes
            if n.status == mp.NODE_ONLINE and n.tags.get(metrics.METRICS_ADDRESS)
        ]
        self.tracker.keep_only({n.node_id for n in nodes})
        return list(await asyncio.gather(*(self._node(n) for n in nodes)))

    async def _node(self, node: mp.NodeInfo) -> NodeRates:
        address = node.tags[metrics.METRICS_ADDRESS]
        out = NodeRates(node.node_id, mp.NodeType.Name(node.type).lower(), address)
        try:
            samples = await metrics.scrape(address, self.timeout_s)
        except (OSError, TimeoutError, ValueError) as e:
            out.error = str(e) or type(e).__name__
            return out
        out.rates = self.tracker.update(node.node_id, samples) or {}
        return out


def summed(rows: list[NodeRates]) -> dict[str, float]:
    return {c: sum(r.rates.get(c, 0.0) for r in rows) for c in COLUMNS}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "…"  # one scrape so far: no rate yet
    return _bytes(value) + "/s" if column.endswith("_bytes") else f"{value:,.1f}"


def render(rows: list[NodeRates], interval_s: float) -> Table:
    table = Table(title=f"chainfs top (every {interval_s:g}s; Ctrl-C quits)")
    for c in ("node", "type", "metrics", *(c.replace("_", " ") + "/s" for c in COLUMNS)):
        table.add_column(c, justify="right" if c.endswith("/s") else "left")
    for r in sorted(rows, key=lambda r: r.node_id):
        values = [_cell(c, r.rates.get(c) if r.rates else None) for c in COLUMNS]
        table.add_row(str(r.node_id), r.type, r.error or r.address, *values)
    total = summed(rows)
    table.add_row("all", "", "", *(_cell(c, total[c]) for c in COLUMNS), style="bold")
    return table


def to_json(rows: list[NodeRates]) -> dict[str, Any]:
    return {
        "time_ms": int(time.time() * 1000),
        "nodes": [
            {"node_id": r.node_id, "type": r.type, "metrics_address": r.address,
             "error": r.error, "rates": r.rates}
            for r in rows
        ],
        "total": summed(rows),
    }  # fmt: skip


@admin.command("top")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), default=2.0)
@click.option(
    "--iterations", type=click.IntRange(min=0), default=0, help="Refreshes to show (0 = forever)."
)
@mgmt_command
async def top_cmd(
    address: str, as_json: bool, timeout_s: float, interval_s: float, iterations: int
) -> None:
    """Live throughput and ops of every node, from their /metrics."""
    mgmt = MgmtClient(address, timeout_s=timeout_s)
    try:
        scraper = Scraper(mgmt, timeout_s)
        await scraper.round()  # the baseline the first rates are measured from
        if as_json:
            for _ in _count(iterations):
                await asyncio.sleep(interval_s)
                sys.stdout.write(json.dumps(to_json(await scraper.round())) + "\n")
                sys.stdout.flush()
            return
        with Live(render([], interval_s), console=Console(), auto_refresh=False) as live:
            for _ in _count(iterations):
                await asyncio.sleep(interval_s)
                live.update(render(await scraper.round(), interval_s), refresh=True)
    finally:
        await mgmt.close()


def _count(iterations: int) -> range | _Forever:
    return range(iterations) if iterations else _Forever()


class _Forever:
    def __iter__(self) -> _Forever:
        return self

    def __next__(self) -> None:
        return None
