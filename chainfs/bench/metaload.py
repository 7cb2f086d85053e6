"""A seeded metadata + small-data load that records every acknowledged operation.

Used by the HA fault test (tests/fault/test_ha.py) and `chainfs bench ha`:

    load = MetadataLoad([c.client() for _ in range(3)], seed=7)
    load.start()
    ...                       # kill things
    load.stop()
    assert load.problems == [] and load.verify() == []

Each thread owns a directory tree ``<root>/t<k>`` and runs, drawn from its
own ``random.Random(seed, k)``: mkdir, create (write a checksummed small file
under a temporary name, then rename it into place), rename, unlink and
read-back. It keeps a model of its tree holding only acknowledged outcomes.

An operation that fails (after the client's own bounded failover and
retries; a test of failover expects none) is recorded in ``errors`` and then
reconciled: the thread looks at
what the cluster has and accepts exactly the two all-or-nothing outcomes
(applied or not applied); anything else (a file renamed to both names, wrong
bytes, a created name without its content) goes to ``problems``. ``verify()``
at the end compares every tree with its model, bytes included.

Every acknowledged operation is kept as ``Ack(start, end, thread, kind)``
(monotonic seconds) so a caller can tell when operations resumed after a
fault: :meth:`resumed_after`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_MAX_FILE_BYTES = 16 * 1024  # small files: the load is about metadata
MAX_DIRS_PER_THREAD = 16  # bound on each thread's tree fan-out
RECONCILE_TIMEOUT_S = 60.0  # looking at the outcome of a failed op may wait out a failover
_RECONCILE_PAUSE_S = 0.1


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Ack:
    start: float  # time.monotonic() when the operation was sent
    end: float  # ... and when it was acknowledged
    thread: int
    kind: str


class _Worker:
    def __init__(self, load: MetadataLoad, k: int, fs: Any) -> None:
        self.load = load
        self.k = k
        self.fs = fs
        self.rng = random.Random(f"{load.seed}/{k}")
        self.root = f"{load.root}/t{k}"
        self.dirs: list[str] = [self.root]
        self.files: dict[str, str] = {}  # path -> sha256 of the acknowledged bytes
        # Temporary names of failed creates: the create may still land later (its
        # request outlived the caller's deadline), so they may exist, any content.
        self.stray: set[str] = set()
        self.n = 0

    # -- helpers --------------------------------------------------------------
    def _ack(self, start: float, kind: str) -> None:
        self.load._record(Ack(start, time.monotonic(), self.k, kind))

    def _problem(self, what: str) -> None:
        self.load._problem(f"t{self.k}: {what}")

    def _settle(self, fn: Callable[[], T]) -> T:
        """Run a look-up until the cluster answers it (bounded)."""
        deadline = time.monotonic() + RECONCILE_TIMEOUT_S
        while True:
            try:
                return fn()
            except FileNotFoundError:
                raise
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(_RECONCILE_PAUSE_S)

    def _content(self, path: str) -> str | None:
        """sha256 of ``path``'s bytes, None if it does not exist."""
        try:
            return _digest(self._settle(lambda: self.fs.read_file(path)))
        except FileNotFoundError:
            return None

    def _is_dir(self, path: str) -> bool:
        try:
            st = self._settle(lambda: self.fs.stat(path))
        except FileNotFoundError:
            return False
        return bool(st.st_mode & 0o040000)

    def _remove_quietly(self, path: str) -> None:
        try:
            self._settle(lambda: self.fs.remove(path))
        except FileNotFoundError:
            pass

    # -- the loop ---------------------------------------------------------------
    def run(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        ops: list[tuple[Callable[[], None], int]] = [
            (self.mkdir, 1),
            (self.create, 5),
            (self.rename, 2),
            (self.unlink, 1),
            (self.read, 2),
        ]
        fns = [f for f, _ in ops]
        weights = [w for _, w in ops]
        while not self.load._stop.is_set():
            op = self.rng.choices(fns, weights)[0]
            self.n += 1
            try:
                op()
            except Exception as e:
                self._problem(f"{op.__name__} #{self.n}: could not reconcile: {e!r}")
                return

    def mkdir(self) -> None:
        if len(self.dirs) >= MAX_DIRS_PER_THREAD:
            return
        path = f"{self.rng.choice(self.dirs)}/d{self.n}"
        start = time.monotonic()
        try:
            self.fs.mkdir(path)
        except OSError as e:
            self.load._error(f"mkdir {path}: {e!r}")
            if self._is_dir(path):
                self.dirs.append(path)
            return
        self._ack(start, "mkdir")
        self.dirs.append(path)

    def create(self) -> None:
        d = self.rng.choice(self.dirs)
        data = self.rng.randbytes(self.rng.randrange(1, self.load.max_file_bytes))
        tmp, final = f"{d}/.tmp{self.n}", f"{d}/f{self.n}"
        start = time.monotonic()
        try:
            self.fs.write_file(tmp, data)
            self.fs.rename(tmp, final)
        except OSError as e:
            self.load._error(f"create {final}: {e!r}")
            got = self._content(final)
            if got is not None:
                if got != _digest(data):
                    self._problem(f"{final} appeared with wrong bytes after a failed create")
                self.files[final] = _digest(data)
                if self._content(tmp) is not None:
                    self._problem(f"{final} and {tmp} both exist after a failed rename")
            self._remove_quietly(tmp)  # a half-written temporary is allowed: drop it
            self.stray.add(tmp)
            return
        self._ack(start, "create")
        self.files[final] = _digest(data)

    def rename(self) -> None:
        if not self.files:
            return
        src = self.rng.choice(sorted(self.files))
        dst = f"{self.rng.choice(self.dirs)}/r{self.n}"
        start = time.monotonic()
        try:
            self.fs.rename(src, dst)
        except OSError as e:
            self.load._error(f"rename {src} {dst}: {e!r}")
            digest = self.files.pop(src)
            at_src, at_dst = self._content(src), self._content(dst)
            if (at_src is None) == (at_dst is None):
                self._problem(f"rename {src} -> {dst} half done: src {at_src}, dst {at_dst}")
            for path, got in ((src, at_src), (dst, at_dst)):
                if got is not None:
                    if got != digest:
                        self._problem(f"{path} has wrong bytes after a failed rename")
                    self.files[path] = digest
            return
        self._ack(start, "rename")
        self.files[dst] = self.files.pop(src)

    def unlink(self) -> None:
        if not self.files:
            return
        path = self.rng.choice(sorted(self.files))
        start = time.monotonic()
        try:
            self.fs.remove(path)
        except OSError as e:
            self.load._error(f"unlink {path}: {e!r}")
            got = self._content(path)
            if got is None:
                del self.files[path]
            elif got != self.files[path]:
                self._problem(f"{path} has wrong bytes after a failed unlink")
            return
        self._ack(start, "unlink")
        del self.files[path]

    def read(self) -> None:
        if not self.files:
            return
        path = self.rng.choice(sorted(self.files))
        start = time.monotonic()
        try:
            data = self.fs.read_file(path)
        except OSError as e:
            self.load._error(f"read {path}: {e!r}")
            return
        if _digest(data) != self.files[path]:
            self._problem(f"{path} read back wrong bytes")
        self._ack(start, "read")

    # -- final check ------------------------------------------------------------
    def verify(self) -> list[str]:
        """Differences between this thread's tree in the cluster and its model."""
        out: list[str] = []
        seen_dirs: set[str] = set()
        seen_files: set[str] = set()
        todo = [self.root]
        while todo:
            d = todo.pop()
            seen_dirs.add(d)
            for e in self.fs.scandir(d):
                path = f"{d}/{e.name}"
                if e.is_dir():
                    todo.append(path)
                else:
                    seen_files.add(path)
        for p in sorted(set(self.dirs) ^ seen_dirs):
            out.append(f"dir {p}: {'unexpected' if p in seen_dirs else 'missing'}")
        seen_files -= self.stray
        for p in sorted(set(self.files) ^ seen_files):
            out.append(f"file {p}: {'unexpected' if p in seen_files else 'missing (acked)'}")
        for p in sorted(set(self.files) & seen_files):
            if _digest(self.fs.read_file(p)) != self.files[p]:
                out.append(f"file {p}: wrong bytes")
        return out


class MetadataLoad:
    """Threads (one FileSystem each) running :class:`_Worker` loops."""

    def __init__(
        self,
        clients: Sequence[Any],
        seed: int,
        root: str = "/load",
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        if not clients:
            raise ValueError("need at least one client")
        self.seed = seed
        self.root = root.rstrip("/")
        self.max_file_bytes = max_file_bytes
        self.acks: list[Ack] = []
        self.errors: list[str] = []  # failed operations (each reconciled)
        self.problems: list[str] = []  # outcomes that were neither done nor undone
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.workers = [_Worker(self, k, fs) for k, fs in enumerate(clients)]
        self._threads = [
            threading.Thread(target=w.run, name=f"metaload-{w.k}", daemon=True)
            for w in self.workers
        ]

    def _record(self, ack: Ack) -> None:
        with self._lock:
            self.acks.append(ack)

    def _error(self, what: str) -> None:
        with self._lock:
            self.errors.append(what)

    def _problem(self, what: str) -> None:
        with self._lock:
            self.problems.append(what)

    def start(self) -> None:
        self.workers[0].fs.makedirs(self.root, exist_ok=True)
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                raise AssertionError(f"{t.name} did not stop within {timeout_s}s")

    def ack_count(self) -> int:
        with self._lock:
            return len(self.acks)

    def acks_started_after(self, t: float, thread: int | None = None) -> int:
        """Acknowledged operations sent at or after ``t`` (by one thread, or all)."""
        with self._lock:
            return sum(1 for a in self.acks if a.start >= t and thread in (None, a.thread))

    def first_ack_after(self, t: float, thread: int | None = None) -> float | None:
        """Seconds from ``t`` to the first acknowledgement after it (of one thread,
        or any): for a thread blocked on a dead server, the time it took to fail over."""
        with self._lock:
            ends = [a.end for a in self.acks if a.end >= t and thread in (None, a.thread)]
        return min(ends) - t if ends else None

    def resumed_after(self, t: float, thread: int | None = None) -> float | None:
        """Seconds from ``t`` until the first acknowledgement of an operation sent at
        or after ``t`` (by one thread, or any; None if none yet). A thread that was
        blocked in a call at ``t`` sends its next one only once that call is done."""
        with self._lock:
            ends = [a.end for a in self.acks if a.start >= t and thread in (None, a.thread)]
        return min(ends) - t if ends else None

    def longest_stall(self, t0: float, t1: float) -> float:
        """Longest time within [t0, t1] with no acknowledgement at all."""
        with self._lock:
            ends = sorted(a.end for a in self.acks if t0 <= a.end <= t1)
        points = [t0, *ends, t1]
        return max(b - a for a, b in itertools.pairwise(points))

    def verify(self) -> list[str]:
        out: list[str] = []
        for w in self.workers:
            out += w.verify()
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for a in self.acks:
                out[a.kind] = out.get(a.kind, 0) + 1
            return out
