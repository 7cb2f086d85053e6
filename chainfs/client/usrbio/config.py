"""Settings of the I/O agent and of its users: every bound of the shared-memory path."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

MiB = 1024 * 1024

# Where users find the agent when no socket is given, and what makes the torch
# datasets take the shared-memory path.
AGENT_SOCKET_ENV = "CHAINFS_AGENT_SOCKET"


def default_socket_path() -> str:
    """$CHAINFS_AGENT_SOCKET, else a per-user path in the runtime directory (or /tmp)."""
    env = os.environ.get(AGENT_SOCKET_ENV)
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "chainfs-agent.sock")
    return f"/tmp/chainfs-agent-{os.getuid()}.sock"


@dataclass
class AgentConfig:
    """Bounds shared by the agent and its users (both sides check them)."""

    # Worker processes of the agent, each with its own cluster connection and event loop.
    workers: int = 2
    # Requests in one submitted batch (a larger batch is a ValueError before sending).
    max_batch_entries: int = 4096
    # One frame on the agent's sockets (a batch's request or answer).
    max_frame_bytes: int = 4 * MiB
    # Batches one connection may have in flight at a worker; past it the worker
    # stops reading that socket until one completes (back-pressure, not an error).
    max_inflight_batches: int = 16
    # Shared buffers one user connection may register, and their total size.
    max_buffers: int = 256
    max_buffer_bytes_total: int = 64 * 1024 * MiB
    # User connections one worker serves at once (more are refused with EAGAIN).
    max_connections: int = 1024
    # How long a user waits for an answer (connect, register, a batch) before TimeoutError.
    reply_timeout_ms: int = 120_000
    # A worker that dies is restarted; this many deaths in a row make the agent exit.
    max_worker_restarts: int = 5
    # How long the agent waits for a worker to connect to the cluster and listen.
    worker_start_timeout_ms: int = 60_000

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be > 0")
