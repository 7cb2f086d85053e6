"""Rebalancing: move chain replicas onto new storage nodes and off leaving ones.

One move takes one replica of a chain from an old target to a free target on
another node, the way 3FS migrates: the new target joins the chain at its tail
(offline -> waiting -> syncing; the storage nodes' resync fills it from its
predecessor while CRAQ already forwards new writes to it), and once it is
SERVING the old target leaves the chain. Every step is an ordinary chain update,
so the chain version bumps at each and clients refresh their routing on a
stale-version rejection. A chain never has fewer serving targets during a move
than before it: the old replica serves until the new one does.

:func:`plan` decides the moves (pure, on a :class:`ClusterState`);
:class:`Rebalancer` runs them on the primary, one move at a time per chain and
at most ``rebalance_max_concurrent_moves`` at once, and keeps the progress.
Once the old target has left, its node is asked to drop its chunks
(StorageControl.DropChunks, refused while the node's routing shows the target
in a chain); a node that is offline keeps them until the target is reused (the
resync that fills it then removes what it holds beyond the chain's chunks).

The run (plan, progress, rate, concurrency) is stored (a RebalanceRun) when it
starts and whenever a move changes state. A mgmtd that becomes primary resumes
a stored run that had not finished (:meth:`Rebalancer.resume`): each move not
done or failed goes on from where the chain table shows it, whatever the
stored record says of it (a crash may fall between a chain change and the
record's rewrite), so no chain keeps a replica too many.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.storage_control import StorageControl
from chainfs.mgmt_service.cluster_state import ClusterState
from chainfs.mgmt_service.schema import wall_ms
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp

log = logging.getLogger(__name__)


@dataclass
class _Layout:
    """The chain table as the planner sees it, changed as moves are planned."""

    node_of: dict[int, int]  # target id -> node id
    chains: dict[int, list[int]]  # chain id -> target ids, head first
    free: dict[int, list[int]]  # node id -> free targets (destinations)
    load: dict[int, int]  # node id -> chain replicas it holds
    heads: dict[int, int] = field(default_factory=dict)  # node id -> chains it heads
    moves_of: dict[int, int] = field(default_factory=dict)  # chain id -> moves planned

    @classmethod
    def of(cls, state: ClusterState) -> _Layout:
        online = {
            n.node_id
            for n in state.info.nodes
            if n.type == mp.STORAGE and n.status == mp.NODE_ONLINE
        }
        node_of = {t.target_id: t.node_id for t in state.info.targets}
        chains = {c.chain_id: list(c.targets) for c in state.info.chains}
        load = dict.fromkeys(online, 0)
        heads = dict.fromkeys(online, 0)
        for targets in chains.values():
            for i, tid in enumerate(targets):
                load[node_of[tid]] = load.get(node_of[tid], 0) + 1
                if i == 0:
                    heads[node_of[tid]] = heads.get(node_of[tid], 0) + 1
        return cls(node_of, chains, state.free_targets_by_node(), load, heads)

    def nodes_in(self, chain_id: int) -> set[int]:
        return {self.node_of[t] for t in self.chains[chain_id]}

    def move(self, chain_id: int, from_target: int, to_node: int) -> mp.Move:
        """Plan one move (the free target of ``to_node`` used first) and apply it here."""
        to_target = self.free[to_node].pop(0)
        from_node = self.node_of[from_target]
        targets = self.chains[chain_id]
        if targets[0] == from_target:  # the next member becomes head
            self.heads[from_node] -= 1
            if len(targets) > 1:
                self.heads[self.node_of[targets[1]]] += 1
        targets.remove(from_target)
        targets.append(to_target)
        self.node_of[to_target] = to_node
        self.load[from_node] -= 1
        self.load[to_node] = self.load.get(to_node, 0) + 1
        self.moves_of[chain_id] = self.moves_of.get(chain_id, 0) + 1
        return mp.Move(
            chain_id=chain_id,
            from_target=from_target,
            from_node=from_node,
            to_target=to_target,
            to_node=to_node,
            state=mp.MOVE_PLANNED,
        )


def plan(state: ClusterState, mode: int, node_id: int, max_moves: int) -> list[mp.Move]:
    """The moves of a rebalance (``mode`` a RebalanceMode); raises on bad input."""
    layout = _Layout.of(state)
    if mode == mp.DRAIN_NODE:
        _check_storage_node(state, node_id)
        moves = _plan_drain(layout, node_id)
    elif mode == mp.ADD_NODE:
        _check_storage_node(state, node_id)
        if not layout.free.get(node_id):
            raise ChainfsError(
                Code.EINVAL, f"node {node_id} is not online or has no free target to move onto"
            )
        moves = _plan_balance(layout, node_id, max_moves)
    elif mode == mp.BALANCE:
        if node_id:
            raise ChainfsError(Code.EINVAL, "rebalance takes no node (add-node and drain-node do)")
        moves = _plan_balance(layout, None, max_moves)
    else:
        raise ChainfsError(Code.EINVAL, f"unknown rebalance mode {mode}")
    if len(moves) > max_moves:
        raise ChainfsError(
            Code.EINVAL, f"the plan has {len(moves)} moves, more than {max_moves} at once"
        )
    return moves


def _check_storage_node(state: ClusterState, node_id: int) -> None:
    n = state.node(node_id)
    if n is None or n.type != mp.STORAGE:
        raise ChainfsError(Code.UNKNOWN_NODE, f"node {node_id} is not a registered storage node")


def _plan_drain(layout: _Layout, node_id: int) -> list[mp.Move]:
    """One move per chain with a replica on ``node_id``, to the least loaded node
    outside that chain (with a free target)."""
    moves: list[mp.Move] = []
    for chain_id in sorted(layout.chains):
        for tid in [t for t in layout.chains[chain_id] if layout.node_of[t] == node_id]:
            members = layout.nodes_in(chain_id)
            dests = [n for n, free in layout.free.items() if free and n not in members]
            if not dests:
                raise ChainfsError(
                    Code.NOT_ENOUGH_NODES,
                    f"cannot drain node {node_id}: chain {chain_id} has no free target to move "
                    "to on a node outside it (add targets or nodes first)",
                )
            dest = min(dests, key=lambda n: (layout.load.get(n, 0), n))
            moves.append(layout.move(chain_id, tid, dest))
    return moves


def _plan_balance(layout: _Layout, onto: int | None, max_moves: int) -> list[mp.Move]:
    """Moves from the most loaded nodes to the least loaded ones (only to ``onto``
    if given) until no such pair differs by more than one replica."""
    moves: list[mp.Move] = []
    while len(moves) <= max_moves:
        step = _best_move(layout, onto)
        if step is None:
            return moves
        moves.append(layout.move(*step))
    return moves  # over the bound: plan() refuses it


def _best_move(layout: _Layout, onto: int | None) -> tuple[int, int, int] | None:
    """(chain, from target, to node) of the most useful next move, or None."""
    dests = [n for n, free in layout.free.items() if free and (onto is None or n == onto)]
    for dest in sorted(dests, key=lambda n: (layout.load.get(n, 0), n)):
        sources = sorted((n for n in layout.load if n != dest), key=lambda n: (-layout.load[n], n))
        for src in sources:
            if layout.load[src] - layout.load.get(dest, 0) <= 1:
                break
            chain = _chain_to_move(layout, src, dest)
            if chain is not None:
                return chain
    return None


def _chain_to_move(layout: _Layout, src: int, dest: int) -> tuple[int, int, int] | None:
    """A chain with a replica on ``src`` and none on ``dest``: chains with fewer moves
    planned first (moves of different chains run in parallel), and among those a
    chain ``src`` heads while it heads more chains than ``dest`` (its head then
    passes on)."""
    prefer_head = layout.heads.get(src, 0) > layout.heads.get(dest, 0) + 1
    best: tuple[int, int, int] | None = None
    best_moves = 0
    for chain_id in sorted(layout.chains, key=lambda c: (layout.moves_of.get(c, 0), c)):
        if best is not None and layout.moves_of.get(chain_id, 0) > best_moves:
            break
        targets = layout.chains[chain_id]
        if dest in layout.nodes_in(chain_id):
            continue
        for i, tid in enumerate(targets):
            if layout.node_of[tid] != src:
                continue
            if (i == 0) == prefer_head:
                return chain_id, tid, dest
            if best is None:
                best, best_moves = (chain_id, tid, dest), layout.moves_of.get(chain_id, 0)
    return best


# ---- execution ------------------------------------------------------------------

Mutate = Callable[[Callable[[ClusterState], None]], Awaitable[tuple[None, ClusterState]]]
Persist = Callable[[mp.RebalanceRun], Awaitable[None]]


class Rebalancer:
    """Runs one plan at a time on the primary; :meth:`status` reports progress."""

    def __init__(
        self,
        mutate: Mutate,
        current: Callable[[], ClusterState],
        wait_change: Callable[[int, int], Awaitable[ClusterState]],
        used_bytes: Callable[[int], int],
        poll_ms: int,
        move_timeout_s: float,
        drop_timeout_s: float,
        credential: cpb.Credential | None = None,
        persist: Persist | None = None,
    ) -> None:
        """``credential``: what mgmtd presents to storage nodes (None: no auth);
        ``persist``: stores the run (None: kept in memory only)."""
        self._mutate = mutate
        self._current = current
        self._wait_change = wait_change  # (known routing version, wait ms) -> state
        self._used_bytes = used_bytes
        self._poll_ms = poll_ms
        self._move_timeout_s = move_timeout_s
        self._drop_timeout_s = drop_timeout_s
        self._credential = credential
        self._persist = persist
        self._persist_lock = asyncio.Lock()  # one write at a time, each of the latest status
        self._task: asyncio.Task[None] | None = None
        self._starting = False  # a start is storing its run
        self._status = mp.RebalanceStatus()
        self._concurrency = 1
        self._started = 0.0
        self._started_ms = 0
        self._ended = 0.0
        # Resync rate the storage nodes are told while a run is going (None: their own).
        self.rate_bytes_per_s: int | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> mp.RebalanceStatus:
        out = mp.RebalanceStatus()
        out.CopyFrom(self._status)
        out.running = self.running
        end = time.monotonic() if self.running else self._ended
        out.elapsed_s = max(end - self._started, 0.0) if self._started else 0.0
        return out

    def run_record(self) -> mp.RebalanceRun:
        """The run as stored: its status (``running`` until it has finished)."""
        run = mp.RebalanceRun(concurrency=self._concurrency, started_ms=self._started_ms)
        run.status.CopyFrom(self.status())
        if self._task is not None and not self._task.done():
            run.status.running = True
        if self.rate_bytes_per_s is not None:
            run.rate_bytes_per_s = self.rate_bytes_per_s
        return run

    async def start(
        self,
        req: mp.RebalanceReq,
        moves: list[mp.Move],
        concurrency: int,
    ) -> None:
        """Store the run, then start it (nothing starts if it cannot be stored)."""
        if self.running or self._starting:
            raise ChainfsError(Code.EBUSY, "a rebalance is already running")
        status = mp.RebalanceStatus(
            mode=req.mode, node_id=req.node_id, moves_total=len(moves), moves=moves, running=True
        )
        run = mp.RebalanceRun(status=status, concurrency=concurrency, started_ms=wall_ms())
        if req.HasField("rate_bytes_per_s"):
            run.rate_bytes_per_s = req.rate_bytes_per_s
        self._starting = True
        try:
            if self._persist is not None:
                await self._persist(run)
        finally:
            self._starting = False
        self._adopt(run)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _adopt(self, run: mp.RebalanceRun) -> None:
        self._status = mp.RebalanceStatus()
        self._status.CopyFrom(run.status)
        self._status.running = False  # status() says whether the task runs
        self._concurrency = max(run.concurrency, 1)
        self.rate_bytes_per_s = run.rate_bytes_per_s if run.HasField("rate_bytes_per_s") else None
        self._started_ms = run.started_ms
        self._started = time.monotonic() - max(wall_ms() - run.started_ms, 0) / 1000
        self._ended = 0.0

    def resume(self, run: mp.RebalanceRun) -> None:
        """On becoming primary: show the stored run, and go on with it if it had
        not finished (moves already done or failed stay so)."""
        self.stop()
        self._adopt(run)
        if not run.status.running:
            elapsed_s = run.status.elapsed_s
            self._ended = time.monotonic()
            self._started = self._ended - elapsed_s
            return
        log.info(
            "resuming the stored rebalance: %d of %d moves done, %d failed",
            run.status.moves_done,
            run.status.moves_total,
            run.status.moves_failed,
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """No longer primary: stop the run here (its stored record stays for the next)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self.rate_bytes_per_s = None
            self._ended = time.monotonic()
            log.warning("rebalance stopped here (no longer primary)")

    async def _save(self) -> None:
        """Store the run as it is now; a failure is logged (the run goes on: a
        move's chain changes are what a resume checks first)."""
        if self._persist is None:
            return
        async with self._persist_lock:
            try:
                await self._persist(self.run_record())
            except ChainfsError as e:
                log.warning("rebalance progress not stored: %s", e)

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)
        by_chain: dict[int, list[mp.Move]] = {}
        for m in self._status.moves:
            if m.state not in (mp.MOVE_DONE, mp.MOVE_FAILED):
                by_chain.setdefault(m.chain_id, []).append(m)

        async def chain_moves(moves: list[mp.Move]) -> None:
            for m in moves:  # one move at a time per chain
                async with slots:
                    await self._run_move(m)

        await asyncio.gather(*(chain_moves(ms) for ms in by_chain.values()))
        self.rate_bytes_per_s = None
        self._ended = time.monotonic()
        self._task = None  # finished: the record stored next says so
        await self._save()
        s = self._status
        log.info(
            "rebalance ended: %d of %d moves done, %d failed, %d bytes moved",
            s.moves_done,
            s.moves_total,
            s.moves_failed,
            s.bytes_moved,
        )

    async def _run_move(self, m: mp.Move) -> None:
        while True:
            try:
                after = await self._advance(m)
                break
            except ChainfsError as e:
                if e.code != Code.NOT_PRIMARY:
                    await self._fail(m, str(e))
                    return
            # Not primary for now: stepping down stops the run (stop()); a lease
            # renewed in time goes on from what the chain table shows.
            await asyncio.sleep(self._poll_ms / 1000)
        m.state = mp.MOVE_DONE
        await self._drop_old(m, after)
        m.bytes = self._used_bytes(m.to_target)
        self._status.moves_done += 1
        self._status.bytes_moved += m.bytes
        await self._save()
        log.info(
            "chain %d: target %d (node %d) replaced by %d (node %d), %d bytes",
            m.chain_id,
            m.from_target,
            m.from_node,
            m.to_target,
            m.to_node,
            m.bytes,
        )

    async def _advance(self, m: mp.Move) -> ClusterState:
        """Take ``m`` on from where the chain table shows it (a resumed run's
        record may lag it): join unless joined, wait until the new target
        serves, then the old one leaves unless gone. The state after."""
        chain = self._current().chain(m.chain_id)
        if chain is None or m.to_target not in chain.targets:
            await self._mutate(lambda s: _join(s, m))
            # The join placed it waiting; one more step now starts its sync at once.
            await self._mutate(lambda s: None)
        if m.state != mp.MOVE_SYNCING:
            m.state = mp.MOVE_SYNCING
            await self._save()
        await self._wait_serving(m)
        _, after = await self._mutate(lambda s: _leave(s, m))
        return after

    async def _wait_serving(self, m: mp.Move) -> None:
        deadline = time.monotonic() + self._move_timeout_s
        state = self._current()
        while True:
            t = state.target(m.to_target)
            if t is None or t.chain_id != m.chain_id:
                raise ChainfsError(Code.EAGAIN, f"target {m.to_target} left chain {m.chain_id}")
            if t.public_state == mp.SERVING:
                return
            if time.monotonic() > deadline:
                raise ChainfsError(
                    Code.ETIMEDOUT,
                    f"target {m.to_target} not serving after {self._move_timeout_s:.0f}s",
                )
            state = await self._wait_change(state.info.version, self._poll_ms)

    async def _drop_old(self, m: mp.Move, state: ClusterState) -> None:
        """Have the old target's node drop its chunks; a failure is noted on the move."""
        node = state.node(m.from_node)
        try:
            if node is None or node.status != mp.NODE_ONLINE:
                raise ChainfsError(Code.EHOSTUNREACH, f"node {m.from_node} is offline")
            async with StorageControl(
                node.rpc_address, self._drop_timeout_s, self._credential
            ) as control:
                await control.drop_chunks(m.from_target, state.info.version)
        except ChainfsError as e:
            m.error = f"chunks of target {m.from_target} kept: {e}"
            log.warning("chain %d: %s", m.chain_id, m.error)

    async def _fail(self, m: mp.Move, error: str) -> None:
        """Record a failed move; a new target that joined leaves its chain again."""
        log.warning(
            "chain %d: move %d -> %d failed: %s", m.chain_id, m.from_target, m.to_target, error
        )
        m.state = mp.MOVE_FAILED
        m.error = error
        self._status.moves_failed += 1
        try:
            await self._mutate(lambda s: _undo_join(s, m))
        except ChainfsError as e:
            m.error += f"; rollback failed: {e}"
        await self._save()  # after the rollback: a resume never keeps the new target


def _join(s: ClusterState, m: mp.Move) -> None:
    t = s.target(m.from_target)
    if t is None or t.chain_id != m.chain_id:
        raise ChainfsError(
            Code.EAGAIN, f"target {m.from_target} is no longer in chain {m.chain_id}"
        )
    s.update_chain(m.chain_id, [m.to_target], [])


def _leave(s: ClusterState, m: mp.Move) -> None:
    t = s.target(m.from_target)
    if t is not None and t.chain_id == m.chain_id:  # else it left before a failover
        s.update_chain(m.chain_id, [], [m.from_target])


def _undo_join(s: ClusterState, m: mp.Move) -> None:
    t = s.target(m.to_target)
    if t is not None and t.chain_id == m.chain_id and t.public_state != mp.SERVING:
        s.update_chain(m.chain_id, [], [m.to_target])
