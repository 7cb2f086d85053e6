"""Thin clients of mgmtd, shared by services and the user-facing client.

- :class:`MgmtClient`: every mgmtd RPC, over gRPC (services, admin tools).
- :class:`FramedMgmtClient`: what the user-facing client needs (routing info
  and its updates, status) over the framed transport, with no gRPC import:
  it survives fork() (see :mod:`.mgmt_wire`).

  Both, given one or more mgmtd addresses, try them in turn, follow a
  NOT_PRIMARY answer to the primary it names, and give up with
  ``UNAVAILABLE`` once ``timeout_s`` has passed (never hangs).
- :class:`RoutingCache`: the latest routing info, refreshed by a watch
  (falling back to polling while the watch is down) or on demand after a
  stale-chain-version rejection.
- :class:`HeartbeatLoop`: registration plus periodic heartbeats of a meta or
  storage node; ``last_ack_monotonic`` lets storage fence itself.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from chainfs.common.auth.secret import node_credential
from chainfs.common.auth.tokens import resolve_token
from chainfs.common.background import Periodic, cancel_and_wait
from chainfs.common.dataplane.client import DataClient
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.common.rpc import mgmt_wire
from chainfs.common.rpc.retry import Backoff, RetryPolicy
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp

if TYPE_CHECKING:  # gRPC is imported only by MgmtClient, never on the framed client's path
    from chainfs.common.rpc.grpc_util import Stubs
    from chainfs.proto import mgmt_pb2_grpc as mg

log = logging.getLogger(__name__)

# A NOT_PRIMARY answer names the primary as "... primary is at HOST:PORT".
NOT_PRIMARY_HINT = "primary is at "
_HINT_RE = re.compile(re.escape(NOT_PRIMARY_HINT) + r"(\S+)")

# Registration: a node waiting for mgmtd to come up retries at least every
# 2 s, until register_timeout_s.
REGISTER_RETRY = RetryPolicy(backoff_max_s=2.0)
MIN_ATTEMPT_TIMEOUT_S = 0.5  # one address never gets less than this (unless time is up)
MAX_KNOWN_ADDRESSES = 64  # bound on addresses learnt from NOT_PRIMARY hints


def env_credential() -> cpb.Credential:
    """The token of $CHAINFS_TOKEN (or the file $CHAINFS_TOKEN_FILE names);
    an empty credential (anonymous) if neither is set."""
    return cpb.Credential(token=resolve_token() or "")


def not_primary_message(primary_address: str | None) -> str:
    """The NOT_PRIMARY message mgmtd sends (parsed back by :func:`primary_hint`)."""
    if primary_address:
        return f"this mgmtd is not the primary; {NOT_PRIMARY_HINT}{primary_address}"
    return "this mgmtd is not the primary; no primary elected yet"


def primary_hint(message: str) -> str | None:
    m = _HINT_RE.search(message)
    return m.group(1) if m else None


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """``"h:p,h:p"`` or a list (whose items may be such strings too) -> list of
    non-empty, de-duplicated addresses."""
    items = [a for item in ([addresses] if isinstance(addresses, str) else addresses)
             for a in item.split(",")]  # fmt: skip
    out: list[str] = []
    for a in items:
        a = a.strip()
        if a and a not in out:
            out.append(a)
    if not out:
        raise ChainfsError(Code.EINVAL, f"no mgmtd address given ({addresses!r})")
    return out


@dataclass
class _Outcome:
    maybe_applied: bool = False


class BaseMgmtClient(abc.ABC):
    """Calls mgmtd, finding the primary among ``addresses``; subclasses carry one call."""

    def __init__(
        self,
        addresses: str | list[str],
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        credential: cpb.Credential | None = None,
    ) -> None:
        """``retry``: the pauses after every address failed once (default RetryPolicy()).
        ``credential``: a user's token or a node's key, sent with every call;
        None = :func:`env_credential` (admin tools), an empty one = none."""
        if timeout_s <= 0:
            raise ChainfsError(Code.EINVAL, f"timeout_s must be > 0, not {timeout_s}")
        self.addresses = parse_addresses(addresses)
        self._configured = list(self.addresses)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._primary: str | None = None  # last address that answered as primary
        self.credential = credential if credential is not None else env_credential()

    @property
    def primary_address(self) -> str | None:
        """The mgmtd that answered last (the primary, as far as we know)."""
        return self._primary

    @abc.abstractmethod
    async def _attempt(self, addr: str, method: str, request: Any, timeout_s: float) -> Any:
        """One call of ``method`` at mgmtd ``addr`` (ChainfsError on failure)."""

    def _candidates(self) -> list[str]:
        if self._primary is None:
            return list(self.addresses)
        return [self._primary] + [a for a in self.addresses if a != self._primary]

    def _learn(self, address: str) -> None:
        if address not in self.addresses and len(self.addresses) < MAX_KNOWN_ADDRESSES:
            self.addresses.append(address)

    def _unreachable(self, last: ChainfsError | None) -> ChainfsError:
        why = f" ({last})" if last is not None else ""
        return ChainfsError(
            Code.UNAVAILABLE, f"cannot reach mgmtd at {','.join(self._configured)}{why}"
        )

    async def _call(
        self,
        method: str,
        request: Any,
        timeout_s: float | None = None,
        outcome: _Outcome | None = None,
        min_attempt_s: float = MIN_ATTEMPT_TIMEOUT_S,
    ) -> Any:
        """Call ``method`` on the primary; retry other addresses until the deadline.

        ``outcome.maybe_applied`` is set when an attempt failed in a way that
        may have hidden a success (timeout, connection lost). One address gets
        at least ``min_attempt_s`` (a long poll: longer than its wait)."""
        total = self.timeout_s if timeout_s is None else timeout_s
        backoff = Backoff(self.retry, total)
        last: ChainfsError | None = None
        while True:
            queue = self._candidates()
            tried: set[str] = set()
            while queue:
                addr = queue.pop(0)
                if addr in tried:
                    continue
                tried.add(addr)
                remaining = backoff.remaining_s()
                if remaining <= 0:
                    raise self._unreachable(last)
                share = max(total / max(len(self.addresses), 1), min_attempt_s)
                try:
                    rsp = await self._attempt(addr, method, request, min(remaining, share))
                except ChainfsError as e:
                    if e.code == Code.NOT_PRIMARY:
                        last = e
                        self._follow_hint(addr, e, queue, tried)
                        continue
                    if e.code in (Code.UNAVAILABLE, Code.ETIMEDOUT):
                        last = e
                        if outcome is not None:
                            outcome.maybe_applied = True
                        if self._primary == addr:
                            self._primary = None
                        continue
                    raise
                self._primary = addr
                return rsp
            if not await backoff.wait():
                raise self._unreachable(last)

    def _follow_hint(self, addr: str, e: ChainfsError, queue: list[str], tried: set[str]) -> None:
        """``addr`` is not the primary: try the one it names next."""
        hint = primary_hint(e.message)
        if hint and hint != addr:
            self._learn(hint)
            self._primary = hint
            if hint not in tried:
                queue.insert(0, hint)
        elif self._primary == addr:
            self._primary = None

    async def get_routing(self, known_version: int = 0) -> Routing | None:
        """The current routing info, or None when ``known_version`` is current."""
        rsp: mp.GetRoutingInfoRsp = await self._call(
            "GetRoutingInfo", mp.GetRoutingInfoReq(known_version=known_version)
        )
        if rsp.unchanged:
            return None
        return Routing(rsp.routing)

    async def get_status(self) -> mp.GetStatusRsp:
        rsp: mp.GetStatusRsp = await self._call("GetStatus", mp.GetStatusReq())
        return rsp

    @abc.abstractmethod
    def watch_routing(self, known_version: int = 0) -> AsyncIterator[Routing]:
        """Routing info now (if newer than ``known_version``) and after every
        change; ends by raising ChainfsError when the watch breaks (callers re-watch)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class MgmtClient(BaseMgmtClient):
    """Every mgmtd RPC over gRPC (services and admin tools)."""

    _stubs: Stubs[mg.MgmtStub] | None = None  # made on the first call (grpc imported then)
    _stubs_credential: cpb.Credential | None = None  # what the current stubs send
    _retired: list[Stubs[mg.MgmtStub]] | None = None  # stubs of an earlier credential
    _closed = False

    def use_credential(self, credential: cpb.Credential) -> None:
        """Send ``credential`` from the next call on (a node once it has its id)."""
        self.credential = credential

    def _stub(self, address: str) -> mg.MgmtStub:
        if self._stubs is not None and self._stubs_credential != self.credential:
            # Calls in flight finish on their channels; close() closes them. A
            # node changes its credential once (join key -> its own), so few pile up.
            self._retired = [*(self._retired or []), self._stubs]
            self._stubs = None
        if self._stubs is None:
            from chainfs.common.rpc import grpc_util
            from chainfs.proto import mgmt_pb2_grpc

            self._stubs = grpc_util.Stubs(mgmt_pb2_grpc.MgmtStub, "MgmtClient", self.credential)
            self._stubs_credential = self.credential
            self._stubs.closed = self._closed
        return self._stubs.get(address)

    async def _attempt(self, addr: str, method: str, request: Any, timeout_s: float) -> Any:
        from chainfs.common.rpc import grpc_util

        return await grpc_util.call(getattr(self._stub(addr), method), request, timeout_s, addr)

    # -- RPCs --------------------------------------------------------------
    async def register_node(
        self, node: mp.NodeInfo, targets: Sequence[mp.TargetInfo] = (), reregister: bool = False
    ) -> mp.RegisterNodeRsp:
        """Register ``node`` (node_id 0: mgmtd assigns one) with its targets.

        If an attempt failed ambiguously and a retry then finds the node already
        registered, that was our own attempt: it is taken over by re-registering.
        """
        req = mp.RegisterNodeReq(node=node, targets=list(targets), reregister=reregister)
        outcome = _Outcome()
        try:
            rsp: mp.RegisterNodeRsp = await self._call("RegisterNode", req, outcome=outcome)
        except ChainfsError as e:
            if e.code != Code.ALREADY_REGISTERED or not outcome.maybe_applied or reregister:
                raise
            req.reregister = True
            rsp = await self._call("RegisterNode", req)
        return rsp

    async def heartbeat(
        self, req: mp.HeartbeatReq, timeout_s: float | None = None
    ) -> mp.HeartbeatRsp:
        rsp: mp.HeartbeatRsp = await self._call("Heartbeat", req, timeout_s)
        return rsp

    async def watch_routing(self, known_version: int = 0) -> AsyncGenerator[Routing, None]:
        """Routing info now (if newer than ``known_version``) and after every change.

        Streams from the primary (found with one GetRoutingInfo call first). Ends
        by raising ChainfsError when the stream breaks, e.g. the primary died or
        stepped down; callers re-watch.
        """
        import grpc.aio

        from chainfs.common.rpc import grpc_util

        first = await self.get_routing(known_version)
        if first is not None:
            known_version = first.version
            yield first
        addr = self._primary
        assert addr is not None, "a successful call sets the primary"
        stream = self._stub(addr).WatchRoutingInfo(
            mp.WatchRoutingInfoReq(known_version=known_version)
        )
        try:
            async for info in stream:
                if info.version > known_version:
                    known_version = info.version
                    yield Routing(info)
        except grpc.aio.AioRpcError as e:
            err = grpc_util.error_from_rpc(e, addr)
            if err.code == Code.NOT_PRIMARY and self._primary == addr:
                self._primary = None
            raise err from None
        finally:
            stream.cancel()
        raise ChainfsError(Code.UNAVAILABLE, f"routing watch stream from {addr} ended")

    async def create_chains(
        self, replicas: int, num_chains: int = 0, init: bool = False
    ) -> mp.CreateChainsRsp:
        """Chains of ``replicas`` targets from targets not yet in a chain.

        ``init=True`` (init-cluster) fails with EEXIST if any chain exists.
        """
        req = mp.CreateChainsReq(replicas=replicas, num_chains=num_chains, init=init)
        rsp: mp.CreateChainsRsp = await self._call("CreateChains", req)
        return rsp

    async def update_target(self, target_id: int, action: int) -> mp.UpdateTargetRsp:
        req = mp.UpdateTargetReq(target_id=target_id, action=action)  # type: ignore[arg-type]
        rsp: mp.UpdateTargetRsp = await self._call("UpdateTarget", req)
        return rsp

    async def update_chain(
        self, chain_id: int, add_targets: Sequence[int] = (), remove_targets: Sequence[int] = ()
    ) -> mp.UpdateChainRsp:
        req = mp.UpdateChainReq(
            chain_id=chain_id, add_targets=list(add_targets), remove_targets=list(remove_targets)
        )
        rsp: mp.UpdateChainRsp = await self._call("UpdateChain", req)
        return rsp

    async def add_targets(self, node_id: int, targets: Sequence[mp.TargetInfo]) -> mp.AddTargetsRsp:
        """Register new targets of running storage node ``node_id`` (ids assigned).

        If an attempt failed ambiguously and a retry then finds the paths taken
        (EEXIST), that was our own attempt: its ids are read from routing info.
        """
        req = mp.AddTargetsReq(node_id=node_id, targets=list(targets))
        outcome = _Outcome()
        try:
            rsp: mp.AddTargetsRsp = await self._call("AddTargets", req, outcome=outcome)
        except ChainfsError as e:
            if e.code != Code.EEXIST or not outcome.maybe_applied:
                raise
            routing = await self.get_routing(0)
            assert routing is not None
            by_path = {
                t.path: t for t in routing.info.targets if t.node_id == node_id and not t.chain_id
            }
            if not all(t.path in by_path for t in targets):
                raise
            return mp.AddTargetsRsp(
                target_ids=[by_path[t.path].target_id for t in targets], routing=routing.info
            )
        return rsp

    async def rebalance(self, req: mp.RebalanceReq) -> mp.RebalanceRsp:
        """Plan (``dry_run``) or start a rebalance; the plan and the status."""
        rsp: mp.RebalanceRsp = await self._call("Rebalance", req)
        return rsp

    async def rebalance_status(self) -> mp.RebalanceStatus:
        rsp: mp.GetRebalanceStatusRsp = await self._call(
            "GetRebalanceStatus", mp.GetRebalanceStatusReq()
        )
        return rsp.status

    async def get_config(self, key: str = "") -> mp.GetConfigRsp:
        """One key (``values`` empty if unset) or all keys (``key=""``)."""
        rsp: mp.GetConfigRsp = await self._call("GetConfig", mp.GetConfigReq(key=key))
        return rsp

    async def set_config(self, key: str, value: str) -> int:
        """Store ``key=value``; returns the new config version."""
        rsp: mp.SetConfigRsp = await self._call("SetConfig", mp.SetConfigReq(key=key, value=value))
        return rsp.version

    async def user_add(self, user: mp.User) -> mp.UserAddRsp:
        """A new user (admin only); the reply carries its token, shown this once."""
        rsp: mp.UserAddRsp = await self._call("UserAdd", mp.UserAddReq(user=user))
        return rsp

    async def user_list(self) -> list[mp.User]:
        rsp: mp.UserListRsp = await self._call("UserList", mp.UserListReq())
        return list(rsp.users)

    async def user_remove(self, name: str) -> None:
        await self._call("UserRemove", mp.UserRemoveReq(name=name))

    async def token_rotate(self, name: str) -> str:
        """A new token for ``name``; its older tokens stop working."""
        rsp: mp.TokenRotateRsp = await self._call("TokenRotate", mp.TokenRotateReq(name=name))
        return rsp.token

    async def user_directory(self, known_version: int = 0) -> mp.GetUserDirectoryRsp:
        """Token hashes -> users (nodes only), unless ``known_version`` is current."""
        req = mp.GetUserDirectoryReq(known_version=known_version)
        rsp: mp.GetUserDirectoryRsp = await self._call("GetUserDirectory", req)
        return rsp

    async def close(self) -> None:
        self._closed = True
        for stubs in [*(self._retired or []), self._stubs]:
            if stubs is not None:
                await stubs.close()


