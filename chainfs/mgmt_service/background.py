"""mgmtd's background loops, on the one background-loop mechanism."""

from __future__ import annotations

import asyncio
import logging

from chainfs.common.background import Periodic
from chainfs.mgmt_service.service import Mgmtd

log = logging.getLogger(__name__)


class LeaseKeeper(Periodic):
    """Every lease_renew_interval_ms: renew the primary lease, take it over
    when it went stale, or stand by. ``first_round`` is set after the first."""

    name = "election"
    fixed_rate = True  # a slow round must not delay the next renewal

    def __init__(self, svc: Mgmtd) -> None:
        super().__init__(svc.cfg.lease_renew_interval_ms / 1000.0)
        self.svc = svc
        self.first_round = asyncio.Event()
        self.failures = 0  # consecutive failed rounds

    async def round(self) -> bool:
        try:
            await self.svc.election_round()
            self.failures = 0
        except Exception as e:  # a store outage fails every round: log a few of them
            self.failures += 1
            if self.failures == 1 or self.failures % 20 == 0:
                log.warning("election round failed (%d in a row): %s", self.failures, e)
        finally:
            self.first_round.set()
        return False


class HeartbeatChecker(Periodic):
    """Primary: every check_interval_ms, silent nodes go offline and chains step."""

    name = "heartbeat checker"

    def __init__(self, svc: Mgmtd) -> None:
        super().__init__(svc.cfg.check_interval_ms / 1000.0)
        self.svc = svc

    async def round(self) -> bool:
        await self.svc.check_heartbeats()
        return False
