"""What a meta server counts and shows at ``/metrics`` (names in docs/metrics.md).

:func:`instrument` times every Namespace operation, whichever transport
called it; :func:`kv_collector` shows the store's commit/conflict/retry
counts; :class:`SessionCounter` keeps the open-sessions gauge.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from chainfs.common import metrics
from chainfs.common.background import Periodic
from chainfs.kv import KVStore, Transaction
from chainfs.meta_service import schema
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.namespace import Namespace
from chainfs.meta_service.service import NAMESPACE_METHODS

REQUESTS = metrics.RequestMetrics("chainfs_meta_request", "Metadata operation")
OPEN_SESSIONS = metrics.gauge(
    "chainfs_meta_open_sessions", "Open file sessions in the store (counted periodically)"
)
_SESSION_PAGE = 1024  # session keys read per counting transaction

_KV_STATS = {
    "commits": "Transactions committed",
    "conflicts": "Transactions that hit a conflict",
    "retries": "Transaction retries after a conflict",
}


def instrument(ns: Namespace) -> None:
    """Replace ``ns``'s operation methods (on this instance) by timed ones."""
    for op, method in NAMESPACE_METHODS.items():
        setattr(ns, method, _timed(op, getattr(ns, method)))


def _timed(op: str, fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    @functools.wraps(fn)
    async def call(request: Any) -> Any:
        with REQUESTS.observe(op):
            return await fn(request)

    return call


def kv_collector(kv: KVStore) -> metrics.CollectFn:
    def collect() -> Iterator[Metric]:
        for key, doc in _KV_STATS.items():
            yield CounterMetricFamily(f"chainfs_meta_kv_{key}", doc, value=kv.stats[key])

    return collect


class SessionCounter(Periodic):
    """Counts the open sessions (INOS keys) of the whole store, up to a bound."""

    name = "session-counter"

    def __init__(self, kv: KVStore, cfg: MetaConfig) -> None:
        super().__init__(cfg.session_count_interval_ms / 1000)
        self.kv = kv
        self.limit = cfg.session_count_limit

    async def round(self) -> bool:
        begin, end = schema.range_of(schema.INOS)
        count = 0
        while count < self.limit:
            page = min(_SESSION_PAGE, self.limit - count)

            async def fn(tx: Transaction, start: bytes = begin, n: int = page) -> list[bytes]:
                return [k for k, _ in await tx.get_range(start, end, limit=n)]

            keys = await self.kv.transact(fn, read_only=True)
            count += len(keys)
            if len(keys) < page:
                break
            begin = keys[-1] + b"\x00"
        OPEN_SESSIONS.set(count)
        return False
