"""mgmtd's read-only status page: ``http://<mgmtd>:<status_port>/``.

``/`` is one HTML file (``static/status.html``, plain JS and inline SVG, no
external resources) that fetches ``/api/status`` every few seconds. That JSON
is the primary's live cluster view (nodes, targets, chains, resyncs) plus the
last minutes of cluster throughput, which :class:`ThroughputSampler` keeps in
a bounded ring by scraping every online node's ``/metrics``. A standby answers
with where the primary is. There is no login yet: anyone who reaches the port
can read the page (it changes nothing).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from chainfs.common import metrics
from chainfs.common.background import Periodic
from chainfs.mgmt_service import metrics as mgmt_metrics
from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.mgmt_service.metrics import chain_state, node_type, target_state
from chainfs.mgmt_service.service import Mgmtd
from chainfs.proto import mgmt_pb2 as mp


@dataclass
class Sample:
    """Cluster rates over one sampling interval (per second)."""

    t_ms: int
    rates: dict[str, float] = field(default_factory=dict)


class ThroughputSampler(Periodic):
    """Primary: scrape every online node's /metrics each interval and keep the
    cluster's rates in a ring of ``status_history_samples``."""

    name = "status sampler"
    fixed_rate = True

    def __init__(self, svc: Mgmtd, cfg: MgmtdConfig) -> None:
        super().__init__(cfg.status_sample_interval_ms / 1000)
        self.svc = svc
        self.timeout_s = cfg.status_scrape_timeout_ms / 1000
        self.history: deque[Sample] = deque(maxlen=cfg.status_history_samples)
        self.tracker = metrics.RateTracker()
        self.unreachable: dict[int, str] = {}  # node id -> why its /metrics failed last
        self.sync_start: dict[int, int] = {}  # syncing target -> bytes left when first seen

    async def round(self) -> bool:
        view = self.svc.live_view()
        if view is None:
            self.history.clear()
            self.tracker.keep_only(set())
            return False
        info, _ = view
        self._track_syncs(info)
        nodes = [
            n
            for n in info.nodes
            if n.status == mp.NODE_ONLINE and n.tags.get(metrics.METRICS_ADDRESS)
        ]
        got = await asyncio.gather(*(self._scrape(n) for n in nodes))
        rates = dict.fromkeys(metrics.RATES, 0.0)
        for node, samples in zip(nodes, got, strict=True):
            node_rates = None if samples is None else self.tracker.update(node.node_id, samples)
            for key, value in (node_rates or {}).items():
                rates[key] += value
        scraped = {n.node_id for n in nodes}
        self.tracker.keep_only(scraped)
        self.unreachable = {k: v for k, v in self.unreachable.items() if k in scraped}
        self.history.append(Sample(int(time.time() * 1000), rates))
        return False

    async def _scrape(self, node: mp.NodeInfo) -> metrics.Samples | None:
        address = node.tags[metrics.METRICS_ADDRESS]
        try:
            samples = await metrics.scrape(address, self.timeout_s)
        except (OSError, TimeoutError, ValueError) as e:
            self.unreachable[node.node_id] = f"{address}: {e or type(e).__name__}"
            return None
        self.unreachable.pop(node.node_id, None)
        return samples

    def _track_syncs(self, info: mp.RoutingInfo) -> None:
        syncing = {
            t.target_id: t.sync_bytes_left for t in info.targets if t.public_state == mp.SYNCING
        }
        for tid, left in syncing.items():
            self.sync_start[tid] = max(self.sync_start.get(tid, 0), left)
        self.sync_start = {k: v for k, v in self.sync_start.items() if k in syncing}


def status(svc: Mgmtd, sampler: ThroughputSampler) -> dict[str, Any]:
    """What /api/status answers."""
    view = svc.live_view()
    if view is None:
        return {"primary": False, "primary_address": svc.election.primary_address or ""}
    info, ages = view
    return {
        "primary": True,
        "cluster_id": info.cluster_id or svc.cfg.cluster_id,
        "routing_version": info.version,
        "now_ms": int(time.time() * 1000),
        "heartbeat_timeout_s": svc.cfg.heartbeat_timeout_ms / 1000,
        "nodes": [_node(n, ages, sampler) for n in info.nodes],
        "targets": [_target(t) for t in info.targets],
        "chains": [_chain(info, c) for c in info.chains],
        "resyncs": _resyncs(info, sampler),
        "series": [asdict(s) for s in sampler.history],
        "sample_interval_s": sampler.interval_s,
    }


