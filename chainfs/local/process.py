"""Child processes of `chainfs up`, tests and benches: start, wait until ready, stop.

A chainfs child (``chainfs serve KIND`` or ``chainfs mount``) is started with
``--ready-file R`` and is ready once it has written R (JSON with its pid and
addresses). Every child runs in its own session with its output in a log
file. Stopping signals only the pid started here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from chainfs.common.errors import ChainfsError, Code
from chainfs.local.private import PRIVATE_UMASK, make_private_dir, private_opener

DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 10.0  # SIGTERM grace before SIGKILL
FUSERMOUNT_TIMEOUT_S = 30.0
_READY_POLL_S = 0.02
_LOG_TAIL_LINES = 30

Popen = subprocess.Popen[bytes]


def spawn(cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> Popen:
    """Start ``cmd`` in a new session (a Ctrl-C on our terminal is not its), output to log."""
    with open(log_path, "ab", opener=private_opener) as log:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,
            umask=PRIVATE_UMASK,  # its data, KV files and logs: owner only
        )


def kill_process(proc: Popen | None) -> None:
    """SIGKILL ``proc`` if it still runs (a crash, for fault tests) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def stop_process(proc: Popen | None, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it after ``timeout_s``; reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_process(proc)


def tail_file(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class StopOnExit:
    """A context manager whose exit calls ``stop()``."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ChildProcess(StopOnExit):
    """One `python -m chainfs ...` child with a ready file and a log under ``workdir``."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.workdir = Path(workdir)
        make_private_dir(self.workdir)
        self.ready_file = self.workdir / f"{name}.ready.json"
        self.log_path = self.workdir / f"{name}.log"
        self.env = env
        # Run the child under a wrapper that execs it (same pid), e.g.
        # ("ip", "netns", "exec", NS) to start it inside a network namespace.
        self.prefix = list(prefix)
        self.proc: Popen | None = None
        self.info: dict[str, Any] = {}

    def arguments(self) -> list[str]:
        """What follows ``python -m chainfs`` (before ``--ready-file``)."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S, wait: bool = True) -> None:
        if self.alive():
            raise ChainfsError(Code.EBUSY, f"{self.name} already running (pid {self.pid})")
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env or {})
        cmd = [*self.prefix, sys.executable, "-m", "chainfs", *self.arguments()]
        self.proc = spawn([*cmd, "--ready-file", str(self.ready_file)], self.log_path, env)
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the child wrote its ready file; its contents (also ``.info``)."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise ChainfsError(
                    Code.EIO,
                    f"{self.name} exited with {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.tail_log()}",
                )
            if time.monotonic() > deadline:
                raise ChainfsError(
                    Code.ETIMEDOUT,
                    f"{self.name} not ready after {timeout_s}s; "
                    f"log {self.log_path}:\n{self.tail_log()}",
                )
            time.sleep(_READY_POLL_S)
        self.info = json.loads(self.ready_file.read_text())
        return self.info

    def tail_log(self, lines: int = _LOG_TAIL_LINES) -> str:
        return tail_file(self.log_path, lines)

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        kill_process(self.proc)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        stop_process(self.proc, timeout_s)


class ServiceProcess(ChildProcess):
    """``chainfs serve KIND --config F``: one mgmtd, meta or storage process."""

    def __init__(
        self,
        kind: str,
        config_path: Path,
        workdir: Path,
        name: str | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        super().__init__(name or kind, workdir, env, prefix)
        self.kind = kind
        self.config_path = Path(config_path)

    def arguments(self) -> list[str]:
        return ["serve", self.kind, "--config", str(self.config_path)]


class MountProcess(ChildProcess):
    """``chainfs mount MNT --address A --foreground``: a FUSE mount as a child process."""

    def __init__(
        self,
        mountpoint: Path,
        address: str,
        workdir: Path,
        options: Sequence[str] = (),
        token_file: Path | None = None,
    ) -> None:
        super().__init__("mount", workdir)
        self.mountpoint = Path(mountpoint)
        self.address = address
        self.options = list(options)  # `-o` items (chainfs/fuse_mount/config.py)
        self.token_file = token_file

    def arguments(self) -> list[str]:
        args = ["mount", str(self.mountpoint), "--address", self.address, "--foreground"]
        if self.token_file is not None:
            args += ["--token-file", str(self.token_file)]
        args.append("--exit-with-parent")  # a test or bench that dies takes its mount along
        return args + (["-o", ",".join(self.options)] if self.options else [])

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (the mount pushes buffered writes and unmounts), SIGKILL after timeout_s."""
        super().stop(timeout_s)
        # A killed mount leaves a dead FUSE connection behind: detach it.
        if os.path.ismount(self.mountpoint) or fuse_mounted(self.mountpoint):
            subprocess.run(
                ["fusermount3", "-u", "-z", str(self.mountpoint)],
                capture_output=True, timeout=FUSERMOUNT_TIMEOUT_S, check=False,
            )  # fmt: skip


def check_port_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    """Raise EBUSY naming ``port`` if a process listens on it.

    gRPC servers bind with SO_REUSEPORT, so a second server on a taken port
    would share it silently instead of failing: probe with a plain socket first.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError as e:
            raise ChainfsError(
                Code.EBUSY,
                f"port {port} ({what}) is in use by another process ({e.strerror}); "
                f"stop that process, or choose another port",
            ) from None


def fuse_mounted(mountpoint: Path) -> bool:
    """Whether /proc/self/mounts lists ``mountpoint`` (also a dead FUSE connection)."""
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == str(mountpoint) for line in f if len(line.split()) > 1)
    except OSError:
        return False
