"""`chainfs mount MNT --address A [--foreground] [-o opts]`: chainfs as a POSIX file system.

Without --foreground the command starts the mount as a background process
(its own session, log in --log-file), waits until the mount is up and exits
0, or prints the mount's error and exits 1. Unmount with `fusermount3 -u MNT`
or by signalling the mount process (SIGTERM/SIGINT): both push buffered
writes first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from chainfs.cli.options import file_option, require_extra
from chainfs.common.errors import ChainfsError

if TYPE_CHECKING:
    from chainfs.fuse_mount.config import MountConfig

# Bound on waiting for a background mount to come up (cluster connect included).
BACKGROUND_START_TIMEOUT_S = 60.0


def _load_config(
    config_path: str | None, address: str | None, options: tuple[str, ...], token_file: str | None
) -> MountConfig:
    from chainfs.common import config as config_mod
    from chainfs.fuse_mount.config import MountConfig, apply_options

    cfg = config_mod.load(MountConfig, config_path)
    try:
        for opts in options:
            apply_options(cfg, opts)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="-o") from None
    if address:
        cfg.address = address
    if token_file:
        cfg.client.token_file = token_file
    if not cfg.address:
        raise click.UsageError("no cluster address: give --address or set CHAINFS_ADDRESS")
    try:
        cfg.validate()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return cfg


def _background(argv: list[str], log_file: str, mountpoint: str) -> None:
    """Start the mount in the foreground of a child process; wait until it is up."""
    with tempfile.TemporaryDirectory(prefix="chainfs-mount-") as tmp:
        ready = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "chainfs", *argv, "--foreground", "--ready-file", str(ready)]
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + BACKGROUND_START_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None:
                tail = Path(log_file).read_text(errors="replace").splitlines()[-15:]
                raise click.ClickException(
                    f"mount failed (exit {proc.returncode}); log {log_file}:\n" + "\n".join(tail)
                )
            if time.monotonic() > deadline:
                proc.terminate()
                raise click.ClickException(
                    f"mount not up after {BACKGROUND_START_TIMEOUT_S:g}s; log {log_file}"
                )
            time.sleep(0.05)
        info = json.loads(ready.read_text())
    click.echo(f"chainfs mounted at {mountpoint} (pid {info['pid']}, log {log_file})")


def _exit_with_parent() -> None:
    """SIGTERM (a clean unmount) when our parent exits: prctl(PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise click.ClickException(f"prctl(PR_SET_PDEATHSIG): errno {ctypes.get_errno()}")
    if os.getppid() != parent:  # it exited before the prctl took effect
        raise click.ClickException("the parent process exited before the mount started")


@click.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--address",
    envvar="CHAINFS_ADDRESS",
    default=None,
    help="mgmtd address(es) host:port[,host:port] (default: $CHAINFS_ADDRESS).",
)
@click.option(
    "--token-file",
    envvar="CHAINFS_TOKEN_FILE",
    default=None,
    help="File with the mount's token (default: $CHAINFS_TOKEN_FILE, else $CHAINFS_TOKEN). "
    "A mount used by several users needs a token whose user may impersonate: each "
    "process then acts as its own uid/gid (root squashed unless the user is an admin).",
)
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground (logs to stderr).")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="Mount options: config fields as key=value (attr_timeout_ms=500, "
    "max_requests=128, read_ahead_kb=0, ...) and flags (allow_other, ro, noatime, "
    "direct_io, writeback_cache, nodefault_permissions).",
)
@file_option(
    "--config",
    "config_path",
    "TOML file with MountConfig fields (chainfs/fuse_mount/config.py); -o wins.",
    exists=True,
)
@file_option(
    "--ready-file", "ready_file", "Write JSON with the pid once mounted (foreground mode)."
)
@file_option(
    "--log-file",
    "log_file",
    "Log of a background mount (default: a file in the temp directory).",
)
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO).")
@click.option(
    "--exit-with-parent",
    is_flag=True,
    help="Unmount and exit when the process that started this one exits "
    "(test harnesses: no orphaned mounts).",
)
def mount(
    mountpoint: str,
    address: str | None,
    token_file: str | None,
    foreground: bool,
    options: tuple[str, ...],
    config_path: str | None,
    ready_file: str | None,
    log_file: str | None,
    log_level: str | None,
    exit_with_parent: bool,
) -> None:
    """Mount the chainfs cluster at ADDRESS on MOUNTPOINT (FUSE)."""
    require_extra("fuse", "chainfs mount")
    cfg = _load_config(config_path, address, options, token_file)
    if not foreground:
        argv = ["mount", mountpoint, "--address", cfg.address]
        if token_file:
            argv += ["--token-file", token_file]
        for opts in options:
            argv += ["-o", opts]
        if config_path:
            argv += ["--config", config_path]
        if log_level:
            argv += ["--log-level", log_level]
        safe = "".join(c if c.isalnum() else "_" for c in os.path.realpath(mountpoint))
        log = log_file or os.path.join(tempfile.gettempdir(), f"chainfs-mount{safe}.log")
        _background(argv, log, mountpoint)
        return

    from chainfs.common import logging as chainfs_logging
    from chainfs.fuse_mount.mount import run

    chainfs_logging.setup("mount", log_level)
    if exit_with_parent:
        _exit_with_parent()
    try:
        code = run(mountpoint, cfg, ready_file)
    except (ChainfsError, OSError) as e:
        raise click.ClickException(str(e)) from None
    raise SystemExit(code)
