"""Who may do what on a storage node's data plane.

Every frame first passes the access policy (chainfs.common.auth.policy, keyed
"storage.MsgType/<NAME>"). Then:

- a client (not a node) must show, for every chunk its request names, a
  capability meta signed: WRITE for updates and removes (issued to the
  request's client id), READ for reads, READ or WRITE for the last-chunk
  query (writers cut files too). A client never forwards: chain fields
  (from_target, update_version, full_chunk, indexes) are a node's alone.
- a node (chain peer, resync source, meta) needs no capability; whether a
  forward comes from the chain predecessor is CRAQ's check (it holds the
  chain), made with :func:`check_predecessor`.
- an admin may remove chunks without one (fsck drops orphans no file owns).

Without a cluster secret (``cluster_secret_file = ""``) nothing is checked.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from chainfs.common.auth import capability
from chainfs.common.auth.identity import Identity, Kind
from chainfs.common.auth.policy import authorize
from chainfs.common.auth.secret import capability_key
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.routing import Routing
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import mgmt_pb2 as mp
from chainfs.proto import storage_pb2 as sp

CAPABILITY_KEY_ID = 1  # the one capability key in use (meta signs with the same id)

# msg_type -> its key in the access policy.
POLICY_KEYS: dict[int, str] = {
    v: f"storage.MsgType/{name}" for name, v in sp.MsgType.items() if v != sp.MSG_TYPE_UNSPECIFIED
}


class Access:
    """The checks above for one node; ``secret`` None = authentication off."""

    def __init__(
        self, secret: bytes | None, max_caps_per_batch: int, passed_cache_entries: int
    ) -> None:
        self.enabled = secret is not None
        self._keys = (
            {CAPABILITY_KEY_ID: capability_key(secret, CAPABILITY_KEY_ID)}
            if secret is not None
            else {}
        )
        self._max_caps = max_caps_per_batch
        # Checks passed, with when they stop passing (expiry + skew): a client sends
        # the same capability with every request, and its HMAC is the check's cost.
        # Keyed by every signed field and the MAC, so only that very capability hits.
        # Oldest first; an OrderedDict drops its oldest in O(1) (a dict's first key
        # is found by stepping over the slots its earlier deletes left).
        self._passed: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._passed_bound = passed_cache_entries

    def sender(self, who: Identity) -> Identity | None:
        """Who CRAQ checks forwards against (None: authentication off, unchecked)."""
        return who if self.enabled else None

    def admit(self, msg_type: int, who: Identity, req: Any) -> None:
        """Raise unless ``who`` may send this parsed request (see the module docstring)."""
        if not self.enabled:
            return
        key = POLICY_KEYS.get(msg_type)
        authorize(key if key is not None else f"storage.MsgType/{msg_type}", who)
        if who.kind is Kind.NODE:
            return
        if msg_type == sp.BATCH_READ:  # the common case first
            self._check_reads(req)
        elif msg_type == sp.UPDATE:
            if req.from_target or req.update_version or req.full_chunk:
                raise ChainfsError(Code.EPERM, "only chain peers forward updates")
            self._check(req.capability, req.chunk.inode, capability.WRITE, req.req.client_id)
        elif msg_type == sp.REMOVE_CHUNKS:
            if req.from_target or req.indexes:
                raise ChainfsError(Code.EPERM, "only chain peers forward removes")
            if who.is_user and who.admin:
                return  # fsck --repair drops orphan chunks: no file, so no capability names them
            self._check(req.capability, req.inode, capability.WRITE, req.req.client_id)
        elif msg_type == sp.QUERY_LAST_CHUNK:
            self._check(req.capability, req.inode, 0)
            if not req.capability.rights & (capability.READ | capability.WRITE):
                raise ChainfsError(Code.BAD_CAPABILITY, "capability grants nothing")
        else:  # the policy lets clients send nothing else
            raise ChainfsError(Code.EPERM, f"{key} is for nodes only")

    def _check(
        self,
        cap: cpb.Capability,
        inode: int,
        rights: int,
        client_id: bytes | None = None,
        now_ms: float | None = None,
    ) -> None:
        """``now_ms``: the clock read once for a whole batch (else read here)."""
        # The MAC and every signed field, then what this check asks (one flat tuple).
        key = (
            cap.mac,
            cap.inode,
            cap.rights,
            cap.client_id,
            cap.expires_ms,
            cap.key_id,
            inode,
            rights,
            client_id,
        )
        until_ms = self._passed.get(key)
        if until_ms is not None:
            if now_ms is None:
                now_ms = time.time() * 1000
            if now_ms <= until_ms:
                return
        capability.check(self._keys, cap, inode, rights, client_id)
        if len(self._passed) >= self._passed_bound:
            self._passed.popitem(last=False)
        self._passed[key] = cap.expires_ms + capability.CLOCK_SKEW_MS

    def _check_reads(self, req: sp.BatchReadReq) -> None:
        """One READ capability per distinct inode of the batch, each checked once."""
        caps = req.capabilities
        if len(caps) > self._max_caps:
            raise ChainfsError(
                Code.E2BIG, f"{len(caps)} capabilities in one batch (bound {self._max_caps})"
            )
        by_inode = {cap.inode: cap for cap in caps}
        now_ms = time.time() * 1000  # once per batch, not per capability
        for inode in {io.chunk.inode for io in req.ios}:
            cap = by_inode.get(inode)
            if cap is None:
                raise ChainfsError(Code.BAD_CAPABILITY, f"no capability for inode {inode}")
            self._check(cap, inode, capability.READ, None, now_ms)


def _last_before(
    routing: Routing, chain: mp.ChainInfo, target_id: int, states: tuple[int, ...]
) -> int | None:
    ids = list(chain.targets)
    if target_id not in ids:
        return None
    for tid in reversed(ids[: ids.index(target_id)]):
        t = routing.targets.get(tid)
        if t is not None and t.public_state in states:
            return int(tid)
    return None


def write_predecessor(routing: Routing, chain: mp.ChainInfo, target_id: int) -> int | None:
    """The target that forwards updates to ``target_id``: the last one before it
    in the chain that takes writes (CRAQ's successor rule, backwards)."""
    return _last_before(routing, chain, target_id, (mp.SERVING, mp.SYNCING))


def sync_source(routing: Routing, chain: mp.ChainInfo, target_id: int) -> int | None:
    """The target that resyncs ``target_id`` (its sync source): the last SERVING one before it."""
    return _last_before(routing, chain, target_id, (mp.SERVING,))


def check_predecessor(
    routing: Routing,
    chain: mp.ChainInfo,
    target_id: int,
    from_target: int,
    sender: Identity | None,
    what: str,
) -> None:
    """Raise unless ``sender`` is the node of ``from_target`` and ``from_target``
    is ``target_id``'s predecessor in ``routing`` (the one forwarding writes, or
    the resync source). A node that is not: STALE_CHAIN_VERSION (retryable: one of
    us may hold old routing); anyone else: EPERM. ``sender`` None: unchecked."""
    if sender is None:
        return
    if not sender.is_node:
        raise ChainfsError(Code.EPERM, f"{what} from {sender.describe()}: only chain peers send it")
    allowed = {write_predecessor(routing, chain, target_id), sync_source(routing, chain, target_id)}
    info = routing.targets.get(from_target)
    if from_target not in allowed or info is None or info.node_id != sender.node_id:
        raise ChainfsError(
            Code.STALE_CHAIN_VERSION,
            f"{what} to target {target_id} from target {from_target} on {sender.describe()}: "
            f"not its predecessor in chain {chain.chain_id} v{chain.chain_version} "
            f"(routing v{routing.version})",
        )
