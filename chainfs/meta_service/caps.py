"""The capabilities meta signs: at open, and for readers that never open (a stat
with ``want_capability``). Storage checks them on every data-plane request
(chainfs.storage_service.access), so what a client may touch is decided here,
by the same permission check as open(2)."""

from __future__ import annotations

from chainfs.common.auth import capability
from chainfs.common.auth.secret import capability_key, load_secret
from chainfs.meta_service import perm
from chainfs.meta_service.config import MetaConfig
from chainfs.meta_service.ctx import FILE
from chainfs.proto import common_pb2 as cpb
from chainfs.proto import meta_pb2 as pb

KEY_ID = 1  # storage checks with the key of the same id (storage_service.access)
# Expiries are rounded up to 1/REUSE_STEPS of the lifetime (37.5 s of the default
# 10 minutes), so a capability lives between ttl and ttl + ttl/REUSE_STEPS, and
# the grants of one step are identical. A client that looks its keys up again
# often (the KV cache renews its locations, with capabilities, every ~0.7 s)
# then sends storage a capability it has already checked, not a new one each time.
REUSE_STEPS = 16
_PERM_OF = ((capability.READ, perm.R), (capability.WRITE, perm.W))


class CapabilitySigner:
    """Signs capabilities with the cluster's capability key, for ``ttl_ms``."""

    def __init__(self, secret: bytes, ttl_ms: int) -> None:
        self._key = capability_key(secret, KEY_ID)
        self.ttl_ms = ttl_ms
        self.step_ms = max(1, ttl_ms // REUSE_STEPS)

    @classmethod
    def from_config(cls, cfg: MetaConfig) -> CapabilitySigner | None:
        """None without a cluster secret (authentication off: nothing is signed)."""
        if not cfg.cluster_secret_file:
            return None
        return cls(load_secret(cfg.cluster_secret_file), cfg.capability_ttl_ms)

    def sign(self, inode: int, rights: int, client_id: bytes) -> cpb.Capability:
        return capability.sign(
            self._key, KEY_ID, inode, rights, client_id, self.ttl_ms, self.step_ms
        )

    def grant(
        self, inode: pb.Inode, rights: int, caller: perm.Caller, client_id: bytes
    ) -> cpb.Capability | None:
        """A capability for ``rights`` on a regular file the caller may access so
        (as open checks it); None for anything else."""
        if inode.type != FILE or not rights or rights & ~(capability.READ | capability.WRITE):
            return None
        want = sum(p for right, p in _PERM_OF if rights & right)
        if not perm.allowed(inode, want, caller):
            return None
        return self.sign(inode.ino, rights, client_id)


def open_rights(read: bool, write: bool) -> int:
    """The rights an open grants: what it was opened for."""
    return (capability.READ if read else 0) | (capability.WRITE if write else 0)
