"""`chainfs umount MNT [--lazy]`: detach a chainfs FUSE mount and wait for its process.

Only a chainfs mount is touched: /proc/self/mountinfo must list MNT with the
file-system type ``fuse.chainfs`` (the mount's subtype). The unmount itself is
``fusermount3 -u`` (``-z`` with --lazy), which also works without root for
the user who mounted. The mount process then pushes what it buffered and
exits; this command waits for that when it can find the process.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import click

from chainfs.cli.options import seconds_option

FUSE_TYPE = "fuse.chainfs"
DEFAULT_UMOUNT_TIMEOUT_S = 60.0  # bound on fusermount3 plus the mount process exiting
_EXIT_POLL_S = 0.05


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mount_type(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The file-system type mounted at ``mountpoint`` (the top one), or None."""
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10 or "-" not in fields:
                continue
            sep = fields.index("-")
            if _unescape(fields[4]) == mountpoint:
                found = fields[sep + 1]  # later lines are mounted on top of earlier ones
    return found


def mount_processes(mountpoint: str) -> list[int]:
    """Pids of `chainfs mount MNT` processes serving ``mountpoint`` (resolved paths)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(os.path.join(entry.path, "cwd"))
        except OSError:
            continue  # gone, or not ours to look at
        args = [os.fsdecode(a) for a in argv if a]
        if "chainfs" not in " ".join(args) or "mount" not in args:
            continue
        rest = args[args.index("mount") + 1 :]
        # Paths as strings only: stat-ing another mount's path could hang on it.
        if rest and os.path.normpath(os.path.join(cwd, rest[0])) == mountpoint:
            pids.append(int(entry.name))
    return pids


def _wait_exit(pids: list[int], deadline: float) -> list[int]:
    """Wait until every pid has exited (or the deadline); the ones still running."""
    while True:
        alive = [p for p in pids if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(_EXIT_POLL_S)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has yet to reap it


@click.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--lazy", "-z", is_flag=True, help="Detach now even if busy; it goes once no longer used."
)
@seconds_option(
    "--timeout",
    "timeout_s",
    DEFAULT_UMOUNT_TIMEOUT_S,
    "Seconds to wait for the unmount and for the mount process to exit.",
)
def umount(mountpoint: str, lazy: bool, timeout_s: float) -> None:
    """Unmount the chainfs FUSE mount at MOUNTPOINT; wait until its process has exited."""
    path = os.path.realpath(mountpoint)
    fstype = mount_type(path)
    if fstype != FUSE_TYPE:
        what = "nothing is mounted there" if fstype is None else f"it is a {fstype} mount"
        raise click.ClickException(f"{path} is not a chainfs mount ({what})")
    deadline = time.monotonic() + timeout_s
    pids = mount_processes(path)
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise click.ClickException(f"fusermount3 did not finish in {timeout_s:g}s") from None
    if out.returncode != 0:
        hint = "" if lazy else " (busy? close what uses it, or give --lazy)"
        raise click.ClickException(f"unmount failed: {out.stderr.strip()}{hint}")
    left = _wait_exit(pids, deadline)
    if left and lazy:
        click.echo(f"detached {path}; mount process {', '.join(map(str, left))} exits once unused")
        return
    if left:
        raise click.ClickException(
            f"unmounted {path}, but mount process {', '.join(map(str, left))} "
            f"still runs after {timeout_s:g}s"
        )
    gone = f" (mount process {', '.join(map(str, pids))} exited)" if pids else ""
    click.echo(f"unmounted {path}{gone}")
