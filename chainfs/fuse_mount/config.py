"""Settings of one FUSE mount (`chainfs mount --config F -o key=value,...`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from chainfs.client.config import ClientConfig
from chainfs.common.metrics import check_port

# FUSE/kernel mount options passed through to libfuse unchanged (flags).
PASSTHROUGH_FLAGS = frozenset(
    {"ro", "rw", "noatime", "nodiratime", "relatime", "nosuid", "nodev", "suid", "dev"}
)


@dataclass
class MountConfig:
    # mgmtd address(es), "host:port[,host:port]"; `--address` overrides it.
    address: str = ""
    # How long the kernel trusts attributes / names it got from us. Longer is
    # faster (fewer getattr/lookup round trips); changes made by OTHER clients
    # show up after at most this long. Our own changes are seen at once.
    attr_timeout_ms: int = 1_000
    entry_timeout_ms: int = 1_000
    # How long "no such name" is trusted: the kernel caches failed lookups
    # this long, and the mount keeps the complete name list of directories of
    # up to 4096 entries this long to answer lookups of absent names without
    # asking meta (the lookup before each create: creating many files is about
    # twice as fast with 1000). Off by default because a name created by
    # ANOTHER client then stays invisible here for up to this long; turn it on
    # when one client owns what it creates. Names created through this mount
    # are seen at once either way.
    negative_timeout_ms: int = 0
    # Keep a file's kernel page cache across opens when meta says the file is
    # unchanged (same size and mtime) since we last had it open (close-to-open).
    keep_cache: bool = True
    # Bypass the kernel page cache (every read/write goes to the daemon).
    direct_io: bool = False
    # Kernel write-back cache: the kernel gathers small writes into big ones
    # but also decides file size/mtime itself; off because other clients then
    # see lengths only after the kernel flushes.
    writeback_cache: bool = False
    # Read-ahead window of the mount in KiB, set on the mount's bdi after the
    # FUSE handshake (needs root; the kernel default is 128). 0 leaves it.
    read_ahead_kb: int = 8 * 1024
    # Read-ahead in the mount, per handle reading sequentially: this many bytes
    # are fetched ahead in blocks of one chunk (1-8 MiB), in parallel; all
    # handles together hold at most readahead_budget_bytes. 0 turns it off.
    readahead_bytes: int = 16 * 1024 * 1024
    readahead_budget_bytes: int = 256 * 1024 * 1024
    # FUSE requests served concurrently (pyfuse3 worker tasks): parallel readers
    # are served in parallel up to this many.
    max_requests: int = 64
    # Background requests the kernel keeps in flight to the mount at once: async
    # direct I/O (io_submit, fio's libaio at iodepth N) and read-ahead go this
    # way; the kernel's default is 12. Congestion starts at 3/4 of it. 0 = the
    # kernel's default. At most max_requests are served at once either way.
    max_background: int = 32
    # Store security.* attributes (SELinux labels, file capabilities) at meta.
    # Off: the mount answers them EOPNOTSUPP itself, which tools cache per
    # file system; on, `ls -l` asks meta for security.selinux of every file
    # and the kernel asks for security.capability before every write.
    security_xattrs: bool = False
    # statfs (df) answers are reused this long: tools call it per file.
    statfs_cache_ms: int = 1_000
    # Directory entries asked from meta per readdir page (with attributes).
    readdir_page_entries: int = 1024
    # Complete directory listings kept to answer repeated listings without
    # meta (for half the shorter of the attr/entry timeouts, and only while
    # no change goes through this mount): at most this many entries in all.
    # 0 turns the listing cache off.
    readdir_cache_entries: int = 65_536
    # Bound on one request while the cluster is unreachable: after this the
    # caller gets EIO (the mount itself stays up and recovers with the cluster).
    cluster_timeout_ms: int = 20_000
    # How often the requests in flight are checked for one stuck past that
    # bound (plus a margin): a stuck request is answered up to two of these late.
    stuck_sweep_interval_ms: int = 1_000
    # Kernel-side POSIX permission checks (with supplementary groups); meta
    # checks again with the caller's uid/gid either way.
    default_permissions: bool = True
    # Let users other than the mounting one use the mount (root, or
    # user_allow_other in /etc/fuse.conf).
    allow_other: bool = False
    # Shown in /proc/mounts and df.
    fsname: str = "chainfs"
    # Extra kernel mount flags, from PASSTHROUGH_FLAGS (e.g. ["ro", "noatime"]).
    mount_flags: list[str] = field(default_factory=list)
    # Prometheus /metrics over HTTP on 127.0.0.1; 0 = ephemeral (the address is
    # in the ready file), -1 = off.
    metrics_port: int = 0
    # Client library settings (timeouts are capped by cluster_timeout_ms).
    client: ClientConfig = field(default_factory=ClientConfig)

    def validate(self) -> None:
        check_port("metrics_port", self.metrics_port)
        for name in (
            "attr_timeout_ms",
            "entry_timeout_ms",
            "negative_timeout_ms",
            "statfs_cache_ms",
            "readahead_bytes",
            "readahead_budget_bytes",
            "readdir_cache_entries",
            "max_background",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in (
            "max_requests",
            "cluster_timeout_ms",
            "stuck_sweep_interval_ms",
            "readdir_page_entries",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.read_ahead_kb < 0:
            raise ValueError("read_ahead_kb must be >= 0")
        if self.max_background > 1024:
            raise ValueError("max_background must be <= 1024")
        if self.max_requests > 1024:
            raise ValueError("max_requests must be <= 1024")
        if not self.fsname or "," in self.fsname:
            raise ValueError("fsname must be non-empty and without commas")
        bad = [f for f in self.mount_flags if f not in PASSTHROUGH_FLAGS]
        if bad:
            raise ValueError(
                f"mount_flags: unknown {bad}; known: {', '.join(sorted(PASSTHROUGH_FLAGS))}"
            )
        self.client.validate()

    def effective_client_config(self) -> ClientConfig:
        """The client settings with every timeout capped by cluster_timeout_ms."""
        c = dataclasses.replace(self.client, storage=dataclasses.replace(self.client.storage))
        c.meta_timeout_ms = min(c.meta_timeout_ms, self.cluster_timeout_ms)
        c.connect_timeout_ms = min(c.connect_timeout_ms, self.cluster_timeout_ms)
        c.storage.timeout_ms = min(c.storage.timeout_ms, self.cluster_timeout_ms)
        return c

    def fuse_options(self) -> set[str]:
        """Options for pyfuse3.init (libfuse -o options)."""
        opts = {f"fsname={self.fsname}", "subtype=chainfs", *self.mount_flags}
        if self.default_permissions:
            opts.add("default_permissions")
        if self.allow_other:
            opts.add("allow_other")
        return opts


def _bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"-o {key}={value}: expected true or false")


def apply_options(cfg: MountConfig, options: str) -> None:
    """Apply `-o a,b=c` to ``cfg``: config field names (key=value) and mount flags.

    ``allow_other``, ``default_permissions``/``nodefault_permissions``,
    ``keep_cache``, ``direct_io``, ``writeback_cache`` may be given as bare
    flags. Unknown keys raise ValueError naming them.
    """
    fields = {f.name: f for f in dataclasses.fields(MountConfig) if f.name not in ("client",)}
    for raw in options.split(","):
        item = raw.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in PASSTHROUGH_FLAGS and not eq:
            if key not in cfg.mount_flags:
                cfg.mount_flags.append(key)
            continue
        if key == "nodefault_permissions" and not eq:
            cfg.default_permissions = False
            continue
        f = fields.get(key)
        if f is None or key == "mount_flags":
            raise ValueError(
                f"-o {item}: unknown option (known: "
                f"{', '.join(sorted([*fields.keys() - {'mount_flags'}, *PASSTHROUGH_FLAGS]))})"
            )
        current = getattr(cfg, key)
        if isinstance(current, bool):
            setattr(cfg, key, _bool(key, value))
        elif isinstance(current, int):
            if not eq:
                raise ValueError(f"-o {key}: needs a value ({key}=N)")
            try:
                setattr(cfg, key, int(value))
            except ValueError:
                raise ValueError(f"-o {item}: {key} takes an integer") from None
        else:
            if not eq:
                raise ValueError(f"-o {key}: needs a value")
            setattr(cfg, key, value)
