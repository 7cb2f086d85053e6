"""A real local PostgreSQL server in a directory, on 127.0.0.1.

The metadata store of ``chainfs up --kv postgresql`` and of
LocalCluster(kv="postgresql"), and of the tests of the postgresql backend.

    with PostgresServer(base_dir) as pg:
        pg.create_database("meta")
        store = chainfs.kv.open(pg.url("meta", schema="chainfs"))
        pg.kill()       # SIGKILL the server and its backends (a crash)
        pg.restart()    # same port, same data dir (crash recovery runs)

The binaries come from ``$CHAINFS_PG_BINDIR``, else ``initdb`` on PATH, else
the newest ``/usr/lib/postgresql/*/bin`` (Debian's layout). PostgreSQL refuses
to run as root: as root the server runs as ``nobody`` (uid 65534, through
``setpriv``) with a data directory that account owns, ``base_dir/pgdata``;
when ``nobody`` could not reach it (a private parent such as /root or
pytest's base directory), the server keeps one capability,
CAP_DAC_READ_SEARCH, to look up paths through such directories. The server
listens on an ephemeral port (a lost port race restarts on a fresh one) and
on a unix socket in its data directory, which its URLs name (no TCP on either
side). Only processes started here are signalled.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from urllib.parse import quote

from chainfs.common.errors import ChainfsError, Code
from chainfs.local.process import DEFAULT_STOP_TIMEOUT_S, Popen, StopOnExit, tail_file

DEFAULT_START_TIMEOUT_S = 60.0  # initdb plus the first start, or crash recovery
DEFAULT_MAX_CONNECTIONS = 200  # several stores x their pool_size, with room
# A commit holds an advisory lock per key it read or wrote (up to the store's
# max_key_locks); the server's lock table has this many slots per connection.
DEFAULT_MAX_LOCKS_PER_TRANSACTION = 256
PORT_RACE_ATTEMPTS = 5
SUPERUSER = "chainfs"
UNPRIVILEGED_UID = 65534  # nobody: the server's account when we are root
_READY_POLL_S = 0.05
_CLIENT_TIMEOUT_S = 10.0  # createdb, pg_isready
_UNIX_PATH_MAX = 107  # a unix socket's path, in bytes (sun_path less its NUL)


def find_bindir() -> str | None:
    """The directory holding initdb/postgres, or None."""
    env = os.environ.get("CHAINFS_PG_BINDIR")
    if env:
        return env if os.path.exists(os.path.join(env, "postgres")) else None
    on_path = shutil.which("initdb")
    if on_path:
        on_path = os.path.realpath(on_path)  # a symlink into the real bin dir
    if on_path and os.path.exists(os.path.join(os.path.dirname(on_path), "postgres")):
        return os.path.dirname(on_path)
    found = glob.glob("/usr/lib/postgresql/*/bin/postgres")
    found.sort(key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reachable_by_others(path: Path) -> bool:
    """Whether an unrelated uid can traverse ``path`` and every directory above it."""
    resolved = path.resolve()
    return all(parent.stat().st_mode & 0o001 for parent in [resolved, *resolved.parents])


class PostgresServer(StopOnExit):
    """One ``postgres`` server with its data in ``base_dir``."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        start: bool = True,
    ) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise ChainfsError(
                Code.ENOENT,
                "PostgreSQL binaries not found (set CHAINFS_PG_BINDIR, or install the "
                "`postgresql` package: deploy/bootstrap.sh does)",
            )
        self.bindir = bindir
        self.base_dir = Path(base_dir).absolute()
        self.start_timeout_s = start_timeout_s
        self.max_connections = max_connections
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.base_dir / "pgdata"
        self._as_server = self._server_account()
        self.port = 0
        self.proc: Popen | None = None
        self._finalizer = weakref.finalize(self, _kill_server, [None])
        if start:
            self.start()

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str, schema: str = "chainfs", query: str = "") -> str:
        """A ``chainfs.kv.open`` URL for ``schema`` in ``database``; through the
        unix socket (no TCP on either side) when its path is short enough."""
        extra = f"&{query}" if query else ""
        if len(str(self.data_dir / f".s.PGSQL.{self.port}")) <= _UNIX_PATH_MAX:
            extra = f"&host={quote(str(self.data_dir), safe='/')}{extra}"
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}?schema={schema}{extra}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- data directory -------------------------------------------------------
    def _server_account(self) -> list[str]:
        """The command prefix that runs initdb and postgres unprivileged when we are root."""
        if os.geteuid() != 0:
            return []
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise ChainfsError(Code.ENOENT, "running postgres as root needs setpriv (util-linux)")
        uid = str(UNPRIVILEGED_UID)
        prefix = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        if not _reachable_by_others(self.base_dir):
            caps = "+dac_read_search"
            prefix += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
        return [*prefix, "--"]

    def _run(self, args: list[str], timeout_s: float) -> None:
        """A PostgreSQL tool, as the server's account."""
        done = subprocess.run(
            [*self._as_server, *args], capture_output=True, timeout=timeout_s, cwd="/"
        )
        if done.returncode != 0:
            raise ChainfsError(
                Code.EIO, f"{' '.join(args[:2])} failed: {done.stderr.decode(errors='replace')}"
            )

    def _initdb(self) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self._as_server:
            os.chown(self.data_dir, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        self._run(
            [
                os.path.join(self.bindir, "initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            self.start_timeout_s,
        )  # fmt: skip

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """initdb if needed, then start on a fresh port and wait until ready."""
        if self.alive():
            raise ChainfsError(Code.EBUSY, f"postgres already running in {self.data_dir}")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(PORT_RACE_ATTEMPTS):
            self.port = _free_port()
            try:
                self._spawn_and_wait()
                return
            except ChainfsError:
                lost_race = "could not bind" in tail_file(self.log_path, 20)
                self.kill()
                if not lost_race or attempt == PORT_RACE_ATTEMPTS - 1:
                    raise

    def restart(self) -> None:
        """Start again on the same port and data dir (after kill or stop)."""
        if self.alive():
            raise ChainfsError(Code.EBUSY, f"postgres still running in {self.data_dir}")
        self._spawn_and_wait()

    def _command(self) -> list[str]:
        return [
            os.path.join(self.bindir, "postgres"),
            "-D", str(self.data_dir),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.data_dir}",
            "-c", f"max_connections={self.max_connections}",
            "-c", f"max_locks_per_transaction={DEFAULT_MAX_LOCKS_PER_TRANSACTION}",
            "-c", "fsync=on",
            "-c", "synchronous_commit=on",
            "-c", "logging_collector=off",
        ]  # fmt: skip

    def _spawn_and_wait(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = subprocess.Popen(
                [*self._as_server, *self._command()],  # setpriv execs postgres: same pid
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C on our terminal is not its
                cwd="/",
            )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_server, [self.proc])
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        isready = os.path.join(self.bindir, "pg_isready")
        args = [isready, "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER]
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ChainfsError(
                    Code.EIO,
                    f"postgres exited with {self.proc.returncode}; log {self.log_path}:\n"
                    f"{tail_file(self.log_path)}",
                )
            if subprocess.run(args, timeout=_CLIENT_TIMEOUT_S).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ChainfsError(
                    Code.ETIMEDOUT,
                    f"postgres not ready after {self.start_timeout_s}s; log {self.log_path}:\n"
                    f"{tail_file(self.log_path)}",
                )
            time.sleep(_READY_POLL_S)

    def create_database(self, name: str) -> None:
        """Create database ``name`` (owned by the superuser) if it does not exist."""
        createdb = os.path.join(self.bindir, "createdb")
        try:
            self._run(
                [createdb, "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name],
                _CLIENT_TIMEOUT_S,
            )
        except ChainfsError as e:
            if "already exists" not in str(e):
                raise

    def kill(self) -> None:
        """SIGKILL the server and its backends (a crash); returns once all are gone."""
        _kill_server([self.proc])

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT); SIGKILL after ``timeout_s``. The data stays."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)  # postgres waits for its backends before it exits
        self.kill()


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (the server's backends and workers)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _kill_server(procs: list[Popen | None]) -> None:
    """SIGKILL each started server and its child processes (each backend leads
    its own process group, so a group kill would miss them); returns once all
    are gone, so a restart finds no backend still attached to shared memory."""
    for proc in procs:
        # Only while unreaped: a reaped pid may belong to someone else.
        if proc is None or proc.returncode is not None:
            continue
        children = _children(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + DEFAULT_STOP_TIMEOUT_S
        for child in children:  # not our children: poll until gone
            while time.monotonic() < deadline:
                try:
                    os.kill(child, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.01)
