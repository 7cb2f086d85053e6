"""The user side of the shared-memory path (re-exported as ``chainfs.usrbio``).

It lives in the client library because user processes (the torch datasets
among them) import it; the agent and its workers, which use the client to
reach the cluster, are in ``chainfs.usrbio``.
"""

from chainfs.client.usrbio.config import AGENT_SOCKET_ENV, AgentConfig, default_socket_path
from chainfs.client.usrbio.user import AgentClient, ReadRequest, SharedBuffer, Ticket, connect
from chainfs.client.usrbio.wire import Completion

__all__ = [
    "AGENT_SOCKET_ENV",
    "AgentClient",
    "AgentConfig",
    "Completion",
    "ReadRequest",
    "SharedBuffer",
    "Ticket",
    "connect",
    "default_socket_path",
]
