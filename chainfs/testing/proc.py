"""Start and stop real chainfs service processes for tests and `chainfs up`.

Each process is started as ``python -m chainfs serve KIND --config F
--ready-file R`` and is ready once it has written R (JSON with its pid and
addresses). Stopping signals only the pid we started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chainfs.common.errors import ChainfsError, Code

DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 10.0


class ServiceProcess:
    """One service process with its config, ready file and log."""

    def __init__(
        self,
        kind: str,
        config_path: Path,
        workdir: Path,
        name: str | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.kind = kind
        self.name = name or kind
        self.config_path = Path(config_path)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.workdir / f"{self.name}.ready.json"
        self.log_path = self.workdir / f"{self.name}.log"
        self.env = env
        # Run the service under a wrapper that execs it (same pid), e.g.
        # ("ip", "netns", "exec", NS) to start it inside a network namespace.
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S, wait: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise ChainfsError(Code.EBUSY, f"{self.name} already running (pid {self.proc.pid})")
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.env:
            env.update(self.env)
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "chainfs",
            "serve",
            self.kind,
            "--config",
            str(self.config_path),
            "--ready-file",
            str(self.ready_file),
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        finally:
            log.close()
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                return self.info
            if self.proc.poll() is not None:
                raise ChainfsError(
                    Code.EIO,
                    f"{self.name} exited with {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.tail_log()}",
                )
            time.sleep(0.02)
        raise ChainfsError(
            Code.ETIMEDOUT,
            f"{self.name} not ready after {timeout_s}s; log {self.log_path}:\n{self.tail_log()}",
        )

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
