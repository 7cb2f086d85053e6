"""Shared-memory I/O through a per-host agent (3FS USRBIO, in Python form).

Run one agent per host (``chainfs agent --address HOST:PORT [--socket PATH]
[--workers N]``); processes of that host then read through it:

    import chainfs.usrbio as usrbio

    agent = usrbio.connect()                   # socket: $CHAINFS_AGENT_SOCKET or the default
    buf = agent.register_buffer(64 << 20)
    views = agent.read_ranges_into([("/data/shard-0", 0, 1 << 20)], buf)
    t = agent.submit([usrbio.ReadRequest("/data/a", 0, 4096, buf, 0)])
    results = agent.wait(t)                    # [Completion(nbytes, errno, message)]
    arr, tensor = buf.numpy(), buf.tensor()    # the same memory, no copy

The agent's worker processes each hold their own cluster connection and read
straight into the registered memory, so many processes share a few
connections and throughput grows with cores past one GIL. See
``chainfs.client.usrbio.user`` (protocol and failure handling), ``worker`` and
``agent``.
"""

from chainfs.client import usrbio as _user_side
from chainfs.client.usrbio import *  # noqa: F403 - the user side is this package's API

__all__ = _user_side.__all__
