"""Client settings: timeouts, parallelism and memory bounds of one FileSystem."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from chainfs.common.auth.tokens import resolve_token
from chainfs.common.rpc.storage_client import StorageClientConfig
from chainfs.common.tls import TlsConfig
from chainfs.common.units import MiB
from chainfs.proto import common_pb2 as cpb

# Where connect() and the adapters find the mgmtd address when none is given.
ADDRESS_ENV = "CHAINFS_ADDRESS"


def resolve_address(address: str | None) -> str:
    """``address``, else $CHAINFS_ADDRESS; ValueError when neither is set."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ValueError(
            f"no chainfs cluster address: pass address='host:port[,host:port]' "
            f"or set ${ADDRESS_ENV}"
        )
    return address


@dataclass
class ClientConfig:
    # The user's token (a cluster with authentication takes uid/gid from it);
    # "" = token_file, else $CHAINFS_TOKEN, else the file $CHAINFS_TOKEN_FILE names.
    token: str = field(default="", repr=False)
    token_file: str = ""
    # Bound on reaching mgmtd at connect: an unreachable address fails within this.
    connect_timeout_ms: int = 5_000
    # Deadline of one metadata call, meta failover included.
    meta_timeout_ms: int = 30_000
    # One attempt of a metadata call on one meta server: a server silent this
    # long (hung, host gone) is left for another; the retry keeps the request id.
    meta_attempt_timeout_ms: int = 5_000
    # Namespace calls of the sync FileSystem (stat, exists, listdir, mkdir,
    # rename, remove, chmod, ...) and its write opens (creates) go to meta from
    # the calling thread, over at most this many blocking sockets per meta
    # server: one attempt, bounded by meta_attempt_timeout_ms. An attempt that
    # gets no answer, or finds every socket busy, goes on through the loop
    # thread with the same request id, within the same meta_timeout_ms.
    # 0: every call goes through the loop thread. Plain sockets only: with TLS
    # on, calls take the loop thread.
    meta_sync_connections: int = 8
    # Read groups (one read_batch call of up to read_group_bytes / read_group_ios)
    # in flight per FileSystem: keeps every storage node busy, bounds queues.
    max_inflight_reads: int = 16
    # One read group: consecutive chunk pieces of one call, batched per node.
    read_group_bytes: int = 8 * MiB
    read_group_ios: int = 256
    # Chunk writes in flight per open file.
    max_inflight_writes_per_file: int = 8
    # Bytes of write-back data (copied from the caller, not yet acknowledged by
    # storage) across all files of one FileSystem; a writer waits above it.
    write_buffer_budget_bytes: int = 128 * MiB
    # Read buffer of a file for small sequential reads (read(n) with small n,
    # readline); reads at least this large go straight into the caller's buffer.
    read_buffer_bytes: int = 1 * MiB
    # Default buffering (-1) is adaptive: a refill after a jump fetches this much,
    # doubling (up to read_buffer_bytes) while reads go on where the last stopped,
    # so a 4 KiB random read costs 64 KiB from storage, not 1 MiB.
    read_ahead_min_bytes: int = 64 * 1024
    # Read-ahead of a file read sequentially (opened read-only, buffered): once
    # read_buffer_bytes have been read in a row, chunk-sized pieces are fetched
    # ahead of the reader up to this many bytes, several chunks (so several
    # chains and nodes) in flight while the reader copies out the earlier ones.
    read_ahead_bytes: int = 32 * MiB
    # Bytes held by the read-ahead of all files of one FileSystem: past it a
    # file fetches less ahead (and at worst reads synchronously, as unbuffered).
    read_ahead_budget_bytes: int = 256 * MiB
    # Read-only opens take a meta read session (in the open call itself; one
    # more call at close): a file unlinked or replaced elsewhere stays readable
    # through an open file until it is closed, as POSIX promises.
    read_sessions: bool = True
    # Session ends sent to meta after close returned (a read session, a write
    # open that wrote nothing) in flight at once; one more close waits.
    max_background_session_ends: int = 64
    # How long a queued session end waits for others to share its call (the
    # session only ends that much later; nothing a user sees depends on it).
    # The next call to meta ends the wait: the ends go out in the same send.
    session_end_delay_ms: int = 5
    # Entries asked per readdir page.
    readdir_page_entries: int = 1024
    # Once this many stats (a mount's lookups, stat calls of one FileSystem's
    # tasks or threads) are in flight to meta, further ones wait and go together
    # in one BatchStat of up to meta_stat_batch_max paths as soon as one is
    # answered (0: every stat is its own call). Meta spends about half the CPU
    # per path in a batch of 2, a quarter in one of 8; a stat that waits pays
    # up to one more round trip, so a few stats in flight still go alone.
    meta_stat_coalesce_inflight: int = 4
    meta_stat_batch_max: int = 64
    # Distinct paths looked up per batch-stat call of read_ranges (meta caps a
    # batch at 4096 by default).
    batch_stat_paths: int = 1024
    # A blocking lock (File.lock, a mount's F_SETLKW / flock) asks meta again
    # after this, doubling up to lock_poll_max_ms while the lock stays taken.
    lock_poll_initial_ms: int = 10
    lock_poll_max_ms: int = 500
    # Capabilities (meta's grants that storage checks): at most this many kept,
    # and one is fetched again this long before it expires (meta's lifetime is
    # capability_ttl_ms, 10 minutes by default).
    capability_cache_entries: int = 65_536
    capability_renew_before_ms: int = 30_000
    # Storage data-plane client: retries across replicas, timeouts, connections.
    storage: StorageClientConfig = field(default_factory=StorageClientConfig)
    # TLS to the cluster: None = this process's settings (the CHAINFS_TLS_CA,
    # CHAINFS_TLS_CERT, CHAINFS_TLS_KEY environment variables; unset = plain).
    # A TlsConfig with ca_file (and a certificate, if the user holds one) overrides them.
    tls: TlsConfig | None = None

    def validate(self) -> None:
        for name in (
            "connect_timeout_ms",
            "meta_timeout_ms",
            "meta_attempt_timeout_ms",
            "max_inflight_reads",
            "read_group_bytes",
            "read_group_ios",
            "max_inflight_writes_per_file",
            "write_buffer_budget_bytes",
            "read_buffer_bytes",
            "read_ahead_min_bytes",
            "read_ahead_bytes",
            "read_ahead_budget_bytes",
            "readdir_page_entries",
            "batch_stat_paths",
            "lock_poll_initial_ms",
            "lock_poll_max_ms",
            "max_background_session_ends",
            "capability_cache_entries",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not 0 <= self.meta_sync_connections <= 64:
            raise ValueError("meta_sync_connections must be in [0, 64]")
        if not 0 <= self.meta_stat_coalesce_inflight <= 1024:
            raise ValueError("meta_stat_coalesce_inflight must be in [0, 1024]")
        if not 1 <= self.meta_stat_batch_max <= 4096:
            raise ValueError("meta_stat_batch_max must be in [1, 4096] (meta's max_batch_stat)")
        if self.session_end_delay_ms < 0 or self.capability_renew_before_ms < 0:
            raise ValueError("session_end_delay_ms and capability_renew_before_ms must be >= 0")
        self.storage.validate()
        if self.tls is not None:
            self.tls.validate()

    def with_token(self, token: str | None = None) -> ClientConfig:
        """A copy holding the token to use: ``token``, else this config's
        token or token_file, else the environment's ("" if none anywhere)."""
        resolved = resolve_token(token or self.token or None, self.token_file or None)
        return replace(self, token=resolved or "")

    def credential(self) -> cpb.Credential:
        """What this client presents (empty: no token, anonymous)."""
        return cpb.Credential(token=self.token)

    @property
    def buffer_budget_bytes(self) -> int:
        """Client-side bytes these settings let one FileSystem hold at most."""
        return (
            self.write_buffer_budget_bytes + self.read_buffer_bytes + self.read_ahead_budget_bytes
        )