class FramedMgmtClient(BaseMgmtClient):
    """Routing info, its updates and status over the framed transport (the
    user-facing client's mgmtd client: no gRPC, so it survives fork()).

    ``addresses`` are the mgmtd addresses users pass (gRPC host:port); each
    mgmtd serves the framed protocol at :func:`mgmt_wire.frame_address_of`.
    """

    def __init__(
        self,
        addresses: str | list[str],
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        dataplane: DataPlaneConfig | None = None,
        watch_wait_s: float = 10.0,
        credential: cpb.Credential | None = None,
    ) -> None:
        """``watch_wait_s``: how long one long poll of the routing watch waits for a change."""
        super().__init__(addresses, timeout_s, retry, credential)
        for a in self.addresses:
            mgmt_wire.frame_address_of(a)  # EINVAL now for an address that is not host:port
        if watch_wait_s <= 0:
            raise ChainfsError(Code.EINVAL, f"watch_wait_s must be > 0, not {watch_wait_s}")
        self.watch_wait_s = watch_wait_s
        self._dp = DataClient(dataplane, credential)

    async def _attempt(self, addr: str, method: str, request: Any, timeout_s: float) -> Any:
        w = mgmt_wire.WIRE_METHODS[method]
        reply = await self._dp.request(
            mgmt_wire.frame_address_of(addr),
            w.msg_type,
            request.SerializeToString(),
            timeout_s=timeout_s,
        )
        return w.response.FromString(bytes(reply.header))

    async def watch_routing(self, known_version: int = 0) -> AsyncGenerator[Routing, None]:
        """Long polls of GetRoutingInfo: each returns once the version differs
        from ours or after ``watch_wait_s``; follows the primary like every call."""
        wait_ms = int(self.watch_wait_s * 1000)
        while True:
            req = mp.GetRoutingInfoReq(known_version=known_version, wait_ms=wait_ms)
            rsp: mp.GetRoutingInfoRsp = await self._call(
                "GetRoutingInfo",
                req,
                timeout_s=self.watch_wait_s + self.timeout_s,
                min_attempt_s=self.watch_wait_s + MIN_ATTEMPT_TIMEOUT_S,
            )
            if rsp.unchanged:
                continue
            # Adopt what mgmtd has even if older (never seen: versions only
            # grow), so the next poll waits instead of returning at once.
            newer = rsp.routing.version > known_version
            known_version = rsp.routing.version
            if newer:
                yield Routing(rsp.routing)

    async def close(self) -> None:
        await self._dp.close()


