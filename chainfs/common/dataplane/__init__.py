"""The data plane: framed binary request/response over TCP or unix sockets.

chainfs's stand-in for 3FS's RDMA. Storage reads, writes and chain
forwarding travel here; control calls stay on gRPC.

Frame (see :mod:`.frame` for the byte layout)::

    40-byte fixed header | header message (protobuf, opaque here) | raw payload

The fixed header carries magic, version, flags (response, error), msg_type
(u16), request_id (u64), header_len (u32), status (error code), payload_len
(u64) and a CRC32C of itself. The payload never sits inside a protobuf
message and is never copied by a Python loop: it is received with
``recv_into`` straight into its destination (a pooled buffer on the server,
the caller's buffers on the client) and sent with ``sendmsg`` scatter-gather
or ``os.sendfile``.

Server::

    async def handle(req: Request) -> Response:
        ...  # req.payload: memoryview of a pooled buffer, valid until the
             # response is sent (a chain hop may forward that very buffer)
        return Response(msg_type, header_bytes, payload=[view, ...],
                        file_regions=[FileRegion(fd, offset, length)],
                        on_done=lambda sent: os.close(fd))

    server = DataServer(handle, host="127.0.0.1", port=0, unix_path=None, config=cfg)
    await server.start(); server.address  # "127.0.0.1:PORT"; server.unix_address
    await server.stop()

A handler raising ChainfsError answers an error frame; the client raises the
same ChainfsError (code and message).

Client::

    client = DataClient(cfg)
    reply = await client.request(
        address, msg_type, header_bytes,
        payload=[view, ...],  # sent scatter-gather
        payload_sink=None,    # or fn(msg_type, header) -> [buffers] to receive into
        timeout_s=None,       # default request_timeout_ms
    )
    reply.msg_type, reply.header, reply.payload, reply.payload_len
    await client.close()

Addresses are ``host:port`` or ``unix:/path``. Bounds (payload and header
size, in-flight requests per connection, connections per peer, pooled
buffer bytes, timeouts) are in :class:`DataPlaneConfig`.

Errors: a malformed frame (bad magic/CRC/version, lengths over the bounds)
closes only that connection and fails the client's requests on it with
BAD_FRAME; a connection lost (reset, or closed even mid-frame) fails them with
UNAVAILABLE. An unreachable peer fails
fast with UNAVAILABLE naming the address; a reply that does not come in time
is ETIMEDOUT. A server drops connections whose frames stall or whose peer
stops reading replies (``frame_stall_timeout_ms``), which frees the pooled
buffers they pin.

Event loop: sockets are driven with ``add_reader``/``add_writer`` on uvloop
(plain asyncio works too). uvloop silently drops a socket's poller when the
socket reports POLLERR (a TCP reset), so both ends probe their connections
every ``liveness_check_ms`` (see ``Connection.poke``). A DataServer or
DataClient belongs to the loop that started/first used it.

Cost (bench/dataplane_bench.py, loopback, 2 vCPUs): for 4-64 MiB payloads
each side spends about 0.2-0.35 CPU-seconds per GB, kernel copies included,
the same as iperf3 (sender ~0.2-0.3, receiver ~0.4); a small request costs
a few tens of microseconds of CPU on each side. Receiving data the peer sent
with sendfile from the page cache costs the receiver ~2.5x more CPU per byte
on loopback than data sent from memory (the copy reads cold page-cache
pages); on a real NIC sendfile saves the sender's copy.
"""

from chainfs.common.dataplane.buffers import BufferPool, PooledBuffer
from chainfs.common.dataplane.client import DataClient, PayloadSink, Reply
from chainfs.common.dataplane.config import DataPlaneConfig
from chainfs.common.dataplane.frame import FIXED_HEADER_SIZE, PROTOCOL_VERSION
from chainfs.common.dataplane.server import DataServer, FileRegion, Handler, Request, Response

__all__ = [
    "FIXED_HEADER_SIZE",
    "PROTOCOL_VERSION",
    "BufferPool",
    "DataClient",
    "DataPlaneConfig",
    "DataServer",
    "FileRegion",
    "Handler",
    "PayloadSink",
    "PooledBuffer",
    "Reply",
    "Request",
    "Response",
]
