"""What the meta service and its clients agree on beyond the protobuf messages:
the flag bits of rename, setxattr and fallocate, the open end of a lock
range, and how each Meta RPC travels over the framed data plane (msg_type
per RPC). Both sides import it from here."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from types import ModuleType

from google.protobuf.message import Message

from chainfs.proto import meta_pb2 as pb

# rename flags (Linux renameat2 values)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# setxattr flags (Linux values)
XATTR_CREATE = 1
XATTR_REPLACE = 2

# fallocate modes (Linux values)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# A lock range end meaning "to the end of the file, however long" (LockRange.end).
LOCK_EOF = (1 << 64) - 1

FRAME_MSG_TYPE_BASE = 200  # msg_type of the first Meta RPC on the framed transport


@dataclass(frozen=True)
class WireMethod:
    """One Meta RPC as the framed transport carries it."""

    name: str
    msg_type: int
    request: type[Message]
    response: type[Message]


def wire_methods(
    module: ModuleType, service_name: str, base: int, names: Collection[str] | None = None
) -> dict[str, WireMethod]:
    """The framing of a service's RPCs (``names`` only, if given): msg_type =
    ``base`` + the method's position in the service."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    return {
        m.name: WireMethod(
            m.name,
            base + m.index,
            getattr(module, m.input_type.name),
            getattr(module, m.output_type.name),
        )
        for m in service.methods
        if names is None or m.name in names
    }


# RPC name -> framing; msg_type -> the same (the server dispatches on it).
WIRE_METHODS = wire_methods(pb, "Meta", FRAME_MSG_TYPE_BASE)
WIRE_BY_MSG_TYPE = {w.msg_type: w for w in WIRE_METHODS.values()}
