"""The cluster state in the KV store: one key per record, few writes per change,
and the old one-value layout converted once."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainfs.common.rpc.mgmt_client import MgmtClient
from chainfs.kv import Transaction, prefix_end
from chainfs.kv.memory import MemoryStore
from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.mgmt_service.schema import (
    KEY_CHAIN,
    KEY_COUNTERS,
    KEY_NODE,
    KEY_PREFIX,
    KEY_ROUTING,
    KEY_STATE_HEADER,
    KEY_TARGET,
    chain_key,
    node_key,
    target_key,
)
from chainfs.proto import mgmt_pb2 as mp
from tests.unit.mgmt.conftest import run_mgmtd

pytestmark = pytest.mark.timeout(60)


def _cluster(nodes: int, per_node: int) -> ClusterState:
    s = ClusterState.decode(None, None, "test")
    before = s.copy()
    for i in range(nodes):
        node = mp.NodeInfo(type=mp.STORAGE, rpc_address=f"127.0.0.1:{7000 + i}")
        s.register(node, [mp.TargetInfo(path=f"/d{i}/{j}") for j in range(per_node)], False)
    s.create_chains(3, 0, init=True)
    assert s.finish(before)
    return s


class RecordingTx:
    """A transaction that remembers which keys were written."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.written: set[bytes] = set()

    def set(self, key: bytes, value: bytes) -> None:
        self.written.add(key)
        self.tx.set(key, value)

    def clear(self, key: bytes) -> None:
        self.written.add(key)
        self.tx.clear(key)

    def __getattr__(self, name: str) -> object:
        return getattr(self.tx, name)


async def _commit(store: MemoryStore, before: ClusterState, op: object) -> set[bytes]:
    after = before.copy()
    op(after)  # type: ignore[operator]
    assert after.finish(before)

    async def fn(tx: Transaction) -> set[bytes]:
        rec = RecordingTx(tx)
        after.save(rec)  # type: ignore[arg-type]
        return rec.written

    return await store.transact(fn)


async def _load(store: MemoryStore) -> ClusterState:
    async def fn(tx: Transaction) -> ClusterState:
        return await ClusterState.load(tx, "test")

    return await store.transact(fn, read_only=True)


async def _save_all(store: MemoryStore, s: ClusterState) -> None:
    async def fn(tx: Transaction) -> None:
        s.save_all(tx)

    await store.transact(fn)


async def test_one_node_failing_writes_only_its_records() -> None:
    store = MemoryStore()
    s = _cluster(60, 4)
    await _save_all(store, s)
    assert (await _load(store)).encode() == s.encode()
    victim = 7
    written = await _commit(store, s, lambda x: x.mark_offline([victim]))
    mine = s.targets_of(victim)
    allowed = {KEY_STATE_HEADER, KEY_COUNTERS, node_key(victim)}
    allowed |= {target_key(t.target_id) for t in mine}
    allowed |= {chain_key(t.chain_id) for t in mine}
    # Chains reorder, so other members' states change only where one becomes
    # lastsrv/offline: none here, the chains keep two serving targets.
    assert written <= allowed, sorted(written - allowed)
    assert node_key(victim) in written and len(written) <= 3 + 2 * len(mine)
    # ... and what is stored is the whole new state.
    after = await _load(store)
    assert after.node(victim).status == mp.NODE_OFFLINE  # type: ignore[union-attr]
    assert after.info.version == s.info.version + 1


async def test_a_removed_target_is_cleared_and_everything_reloads() -> None:
    store = MemoryStore()
    s = _cluster(5, 2)
    await _save_all(store, s)
    free = [t.target_id for t in s.info.targets if not t.chain_id]
    assert free, "5 nodes x 2 targets leave one target out of the 3-replica chains"
    after = s.copy()
    after.remove_target(free[0])
    after.finish(s)
    written = await _commit(store, s, lambda x: x.remove_target(free[0]))
    assert target_key(free[0]) in written
    loaded = await _load(store)
    assert loaded.target(free[0]) is None
    assert loaded.encode() == after.encode()


async def test_old_single_key_record_is_converted_once(tmp_path: Path) -> None:
    """A store written by an older mgmtd (the whole state under MGMT|routing):
    the new primary serves it unchanged and stores it one key per record."""
    store = MemoryStore()
    old = _cluster(4, 3)
    routing, counters = old.encode()

    async def write_old(tx: Transaction) -> None:
        tx.set(KEY_ROUTING, routing)
        tx.set(KEY_COUNTERS, counters)

    await store.transact(write_old)
    async with (
        run_mgmtd(tmp_path, store=store, cluster_id="test", heartbeat_timeout_ms=60_000) as m,
        MgmtClient(m.address) as client,
    ):
        got = await client.get_routing()
        assert got is not None
        assert got.version == old.info.version
        assert [c.targets[:] for c in got.info.chains] == [c.targets[:] for c in old.info.chains]
        assert {n.node_id for n in got.info.nodes} == {n.node_id for n in old.info.nodes}

        async def keys(tx: Transaction) -> list[bytes]:
            pairs = await tx.get_range(KEY_PREFIX, prefix_end(KEY_PREFIX))
            return [k for k, _ in pairs]

        stored = await store.transact(keys, read_only=True)
        assert KEY_ROUTING not in stored and KEY_STATE_HEADER in stored
        for prefix, records in (
            (KEY_NODE, old.info.nodes),
            (KEY_TARGET, old.info.targets),
            (KEY_CHAIN, old.info.chains),
        ):
            assert sum(1 for k in stored if k.startswith(prefix)) == len(records)
    loaded = await _load(store)
    assert not loaded.from_single_key
    assert loaded.info.version == old.info.version
    assert [t.SerializeToString() for t in loaded.info.targets] == [
        t.SerializeToString() for t in old.info.targets
    ]
