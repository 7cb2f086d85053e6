"""Fencing: a storage node that cannot reach mgmtd stops serving on its own.

mgmtd declares a node's targets offline after ``heartbeat_timeout`` without a
heartbeat and the chain then moves on without them. A node cut off from mgmtd
(but maybe not from some clients) must stop before that happens, or it could
serve bytes the rest of the chain has since overwritten, or accept writes the
others never see. So once the last *acknowledged* heartbeat is older than
``fence_after_timeout_ratio`` (default one half) of the timeout mgmtd gave at
registration, every data-plane request answers FENCED (clients try another
replica or retry after refreshing routing), until a heartbeat succeeds again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.mgmt_client import HeartbeatLoop

log = logging.getLogger(__name__)


class Fence:
    def __init__(self, heartbeat: Callable[[], HeartbeatLoop | None], ratio: float) -> None:
        assert 0.0 < ratio < 1.0
        self._heartbeat = heartbeat
        self.ratio = ratio
        self._was_fenced = False
        self.times_fenced = 0

    def limit_s(self) -> float:
        hb = self._heartbeat()
        if hb is None or hb.heartbeat_timeout_s <= 0:
            return 0.0
        return hb.heartbeat_timeout_s * self.ratio

    def fenced(self) -> bool:
        hb = self._heartbeat()
        limit = self.limit_s()
        if hb is None or limit <= 0:
            return False  # not registered yet: nothing is served before registration anyway
        now = hb.since_last_ack_s() > limit
        if now != self._was_fenced:
            self._was_fenced = now
            if now:
                self.times_fenced += 1
                log.warning(
                    "no heartbeat acknowledged for %.2fs (> %.2fs): fenced, serving nothing",
                    hb.since_last_ack_s(),
                    limit,
                )
            else:
                log.warning("heartbeat acknowledged again: unfenced")
        return now

    def check(self) -> None:
        if self.fenced():
            raise ChainfsError(
                Code.FENCED,
                f"storage node lost contact with mgmtd for more than {self.limit_s():.2f}s",
            )
