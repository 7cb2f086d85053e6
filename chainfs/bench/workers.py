"""Client processes of the benchmark and the tasks they run.

Client-side work runs in separate processes started with ``spawn`` (a fresh
interpreter, nothing inherited), so a figure is what a user's process sees.
The pool is started once per run: interpreter start-up and imports stay out
of the measurements, and the peak RSS of these processes is the client's.

A task runs in ``k`` of the pool's processes at once. Timed phases start on a
shared barrier and each process reports ``t0``/``t1`` on CLOCK_MONOTONIC
(system-wide on Linux), so an aggregate rate is the total divided by
``max(t1) - min(t0)``. Bytes read back are checked: every 1 MiB segment of the
files we write starts with a stamp (magic, segment index), so a fast wrong
answer fails the workload instead of making a good number.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import struct
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from chainfs.bench.context import MiB, WorkloadFailed

SEGMENT_BYTES = MiB
_STAMP = struct.Struct("<8sQ")
_MAGIC = b"chainfsB"
BARRIER_TIMEOUT_S = 120.0  # a sibling that never arrives breaks the barrier
_STOP_TIMEOUT_S = 10.0

T = TypeVar("T")
Phase = dict[str, float]  # {"t0", "t1", "bytes", "ops"}
TaskOutput = dict[str, Any]


class DataMismatch(Exception):
    """Bytes read back are not the bytes written."""


# -- content stamps ----------------------------------------------------------
def stamp(buf: bytearray, n: int, file_offset: int) -> None:
    """Stamp each 1 MiB segment of ``buf[:n]``, to be written at ``file_offset``."""
    assert file_offset % SEGMENT_BYTES == 0 and n % SEGMENT_BYTES == 0 and n <= len(buf)
    first = file_offset // SEGMENT_BYTES
    for i in range(0, n, SEGMENT_BYTES):
        _STAMP.pack_into(buf, i, _MAGIC, first + i // SEGMENT_BYTES)


def check_stamps(buf: bytes | bytearray | memoryview, n: int, file_offset: int, what: str) -> None:
    """Check the stamps of the segments that start inside ``buf[:n]``."""
    i = -file_offset % SEGMENT_BYTES
    while i + _STAMP.size <= n:
        magic, index = _STAMP.unpack_from(buf, i)
        want = (file_offset + i) // SEGMENT_BYTES
        if magic != _MAGIC or index != want:
            raise DataMismatch(
                f"{what}: segment at offset {file_offset + i} holds {magic!r}/{index}, "
                f"expected {_MAGIC!r}/{want}"
            )
        i += SEGMENT_BYTES


# -- file system back-ends -----------------------------------------------------
class PosixBackend:
    """A local directory or the FUSE mount, through the OS (unbuffered files)."""

    kind = "posix"

    def open(self, path: str, mode: str, buffering: int = 0) -> Any:
        return open(path, mode, buffering=0)  # always unbuffered: the OS page cache is the buffer

    def stat(self, path: str) -> Any:
        return os.stat(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def mkdir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def remove(self, path: str) -> None:
        os.unlink(path)

    def durable_close(self, f: Any) -> None:
        """What `dd conv=fsync` does: the bytes are on the servers' disks."""
        os.fsync(f.fileno())
        f.close()

    def close(self) -> None:
        pass