def _node(n: mp.NodeInfo, ages: dict[int, float], sampler: ThroughputSampler) -> dict[str, Any]:
    age = ages.get(n.node_id)
    return {
        "node_id": n.node_id,
        "type": node_type(n.type),
        "status": mp.NodeStatus.Name(n.status).removeprefix("NODE_").lower(),
        "hostname": n.hostname,
        "rpc_address": n.rpc_address,
        "metrics_address": n.tags.get(metrics.METRICS_ADDRESS, ""),
        "metrics_error": sampler.unreachable.get(n.node_id, ""),
        "heartbeat_age_s": round(age, 1) if age is not None else None,
    }


def _target(t: mp.TargetInfo) -> dict[str, Any]:
    return {
        "target_id": t.target_id,
        "node_id": t.node_id,
        "chain_id": t.chain_id,
        "state": target_state(t),
        "local_state": mp.LocalTargetState.Name(t.local_state).lower(),
        "used_bytes": t.used_bytes,
        "capacity_bytes": t.capacity_bytes,
    }


def _chain(info: mp.RoutingInfo, c: mp.ChainInfo) -> dict[str, Any]:
    states = {t.target_id: target_state(t) for t in info.targets}
    return {
        "chain_id": c.chain_id,
        "version": c.chain_version,
        "state": chain_state(info, c),
        "targets": [{"target_id": t, "state": states.get(t, "unknown")} for t in c.targets],
    }


def _resyncs(info: mp.RoutingInfo, sampler: ThroughputSampler) -> list[dict[str, Any]]:
    out = []
    for t in info.targets:
        if t.public_state != mp.SYNCING:
            continue
        start = sampler.sync_start.get(t.target_id, t.sync_bytes_left)
        done = 1.0 - t.sync_bytes_left / start if start else 0.0
        out.append(
            {
                "target_id": t.target_id,
                "chain_id": t.chain_id,
                "bytes_left": t.sync_bytes_left,
                "rate_bytes_per_s": t.sync_rate_bytes_per_s,
                "progress": round(done, 3),
            }
        )
    return out


def page_html() -> bytes:
    return resources.files("chainfs.mgmt_service").joinpath("static/status.html").read_bytes()


def routes(svc: Mgmtd, sampler: ThroughputSampler) -> dict[str, metrics.Route]:
    html = page_html()  # read once: the package does not change under a running server

    def page() -> metrics.HttpReply:
        return metrics.HttpReply(html, "text/html; charset=utf-8")

    def api() -> metrics.HttpReply:
        body = json.dumps(status(svc, sampler)).encode()
        return metrics.HttpReply(body, "application/json")

    return {"/": page, "/index.html": page, "/api/status": api}


class MgmtdWeb:
    """mgmtd's two HTTP servers: /metrics and the status page."""

    def __init__(self, node_metrics: metrics.NodeMetrics, page: metrics.HttpServer | None) -> None:
        self.metrics = node_metrics
        self.page = page

    def ready_info(self) -> dict[str, str]:
        info = self.metrics.ready_info()
        if self.page is not None:
            info["status_address"] = self.page.address
        return info

    async def stop(self) -> None:
        await self.metrics.stop()
        if self.page is not None:
            await self.page.stop()


async def start_web(cfg: MgmtdConfig, svc: Mgmtd, sampler: ThroughputSampler) -> MgmtdWeb:
    node_metrics = await metrics.NodeMetrics.start(
        cfg.listen_host, cfg.metrics_port, mgmt_metrics.collector(svc)
    )
    page = None
    try:
        if cfg.status_port >= 0:
            page = metrics.HttpServer(routes(svc, sampler), cfg.listen_host, cfg.status_port)
            await page.start()
    except BaseException:
        await node_metrics.stop()
        raise
    return MgmtdWeb(node_metrics, page)
