"""What mgmtd shows at ``/metrics``, read from the primary's live cluster view
at each scrape (names in docs/metrics.md). A standby shows only
``chainfs_mgmtd_primary 0``: the primary speaks for the cluster."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from chainfs.common import metrics
from chainfs.mgmt_service.service import Mgmtd
from chainfs.proto import mgmt_pb2 as mp

TARGET_STATES = [
    mp.PublicTargetState.Name(v).lower()
    for v in (mp.SERVING, mp.SYNCING, mp.WAITING, mp.LASTSRV, mp.OFFLINE)
]
NODE_STATUSES = {mp.NODE_ONLINE: "online", mp.NODE_OFFLINE: "offline", mp.NODE_DISABLED: "disabled"}
CHAIN_STATES = ("serving", "degraded", "unavailable")


def node_type(t: int) -> str:
    return mp.NodeType.Name(t).lower()  # type: ignore[arg-type]


def target_state(t: mp.TargetInfo) -> str:
    return mp.PublicTargetState.Name(t.public_state).lower()


def chain_state(info: mp.RoutingInfo, chain: mp.ChainInfo) -> str:
    """serving: every replica serves; degraded: some do; unavailable: none does."""
    states = {t.target_id: t.public_state for t in info.targets}
    serving = sum(1 for t in chain.targets if states.get(t) == mp.SERVING)
    if serving == len(chain.targets) and serving:
        return "serving"
    return "degraded" if serving else "unavailable"


def collector(svc: Mgmtd) -> metrics.CollectFn:
    def collect() -> Iterator[Metric]:
        view = svc.live_view()
        yield GaugeMetricFamily(
            "chainfs_mgmtd_primary",
            "1 on the primary mgmtd, 0 on a standby",
            value=view is not None,
        )
        if view is None:
            return
        info, ages = view
        yield GaugeMetricFamily(
            "chainfs_mgmtd_routing_version", "Version of the routing info", value=info.version
        )
        yield from _counts(info)
        age = GaugeMetricFamily(
            "chainfs_mgmtd_heartbeat_age_seconds",
            "Seconds since each node's last heartbeat",
            labels=["node", "type"],
        )
        for n in info.nodes:
            if n.node_id in ages:
                age.add_metric([str(n.node_id), node_type(n.type)], ages[n.node_id])
        yield age

    return collect


def _counts(info: mp.RoutingInfo) -> Iterator[Metric]:
    targets = GaugeMetricFamily(
        "chainfs_mgmtd_targets", "Targets by public state", labels=["state"]
    )
    for state in TARGET_STATES:
        targets.add_metric([state], sum(1 for t in info.targets if target_state(t) == state))
    chains = GaugeMetricFamily("chainfs_mgmtd_chains", "Chains by state", labels=["state"])
    by_chain = [chain_state(info, c) for c in info.chains]
    for state in CHAIN_STATES:
        chains.add_metric([state], by_chain.count(state))
    nodes = GaugeMetricFamily(
        "chainfs_mgmtd_nodes", "Registered nodes by type and status", labels=["type", "status"]
    )
    for t in (mp.STORAGE, mp.META):
        for code, status in NODE_STATUSES.items():
            n = sum(1 for x in info.nodes if x.type == t and x.status == code)
            nodes.add_metric([node_type(t), status], n)
    yield from (targets, chains, nodes)
