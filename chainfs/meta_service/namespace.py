"""The POSIX namespace on the transactional KV store.

Every operation is one KV transaction (re-run on conflict), so several meta
servers may serve one store. Operations that must also change storage
(shrinking truncate, exact length) do the storage part first, outside the
transaction, then commit the metadata; the transaction checks the file is
still the one the storage step worked on.

Mutating requests carrying a client id and request id leave their answer under
``IDEM|client|request`` in the same transaction: a retry gets the first answer
instead of running again.
"""

from __future__ import annotations

from chainfs.meta_service.ops.attr import AttrOps
from chainfs.meta_service.ops.context import ClusterView, Tag
from chainfs.meta_service.ops.create import CreateOps
from chainfs.meta_service.ops.locks import LockOps
from chainfs.meta_service.ops.lookup import LookupOps
from chainfs.meta_service.ops.publish import PublishOps
from chainfs.meta_service.ops.remove import RemoveOps
from chainfs.meta_service.ops.rename import RenameOps
from chainfs.meta_service.ops.session import SessionOps
from chainfs.meta_service.ops.special import SpecialOps
from chainfs.meta_service.ops.xattr import XattrOps

__all__ = ["ClusterView", "Namespace", "Tag"]


class Namespace(
    PublishOps,
    LookupOps,
    SessionOps,
    CreateOps,
    RemoveOps,
    RenameOps,
    AttrOps,
    XattrOps,
    SpecialOps,
    LockOps,
):
    """Every namespace operation, one family per module of ``meta_service.ops``."""