class RoutingCache:
    """The latest routing info, kept fresh in the background once started."""

    def __init__(self, mgmt: BaseMgmtClient, refresh_interval_s: float = 1.0) -> None:
        if refresh_interval_s <= 0:
            raise ChainfsError(Code.EINVAL, "refresh_interval_s must be > 0")
        self.mgmt = mgmt
        self.refresh_interval_s = refresh_interval_s
        self._routing: Routing | None = None
        self._listeners: list[Callable[[Routing], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._fetch_lock = asyncio.Lock()
        # Set (and replaced by a fresh one) whenever a newer version is installed.
        self._changed = asyncio.Event()
        self._start_on_fetch = False  # start() once the first fetch succeeded

    @property
    def version(self) -> int:
        """Version of the cached routing info (0 before the first fetch)."""
        return self._routing.version if self._routing is not None else 0

    @property
    def current(self) -> Routing | None:
        return self._routing

    def add_listener(self, cb: Callable[[Routing], None]) -> None:
        """Call ``cb(routing)`` after every newer version is installed."""
        self._listeners.append(cb)

    def remove_listener(self, cb: Callable[[Routing], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(cb)

    def install(self, routing: Routing) -> bool:
        """Adopt ``routing`` if newer than the cached one; True if adopted."""
        if self._routing is not None and routing.version <= self._routing.version:
            return False
        self._routing = routing
        for cb in list(self._listeners):
            try:
                cb(routing)
            except Exception:
                log.exception("routing listener %r failed", cb)
        # Wake wait_for() callers synchronously: a notify task created here and
        # never kept could be collected before it ran, losing the wake-up.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def get(self) -> Routing:
        """The cached routing info; the first call fetches it."""
        if self._routing is None:
            return await self.refresh()
        return self._routing

    async def refresh(self, min_version: int = 0) -> Routing:
        """Fetch from mgmtd now; with ``min_version``, keep trying (within the
        client timeout) until at least that version is seen."""
        backoff = Backoff(self.mgmt.retry, self.mgmt.timeout_s)
        while True:
            async with self._fetch_lock:
                fresh = await self.mgmt.get_routing(self.version)
                if fresh is not None:
                    self.install(fresh)
                if self._start_on_fetch:
                    self._start_on_fetch = False
                    self.start()
            assert self._routing is not None, "a first fetch always returns routing info"
            if self._routing.version >= min_version or not await backoff.wait():
                return self._routing

    async def wait_for(self, predicate: Callable[[Routing], bool], timeout_s: float) -> Routing:
        """Wait (bounded) until the cached routing satisfies ``predicate``."""
        async with asyncio.timeout(timeout_s):
            while self._routing is None or not predicate(self._routing):
                await self._changed.wait()
            return self._routing

    def start(self) -> None:
        """Refresh in the background: a watch stream, polling while it is down."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def start_after_first_fetch(self) -> None:
        """Start the background refresh once a fetch has succeeded (a lazy
        connection: this needs no running event loop)."""
        self._start_on_fetch = True

    async def stop(self) -> None:
        self._start_on_fetch = False
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                async for routing in self.mgmt.watch_routing(self.version):
                    self.install(routing)
            except asyncio.CancelledError:
                raise
            except ChainfsError as e:
                log.debug("routing watch interrupted: %s", e)
            except Exception:
                log.exception("routing watch failed")
            # Stream down: poll once, then try to watch again after the interval.
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except ChainfsError as e:
                log.debug("routing poll failed: %s", e)


def local_state_for(public_state: int, sync_done: bool = False) -> int:
    """The local state a healthy storage target reports in heartbeats (3FS rules).

    UPTODATE while it is serving (or in no chain yet), or once its resync has
    finished (``sync_done``, i.e. after syncDone while SYNCING); ONLINE while it
    is waiting, syncing, or marked offline/lastsrv (a target that comes back
    after a restart or a missed-heartbeat timeout starts here: mgmtd moves it
    offline -> waiting -> syncing, and to serving only when it reports
    UPTODATE while syncing). A WAITING target that reports UPTODATE stays
    waiting. A failed disk reports LOCAL_OFFLINE instead.
    """
    if public_state in (mp.SERVING, mp.PUBLIC_STATE_UNSPECIFIED) or sync_done:
        return mp.UPTODATE
    return mp.ONLINE


class HeartbeatLoop:
    """Register a node with mgmtd, then heartbeat it in the background.

    Re-registration (a restarted node with its old id) marks all the node's
    targets locally offline at mgmtd: whatever they held must be resynced
    before they serve again; report local states with :func:`local_state_for`.

    ``targets_fn()`` gives the per-target report of each heartbeat.
    ``on_routing`` is called with every newer routing info mgmtd piggybacks,
    ``on_response`` with every heartbeat answer.
    ``interval_s=None`` uses the interval mgmtd answers at registration.
    ``targets`` are registered with the node (storage); their ids are in
    ``target_ids`` after :meth:`start`. A node with a non-zero ``node_id``
    re-registers (keeps its id and targets) unless ``reregister=False``.
    With the cluster ``secret``, ``mgmt`` presents this node's credential
    (the join credential until mgmtd assigned an id).
    """

    def __init__(
        self,
        mgmt: MgmtClient,
        node: mp.NodeInfo,
        targets_fn: Callable[[], list[mp.TargetHeartbeat]],
        on_routing: Callable[[Routing], None] | None = None,
        interval_s: float | None = None,
        *,
        targets: Sequence[mp.TargetInfo] = (),
        reregister: bool | None = None,
        register_timeout_s: float = 60.0,
        on_response: Callable[[mp.HeartbeatRsp], None] | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.mgmt = mgmt
        self.on_response = on_response
        self.secret = secret
        self.node = mp.NodeInfo()
        self.node.CopyFrom(node)
        self.targets_fn = targets_fn
        self.on_routing = on_routing
        self._interval_s = interval_s
        self._targets = list(targets)
        self._reregister = reregister
        self.register_timeout_s = register_timeout_s
        self.register_rsp: mp.RegisterNodeRsp | None = None
        self.target_ids: list[int] = []
        self.heartbeat_timeout_s = 0.0
        self.last_ack_monotonic = 0.0  # send time of the last acknowledged heartbeat
        self.routing_version = 0
        self.failures = 0  # consecutive failed heartbeats
        self._beats: _Beats | None = None

    @property
    def node_id(self) -> int:
        return self.node.node_id

    @property
    def interval_s(self) -> float:
        if self._interval_s is not None:
            return self._interval_s
        if self.register_rsp is not None and self.register_rsp.heartbeat_interval_ms:
            return self.register_rsp.heartbeat_interval_ms / 1000.0
        return 1.0

    def since_last_ack_s(self) -> float:
        return time.monotonic() - self.last_ack_monotonic

    async def start(self) -> None:
        """Register (retrying unreachable/not-primary mgmtd with bounded backoff),
        then heartbeat in the background."""
        await self._register(self._reregister)
        self._beats = _Beats(self)
        self._beats.start()

    async def _register(self, reregister: bool | None) -> None:
        rereg = reregister if reregister is not None else self.node.node_id != 0
        self._present_credential()
        backoff = Backoff(REGISTER_RETRY, self.register_timeout_s)
        maybe_applied = False  # a failed attempt may have registered us before failing
        while True:
            sent = time.monotonic()
            try:
                rsp = await self.mgmt.register_node(self.node, self._targets, reregister=rereg)
                break
            except ChainfsError as e:
                if e.code == Code.ALREADY_REGISTERED and maybe_applied and not rereg:
                    # Our own earlier attempt got through: take that registration over.
                    rereg = True
                    continue
                if e.code not in (Code.UNAVAILABLE, Code.NOT_PRIMARY, Code.ETIMEDOUT):
                    raise
                maybe_applied = maybe_applied or e.code != Code.NOT_PRIMARY
                log.warning("registration failed (%s); retrying", e)
                if not await backoff.wait():
                    raise ChainfsError(
                        e.code,
                        f"node registration gave up after {self.register_timeout_s}s: {e.message}",
                    ) from None
        self.register_rsp = rsp
        self.node.node_id = rsp.node_id
        self._present_credential()
        self.target_ids = list(rsp.target_ids)
        for t, tid in zip(self._targets, rsp.target_ids, strict=False):
            t.target_id = tid
            t.node_id = rsp.node_id
        self.heartbeat_timeout_s = rsp.heartbeat_timeout_ms / 1000.0
        self.last_ack_monotonic = sent
        self._deliver(rsp.routing)

    def _present_credential(self) -> None:
        if self.secret is not None:
            self.mgmt.use_credential(node_credential(self.secret, self.node.node_id))

    def _deliver(self, info: mp.RoutingInfo) -> None:
        if info.version <= self.routing_version:
            return
        self.routing_version = info.version
        if self.on_routing is not None:
            try:
                self.on_routing(Routing(info))
            except Exception:
                log.exception("on_routing callback failed")

    def add_registered_targets(self, targets: Sequence[mp.TargetInfo]) -> None:
        """Targets added after start (with their ids): a later re-registration
        (mgmtd lost the node) registers them too."""
        self._targets.extend(targets)
        self.target_ids.extend(t.target_id for t in targets)

    def beat_soon(self) -> None:
        """Send the next heartbeat now rather than at the interval (a state change
        mgmtd is waiting for, e.g. a finished resync)."""
        if self._beats is not None:
            self._beats.wake()

    async def beat_once(self) -> mp.HeartbeatRsp:
        """Send one heartbeat now (also used by tests)."""
        req = mp.HeartbeatReq(
            node_id=self.node.node_id,
            targets=self.targets_fn(),
            routing_version=self.routing_version,
        )
        # One heartbeat may not take longer than a few intervals; mgmtd failover
        # is ridden out by the next ones.
        timeout_s = min(self.mgmt.timeout_s, max(2 * self.interval_s, MIN_ATTEMPT_TIMEOUT_S))
        sent = time.monotonic()
        rsp = await self.mgmt.heartbeat(req, timeout_s=timeout_s)
        self.last_ack_monotonic = sent
        self.failures = 0
        if rsp.HasField("routing"):
            self._deliver(rsp.routing)
        if self.on_response is not None:
            self.on_response(rsp)
        return rsp

    async def beat_round(self) -> None:
        """One heartbeat; a node mgmtd lost is registered again."""
        try:
            await self.beat_once()
        except ChainfsError as e:
            self.failures += 1
            if e.code == Code.UNKNOWN_NODE:
                log.warning("mgmtd does not know node %d; re-registering", self.node_id)
                try:
                    await self._register(True)
                except ChainfsError as e2:
                    log.warning("re-registration failed: %s", e2)
                if self._beats is not None:
                    self._beats.interval_s = self.interval_s
            elif self.failures == 1 or self.failures % 10 == 0:
                log.warning("heartbeat failed (%d in a row): %s", self.failures, e)
        except Exception:
            self.failures += 1
            log.exception("heartbeat failed")

    async def stop(self) -> None:
        beats, self._beats = self._beats, None
        if beats is not None:
            await beats.stop()


class _Beats(Periodic):
    """Runs a :class:`HeartbeatLoop`'s heartbeats, one every interval."""

    name = "heartbeat"
    fixed_rate = True  # a slow heartbeat must not delay the next one

    def __init__(self, owner: HeartbeatLoop) -> None:
        super().__init__(owner.interval_s)
        self.owner = owner

    async def round(self) -> bool:
        await self.owner.beat_round()
        return False
