"""Several mgmtd processes may share one KV store; one is primary. Election
(:class:`Election`): the primary holds two records in the store, ``primary``
(holder, epoch; written only on takeover) and ``lease`` (holder, epoch,
renewal count; rewritten every ``lease_renew_interval_ms``). A standby takes
over once it has seen the lease record unchanged for ``lease_ms`` on its own
monotonic clock (no cross-host clock comparison). Every state change the
primary commits reads the ``primary`` record in the same transaction, so a
primary that lost its lease can never commit (the takeover conflicts it out);
and a primary stops answering ``lease_safety_margin_ms`` before its lease could
have run out, so two primaries never answer at once."""

from __future__ import annotations

import json
import time
from typing import Any

from chainfs.kv import KVStore, Transaction
from chainfs.mgmt_service.config import MgmtdConfig
from chainfs.mgmt_service.schema import KEY_LEASE, KEY_PRIMARY, peer_key, wall_ms


class Election:
    """This mgmtd's view of who is primary, kept by :meth:`round`."""

    def __init__(
        self, store: KVStore, self_id: int, address: str, cfg: MgmtdConfig, exclusive: bool = False
    ) -> None:
        self.store = store
        # The store admits one process (rocksdb, memory): no other mgmtd can be
        # alive, so a lease left by a crashed predecessor is taken at once.
        self.exclusive = exclusive
        self.self_id = self_id
        self.address = address
        self.cfg = cfg
        self.epoch = 0  # our epoch while we hold the lease
        self.valid_until = 0.0  # monotonic; we act as primary before this
        self.primary_address = ""  # as last seen in the store
        self.primary_id = 0
        self.lease_expires_ms = 0
        self._seen: tuple[bytes | None, float] = (None, 0.0)  # lease record, first seen at

    def is_primary(self) -> bool:
        return self.epoch > 0 and time.monotonic() < self.valid_until

    async def round(self) -> str:
        """Renew, take over or observe; returns "renewed", "took" or "standby"."""
        sent = time.monotonic()
        lease_ms = self.cfg.lease_ms
        seen_raw, seen_at = self._seen

        async def fn(tx: Transaction) -> tuple[str, bytes | None, dict[str, Any]]:
            raw = await tx.get(KEY_LEASE)
            lease = json.loads(raw) if raw else None
            primary_raw = await tx.get(KEY_PRIMARY)
            primary = json.loads(primary_raw) if primary_raw else None
            now_ms = wall_ms()
            ours = (
                lease is not None
                and primary is not None
                and lease["node_id"] == self.self_id
                and primary["node_id"] == self.self_id
                and self.epoch > 0
                and primary["epoch"] == self.epoch
            )
            free = lease is None or lease["node_id"] == 0
            stale = self.exclusive or (raw == seen_raw and sent - seen_at >= lease_ms / 1000.0)
            if ours:
                assert lease is not None
                lease["renewals"] += 1
                lease["expires_ms"] = now_ms + lease_ms
                tx.set(KEY_LEASE, json.dumps(lease).encode())
                action = "renewed"
            elif free or stale:
                epoch = (primary["epoch"] if primary else 0) + 1
                primary = {"node_id": self.self_id, "address": self.address, "epoch": epoch}
                lease = {**primary, "renewals": 0, "expires_ms": now_ms + lease_ms}
                tx.set(KEY_PRIMARY, json.dumps(primary).encode())
                tx.set(KEY_LEASE, json.dumps(lease).encode())
                action = "took"
            else:
                assert lease is not None
                return "standby", raw, lease
            peer = {"node_id": self.self_id, "address": self.address, "seen_ms": now_ms}
            tx.set(peer_key(self.self_id), json.dumps(peer).encode())
            return action, None, lease

        action, raw, lease = await self.store.transact(fn)
        if action == "standby":
            self.epoch = 0
            self.valid_until = 0.0
            if raw != seen_raw:
                self._seen = (raw, time.monotonic())
            self.primary_address = str(lease.get("address", ""))
            self.primary_id = int(lease.get("node_id", 0))
            self.lease_expires_ms = int(lease.get("expires_ms", 0))
            return action
        self.epoch = int(lease["epoch"])
        self.valid_until = sent + (lease_ms - self.cfg.lease_safety_margin_ms) / 1000.0
        self.primary_address = self.address
        self.primary_id = self.self_id
        self.lease_expires_ms = int(lease["expires_ms"])
        self._seen = (None, 0.0)
        return action

    async def release(self) -> None:
        """Give the lease up (clean shutdown): a standby takes over at its next round."""
        if self.epoch == 0:
            return
        epoch = self.epoch
        self.epoch = 0
        self.valid_until = 0.0

        async def fn(tx: Transaction) -> None:
            raw = await tx.get(KEY_LEASE)
            lease = json.loads(raw) if raw else None
            if lease and lease["node_id"] == self.self_id and lease["epoch"] == epoch:
                tx.set(KEY_LEASE, json.dumps({**lease, "node_id": 0, "address": ""}).encode())
            tx.clear(peer_key(self.self_id))

        await self.store.transact(fn)
