"""How the Mgmt RPCs that clients need travel over the framed transport.

The user-facing client speaks only the framed protocol (no gRPC: it survives
fork() and costs less CPU); services and admin tools keep gRPC, the API of
record. mgmtd serves the framed protocol at its gRPC port + 1
(:func:`frame_address_of`): the one mgmtd address users pass names both.
"""

from __future__ import annotations

from chainfs.common.dataplane.address import format_tcp
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import wire_methods
from chainfs.proto import mgmt_pb2 as mp

FRAME_MSG_TYPE_BASE = 300  # msg_type of the first Mgmt RPC on the framed transport
FRAME_PORT_OFFSET = 1  # mgmtd's framed port = its gRPC port + this

# The unary RPCs served framed: routing (plain, or a long poll with wait_ms: the
# client's routing watch) and status.
FRAMED_METHODS = ("GetRoutingInfo", "GetStatus")


# RPC name -> framing; msg_type -> the same (mgmtd dispatches on it).
WIRE_METHODS = wire_methods(mp, "Mgmt", FRAME_MSG_TYPE_BASE, FRAMED_METHODS)
WIRE_BY_MSG_TYPE = {w.msg_type: w for w in WIRE_METHODS.values()}


def frame_address_of(rpc_address: str) -> str:
    """The framed address of the mgmtd whose gRPC address is ``rpc_address`` (host:port)."""
    host, sep, port = rpc_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ChainfsError(Code.EINVAL, f"mgmtd address must be host:port, not {rpc_address!r}")
    return format_tcp(host.strip("[]"), int(port) + FRAME_PORT_OFFSET)