class ChainfsBackend:
    """The chainfs client library: ``chainfs.connect(address, token=token)``."""

    kind = "chainfs"

    def __init__(self, address: str, token: str | None) -> None:
        import chainfs

        self.address = address
        self.fs = chainfs.connect(address, token=token)

    def open(self, path: str, mode: str, buffering: int = -1) -> Any:
        return self.fs.open(path, mode, buffering)

    def stat(self, path: str) -> Any:
        return self.fs.stat(path)

    def listdir(self, path: str) -> list[str]:
        return list(self.fs.listdir(path))

    def mkdir(self, path: str) -> None:
        self.fs.mkdir(path, parents=True, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        self.fs.rename(src, dst)

    def remove(self, path: str) -> None:
        self.fs.remove(path)

    def durable_close(self, f: Any) -> None:
        f.close()  # close() returns once every chunk is committed on its chain

    def close(self) -> None:
        self.fs.close()


Backend = PosixBackend | ChainfsBackend


# -- the worker process --------------------------------------------------------
@dataclass
class TaskEnv:
    """What a task sees: its index among ``parties`` processes and the phase sync."""

    index: int
    parties: int
    barrier: Any  # multiprocessing Barrier shared by the ``parties`` processes, or None
    backends: dict[str, Backend]

    def sync(self) -> float:
        """Wait until all processes of the task are here; the phase starts now."""
        if self.barrier is not None:
            self.barrier.wait(BARRIER_TIMEOUT_S)
        return time.monotonic()

    def backend(self, spec: dict[str, Any]) -> Backend:
        if spec["kind"] == "posix":
            key = "posix"
        else:  # the token is part of the key: one connection per identity
            key = f"chainfs:{spec['address']}:{spec.get('token') or ''}"
        if key not in self.backends:
            self.backends[key] = (
                PosixBackend()
                if spec["kind"] == "posix"
                else ChainfsBackend(spec["address"], spec.get("token") or None)
            )
        return self.backends[key]


def _worker_main(index: int, conn: Connection, barriers: dict[int, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    backends: dict[str, Backend] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            task, parties, params = msg
            env = TaskEnv(index, parties, barriers.get(parties), backends)
            try:
                conn.send(("ok", TASKS[task](env, params)))
            except BaseException as e:  # every error fails the task: ENOSYS and ImportError too
                text = f"{type(e).__name__}: {e}"
                if not isinstance(e, DataMismatch):
                    text += "\n" + traceback.format_exc(limit=8)
                conn.send(("error", text))
    finally:
        for b in backends.values():
            try:
                b.close()
            except Exception:
                traceback.print_exc()


class WorkerPool:
    """``size`` spawned client processes that run tasks on request."""

    def __init__(self, size: int) -> None:
        mp = multiprocessing.get_context("spawn")
        self.size = size
        self.broken = False
        self._barriers = {k: mp.Barrier(k) for k in range(2, size + 1)}
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        try:
            for i in range(size):
                parent_end, child_end = mp.Pipe()
                p = mp.Process(
                    target=_worker_main,
                    args=(i, child_end, self._barriers),
                    name=f"chainfs-bench-client{i}",
                    daemon=True,
                )
                p.start()
                child_end.close()
                self._conns.append(parent_end)
                self._procs.append(p)
        except BaseException:
            self.close()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        """Return once every process has started and answers (imports done)."""
        self.run("peak_rss", [{}] * self.size, timeout_s)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None and p.is_alive()]

    def run(
        self, task: str, params: Sequence[dict[str, Any]], timeout_s: float
    ) -> list[TaskOutput]:
        """Run ``task`` in the first ``len(params)`` processes, one params dict each.

        Raises WorkloadFailed on any error in a process (named, with its
        traceback), its death or a timeout (the pool is then broken: replace it).
        """
        k = len(params)
        assert 1 <= k <= self.size, (k, self.size)
        assert not self.broken, "pool broken by an earlier failure"
        for i, p in enumerate(params):
            self._conns[i].send((task, k, p))
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        aborted = False
        while len(replies) < k:
            pending = [self._conns[i] for i in range(k) if i not in replies]
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(pending, timeout=max(0.0, left))
            if not ready:
                self.close()
                raise WorkloadFailed(f"task {task} not done after {timeout_s:.0f}s")
            for c in ready:
                i = next(j for j, conn in enumerate(self._conns) if conn is c)
                try:
                    replies[i] = self._conns[i].recv()
                except EOFError:
                    code = self._procs[i].exitcode
                    self.close()
                    raise WorkloadFailed(
                        f"client process {i} died during {task} (exit code {code})"
                    ) from None
                if replies[i][0] != "ok" and k > 1 and not aborted:
                    self._barriers[k].abort()  # release siblings waiting for this one
                    aborted = True
        if aborted:
            self._barriers[k].reset()
        errors = [r[1] for r in replies.values() if r[0] == "error"]
        if errors:
            raise WorkloadFailed(errors[0])
        return [replies[i][1] for i in range(k)]

    def close(self) -> None:
        """Ask every process to finish; kill the ones that do not (ours only)."""
        self.broken = True
        for c in self._conns:
            try:
                c.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(_STOP_TIMEOUT_S)
        for c in self._conns:
            c.close()
        self._conns.clear()
        self._procs.clear()
        self._barriers = {}  # their semaphores go with the processes that shared them


def _call_and_send(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException:
        conn.send((False, traceback.format_exc(limit=8)))


def in_fresh_process(fn: Callable[..., T], *args: Any, timeout_s: float, daemon: bool = True) -> T:
    """``fn(*args)`` in a new spawned interpreter: its own memory (a peak RSS of its
    own), nothing inherited. ``fn`` must be a module-level function. ``daemon=False``
    lets ``fn`` start processes of its own (multiprocessing forbids it in a daemon)."""
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_and_send, args=(child_end, fn, args), daemon=daemon)
    proc.start()
    child_end.close()
    try:
        if not parent_end.poll(timeout_s):
            raise WorkloadFailed(f"{fn.__name__} not done after {timeout_s:.0f}s")
        ok, value = parent_end.recv()
    except EOFError:
        raise WorkloadFailed(f"{fn.__name__}: process died (exit {proc.exitcode})") from None
    finally:
        parent_end.close()
        proc.join(_STOP_TIMEOUT_S)
        if proc.is_alive():  # ours, by its handle
            proc.kill()
            proc.join()
    if not ok:
        raise WorkloadFailed(f"{fn.__name__} failed:\n{value}")
    result: T = value
    return result


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size of a live process: VmHWM, else its current RSS (psutil)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def aggregate(outputs: Sequence[TaskOutput], phase: str) -> tuple[float, float, float]:
    """(bytes, ops, seconds) of ``phase`` over all processes, wall clock start to end."""
    phases: list[Phase] = [o[phase] for o in outputs]
    seconds = max(p["t1"] for p in phases) - min(p["t0"] for p in phases)
    if seconds <= 0:
        raise WorkloadFailed(f"phase {phase} took no measurable time")
    return sum(p["bytes"] for p in phases), sum(p["ops"] for p in phases), seconds


# -- tasks (run inside the worker processes) -----------------------------------
def _phase(t0: float, t1: float, nbytes: int, ops: int) -> Phase:
    return {"t0": t0, "t1": t1, "bytes": float(nbytes), "ops": float(ops)}


def _write_all(f: Any, view: memoryview) -> None:
    while view.nbytes:
        n = f.write(view)
        if not isinstance(n, int) or n <= 0:
            raise WorkloadFailed(f"write returned {n!r} for {view.nbytes} bytes")
        view = view[n:]


def _read_exact(f: Any, view: memoryview) -> int:
    """readinto until ``view`` is full or EOF; the byte count."""
    got = 0
    while got < view.nbytes:
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _timed_loop(env: TaskEnv, op: Callable[[], int], p: dict[str, Any]) -> tuple[Phase, int]:
    """Run ``op`` (it returns bytes moved) untimed for ``warmup_seconds`` (at least
    once: connections, buffers, caches), then from the shared start for ``seconds``.
    The phase with ops = calls, and the number of calls."""
    warm_until = time.monotonic() + float(p["warmup_seconds"])
    op()
    while time.monotonic() < warm_until:
        op()
    t0 = env.sync()
    stop_at = t0 + float(p["seconds"])
    calls = nbytes = 0
    while time.monotonic() < stop_at:
        nbytes += op()
        calls += 1
    return _phase(t0, time.monotonic(), nbytes, calls), calls


def task_mkdirs(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    be = env.backend(p["backend"])
    for path in p["paths"]:
        be.mkdir(path)
    return {}


def task_seq_write(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Write one file sequentially in ``block_bytes`` requests, then make it durable."""
    be = env.backend(p["backend"])
    path, size, block = p["paths"][env.index], int(p["size_bytes"]), int(p["block_bytes"])
    assert block % SEGMENT_BYTES == 0 and size % SEGMENT_BYTES == 0
    buf = bytearray(os.urandom(block))
    view = memoryview(buf)
    f = be.open(path, "wb")
    try:
        t0 = env.sync()
        stop_at = t0 + float(p["max_seconds"])
        written = ops = 0
        while written < size and time.monotonic() < stop_at:
            n = min(block, size - written)
            stamp(buf, n, written)
            _write_all(f, view[:n])
            written += n
            ops += 1
        be.durable_close(f)
        t1 = time.monotonic()
    except BaseException:
        f.close()
        raise
    return {"write": _phase(t0, t1, written, ops), "path": path, "size": written}


def task_seq_read(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Read one file from start to end in ``block_bytes`` requests, checking stamps."""
    be = env.backend(p["backend"])
    path, size, block = p["paths"][env.index], int(p["sizes"][env.index]), int(p["block_bytes"])
    buf = bytearray(block)
    view = memoryview(buf)
    with be.open(path, "rb") as f:
        t0 = env.sync()
        stop_at = t0 + float(p["max_seconds"])
        off = ops = 0
        while off < size and time.monotonic() < stop_at:
            n = _read_exact(f, view)
            if n == 0:
                break
            check_stamps(buf, n, off, path)
            off += n
            ops += 1
        t1 = time.monotonic()
    if off < size and t1 < stop_at:
        raise DataMismatch(f"{path}: read {off} bytes, the file has {size}")
    return {"read": _phase(t0, t1, off, ops)}


def task_rand_read(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Read ``io_bytes`` at random aligned offsets of one file for ``seconds``."""
    be = env.backend(p["backend"])
    path, size, io = p["path"], int(p["size_bytes"]), int(p["io_bytes"])
    slots = size // io
    if slots < 1:
        raise WorkloadFailed(f"{path} ({size} bytes) is smaller than one {io}-byte read")
    rng = random.Random(int(p["seed"]) * 1000 + env.index)
    buf = bytearray(io)
    view = memoryview(buf)
    # Unbuffered on both sides: each read asks for exactly ``io`` bytes (a
    # buffered chainfs file would fetch a read-ahead window per random read).
    with be.open(path, "rb", buffering=0) as f:

        def one() -> int:
            off = rng.randrange(slots) * io
            f.seek(off)
            n = _read_exact(f, view)
            if n != io:
                raise DataMismatch(f"{path}: {n} bytes at offset {off}, expected {io}")
            check_stamps(buf, n, off, path)
            return n

        phase, _ = _timed_loop(env, one, p)
    return {"read": phase}


def random_range(
    rng: random.Random, files: Sequence[tuple[str, int]], length: int, align: int = 4096
) -> tuple[str, int, int]:
    """(path, offset, length): a random file of ``files`` ((path, size) pairs) and an
    ``align``-aligned offset at which ``length`` bytes fit in it."""
    path, size = files[rng.randrange(len(files))]
    if length > size:
        raise WorkloadFailed(f"{path} ({size} bytes) is smaller than one {length}-byte sample")
    return path, rng.randrange((size - length) // align + 1) * align, length


def check_sample(path: str, offset: int, length: int, data: Any) -> int:
    """Check that ``data`` is the ``length`` bytes at ``offset`` of ``path``; its length."""
    view = memoryview(data).cast("B")
    if view.nbytes != length:
        raise DataMismatch(f"{path}: {view.nbytes} bytes at {offset}, expected {length}")
    check_stamps(view, length, offset, path)
    return length


def task_read_ranges(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Dataloader pattern: batches of random samples through ``fs.read_ranges``."""
    be = env.backend(p["backend"])
    assert isinstance(be, ChainfsBackend)
    read_ranges = be.fs.read_ranges
    files: list[tuple[str, int]] = [(str(a), int(b)) for a, b in p["files"]]
    lo, hi, batch = int(p["sample_min"]), int(p["sample_max"]), int(p["batch"])
    rng = random.Random(int(p["seed"]) * 1000 + env.index)

    def one_batch() -> int:
        reqs = [
            random_range(rng, files, rng.randint(lo // 4096, hi // 4096) * 4096)
            for _ in range(batch)
        ]
        out = read_ranges(reqs)
        if len(out) != len(reqs):
            raise DataMismatch(f"read_ranges returned {len(out)} buffers for {len(reqs)}")
        return sum(check_sample(*r, data) for r, data in zip(reqs, out, strict=True))

    phase, calls = _timed_loop(env, one_batch, p)
    phase["ops"] = float(calls * batch)  # samples
    return {"read": phase}


def task_usrbio_batch(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Batches of ``ranges`` random ``range_bytes`` reads through the I/O agent at
    ``socket``, into one registered shared buffer (``read_ranges_into``)."""
    from chainfs import usrbio

    files: list[tuple[str, int]] = [(str(a), int(b)) for a, b in p["files"]]
    count, length = int(p["ranges"]), int(p["range_bytes"])
    rng = random.Random(int(p["seed"]) * 1000 + env.index)
    with usrbio.connect(p["socket"]) as agent, agent.register_buffer(count * length) as buf:

        def one_batch() -> int:
            # Offsets aligned to the stamp segments: every range's bytes are checked.
            ranges = [random_range(rng, files, length, SEGMENT_BYTES) for _ in range(count)]
            views = agent.read_ranges_into(ranges, buf)
            return sum(check_sample(*r, v) for r, v in zip(ranges, views, strict=True))

        phase, _ = _timed_loop(env, one_batch, p)
    return {"read": phase}  # ops: batches


META_TASK_PHASES = ("create", "stat", "readdir", "rename", "unlink")


def task_meta(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """create, stat, readdir, rename, unlink of small files in this process's directory
    (``phases``: a subset of them, in that order; the default is all)."""
    be = env.backend(p["backend"])
    d = f"{p['root']}/w{env.index}"
    be.mkdir(d)
    files, cap = int(p["files"]), float(p["max_seconds"])
    phases = set(p.get("phases", META_TASK_PHASES))
    out: TaskOutput = {}

    t0 = env.sync()
    n = 0
    while n < files and time.monotonic() < t0 + cap:
        be.open(f"{d}/f{n:07d}", "wb").close()
        n += 1
    out["create"] = _phase(t0, time.monotonic(), 0, n)
    if "stat" in phases:
        out["stat"] = _stat_phase(env, be, d, n, cap)
    if "readdir" in phases:
        out["readdir"] = _readdir_phase(env, be, d, n, cap, int(p["readdir_rounds"]))
    renamed = 0
    if "rename" in phases:
        t0 = env.sync()
        while renamed < n and time.monotonic() < t0 + cap:
            be.rename(f"{d}/f{renamed:07d}", f"{d}/r{renamed:07d}")
            renamed += 1
        out["rename"] = _phase(t0, time.monotonic(), 0, renamed)

    def name(i: int) -> str:
        return f"{d}/r{i:07d}" if i < renamed else f"{d}/f{i:07d}"

    t0 = env.sync()
    removed = 0
    while removed < n and time.monotonic() < t0 + cap:
        be.remove(name(removed))
        removed += 1
    out["unlink"] = _phase(t0, time.monotonic(), 0, removed)
    env.sync()  # the rest, untimed, once every process has stopped its clock
    for i in range(removed, n):
        be.remove(name(i))
    left = be.listdir(d)
    if left:
        raise DataMismatch(f"{d} still lists {len(left)} entries after unlinking all")
    return out


def _stat_phase(env: TaskEnv, be: Backend, d: str, n: int, cap: float) -> Phase:
    t0 = env.sync()
    k = 0
    while k < n and time.monotonic() < t0 + cap:
        st = be.stat(f"{d}/f{k:07d}")
        if st.st_size != 0:
            raise DataMismatch(f"{d}/f{k:07d}: size {st.st_size}, created empty")
        k += 1
    return _phase(t0, time.monotonic(), 0, k)


def _readdir_phase(env: TaskEnv, be: Backend, d: str, n: int, cap: float, rounds: int) -> Phase:
    t0 = env.sync()
    entries = 0
    for _ in range(rounds):
        names = be.listdir(d)
        if len(names) != n:
            raise DataMismatch(f"listdir({d}) gave {len(names)} entries, created {n}")
        entries += len(names)
        if time.monotonic() > t0 + cap:
            break
    return _phase(t0, time.monotonic(), 0, entries)


def _entry(directory: str, i: int) -> str:
    return f"{directory}/e{i:07d}"


def task_populate(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Create (or with ``remove``, unlink) this process's share of ``count`` empty
    files in ``dir``, untimed: the set-up and clean-up of the readdir test."""
    be = env.backend(p["backend"])
    for i in range(env.index, int(p["count"]), env.parties):
        if p.get("remove"):
            be.remove(_entry(p["dir"], i))
        else:
            be.open(_entry(p["dir"], i), "wb").close()
    return {}


def task_listdir_loop(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """List ``dir`` (``count`` entries) again and again, at least ``min_reps`` times
    and ``min_seconds`` long; every listing must hold every entry."""
    be = env.backend(p["backend"])
    want, reps = int(p["count"]), 0
    t0 = env.sync()
    while True:
        got = len(be.listdir(p["dir"]))
        if got != want:
            raise DataMismatch(f"listdir({p['dir']}) gave {got} entries, created {want}")
        reps += 1
        if reps >= int(p["min_reps"]) and time.monotonic() - t0 >= float(p["min_seconds"]):
            break
    return {"readdir": _phase(t0, time.monotonic(), 0, reps * want), "reps": reps}


def task_churn(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """This process's share of ``ops`` metadata operations: create ``batch`` empty
    files, unlink them, again (what a long-lived namespace has been through)."""
    be = env.backend(p["backend"])
    d = f"{p['root']}/c{env.index}"
    be.mkdir(d)
    mine = int(p["ops"]) // env.parties + 1
    batch = int(p["batch"])
    t0 = env.sync()
    done = rnd = 0
    while done < mine:
        names = [f"{d}/x{rnd}-{i}" for i in range(batch)]
        for name in names:
            be.open(name, "wb").close()
        for name in names:
            be.remove(name)
        done += 2 * batch
        rnd += 1
    return {"churn": _phase(t0, time.monotonic(), 0, done)}


def _kv_value(size: int, index: int) -> bytes:
    buf = bytearray(os.urandom(size))
    buf[: _STAMP.size] = _STAMP.pack(_MAGIC, index)
    return bytes(buf)


def _kv_check(key: str, value: Any, size: int, index: int) -> None:
    if value is None:
        raise DataMismatch(f"kvcache key {key} missing after put")
    view = memoryview(value).cast("B")
    if view.nbytes != size or _STAMP.unpack_from(view, 0) != (_MAGIC, index):
        raise DataMismatch(f"kvcache key {key}: wrong value ({view.nbytes} bytes)")


_KV_WARM_BATCH = 64  # keys per batch_get of the untimed pass that reads every key once


def _kvcache(be: Backend, directory: str) -> Any:
    assert isinstance(be, ChainfsBackend)
    return be.fs.kvcache(directory)


def task_kv_put(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Put this process's share of ``count`` values of ``value_bytes`` (capped in time)."""
    kv = _kvcache(env.backend(p["backend"]), p["dir"])
    try:
        size, prefix = int(p["value_bytes"]), p["prefix"]
        mine = range(env.index, int(p["count"]), env.parties)
        values = {i: _kv_value(size, i) for i in mine}
        done: list[int] = []
        t0 = env.sync()
        stop_at = t0 + float(p["max_seconds"])
        for i, v in values.items():
            if done and time.monotonic() >= stop_at:
                break
            if not kv.put(f"{prefix}{i:07d}", v):
                raise DataMismatch(f"kvcache put {prefix}{i:07d}: key already present")
            done.append(i)
        t1 = time.monotonic()
    finally:
        kv.close()
    return {"put": _phase(t0, t1, size * len(done), len(done)), "indices": done}


def task_kv_get(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Random gets of present keys for ``seconds``: ``batch_get`` of ``batch``, or ``get``.

    The steady state of a reader: every key is read once first, untimed, so the
    handle knows where each one is (and renews that in the background). The first
    get of a key, a lookup at meta too, is measured by ``kv_get_first``."""
    kv = _kvcache(env.backend(p["backend"]), p["dir"])
    try:
        size, prefix = int(p["value_bytes"]), p["prefix"]
        present: list[int] = p["indices"]
        batch = int(p["batch"])
        rng = random.Random(int(p["seed"]) * 1000 + env.index)
        every = [f"{prefix}{i:07d}" for i in present]
        for lo in range(0, len(every), _KV_WARM_BATCH):
            kv.batch_get(every[lo : lo + _KV_WARM_BATCH])

        def one_batch() -> int:
            idx = [present[rng.randrange(len(present))] for _ in range(batch)]
            keys = [f"{prefix}{i:07d}" for i in idx]
            values = kv.batch_get(keys) if batch > 1 else [kv.get(keys[0])]
            if len(values) != len(keys):
                raise DataMismatch(f"batch_get returned {len(values)} values for {len(keys)} keys")
            for key, i, v in zip(keys, idx, values, strict=True):
                _kv_check(key, v, size, i)
            return batch * size

        phase, calls = _timed_loop(env, one_batch, p)
        phase["ops"] = float(calls * batch)  # values got
    finally:
        kv.close()
    return {"get": phase}


def task_kv_get_first(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """The first get of each present key by a new handle (a lookup at meta, then
    the read), in random order, this process's share, for at most ``seconds``."""
    kv = _kvcache(env.backend(p["backend"]), p["dir"])
    try:
        size, prefix = int(p["value_bytes"]), p["prefix"]
        order: list[int] = list(p["indices"])
        random.Random(int(p["seed"]) * 1000 + 7).shuffle(order)
        mine = order[env.index :: env.parties]
        done = 0
        t0 = env.sync()
        stop_at = t0 + float(p["seconds"])
        for i in mine:
            if done and time.monotonic() >= stop_at:
                break
            key = f"{prefix}{i:07d}"
            _kv_check(key, kv.get(key), size, i)
            done += 1
        t1 = time.monotonic()
    finally:
        kv.close()
    return {"get": _phase(t0, t1, size * done, done)}


def task_rmtree(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Remove a chainfs directory tree (the --address run cleans up after itself)."""
    be = env.backend(p["backend"])
    assert isinstance(be, ChainfsBackend)
    rmdir = be.fs.rmdir

    def walk(path: str) -> None:
        for name in be.listdir(path):
            child = f"{path}/{name}"
            if (be.stat(child).st_mode & 0o170000) == 0o040000:
                walk(child)
            else:
                be.remove(child)
        rmdir(path)

    walk(p["path"])
    return {}


def task_close_backends(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    """Close and forget connections (before the cluster they point at stops)."""
    for key in list(env.backends):
        if key.startswith("chainfs:"):
            env.backends.pop(key).close()
    return {}


def task_peak_rss(env: TaskEnv, p: dict[str, Any]) -> TaskOutput:
    import resource

    return {"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


TASKS: dict[str, Callable[[TaskEnv, dict[str, Any]], TaskOutput]] = {
    "mkdirs": task_mkdirs,
    "seq_write": task_seq_write,
    "seq_read": task_seq_read,
    "rand_read": task_rand_read,
    "read_ranges": task_read_ranges,
    "usrbio_batch": task_usrbio_batch,
    "meta": task_meta,
    "populate": task_populate,
    "listdir_loop": task_listdir_loop,
    "churn": task_churn,
    "kv_put": task_kv_put,
    "kv_get": task_kv_get,
    "kv_get_first": task_kv_get_first,
    "rmtree": task_rmtree,
    "close_backends": task_close_backends,
    "peak_rss": task_peak_rss,
}
