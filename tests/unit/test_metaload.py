"""The HA load's checker (chainfs.testing.metaload) against an in-memory file
system: it accepts all-or-nothing outcomes of failed operations and catches
half-done ones, lost acknowledgements and wrong bytes."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

import pytest

from chainfs.bench.metaload import MetadataLoad

pytestmark = pytest.mark.timeout(60)


@dataclass
class _St:
    st_mode: int


@dataclass
class _Entry:
    name: str
    dir: bool

    def is_dir(self) -> bool:
        return self.dir


class FakeFS:
    """Paths -> bytes (files) or None (directories). ``mode`` injects faults into
    every ``fail_every``-th rename: "applied" (done, then an error: the reply
    was lost), "copied" (a bug: both names exist, then an error)."""

    def __init__(self, mode: str = "", fail_every: int = 3) -> None:
        self.tree: dict[str, bytes | None] = {"/": None}
        self.mode = mode
        self.fail_every = fail_every
        self.renames = 0

    def _parent_ok(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0] or "/"
        if parent not in self.tree or self.tree[parent] is not None:
            raise FileNotFoundError(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.tree.setdefault("/" + "/".join(parts[:i]), None)

    def mkdir(self, path: str) -> None:
        self._parent_ok(path)
        if path in self.tree:
            raise FileExistsError(path)
        self.tree[path] = None

    def write_file(self, path: str, data: bytes) -> None:
        self._parent_ok(path)
        self.tree[path] = bytes(data)

    def read_file(self, path: str) -> bytes:
        data = self.tree.get(path)
        if data is None:
            raise FileNotFoundError(path)
        return data

    def stat(self, path: str) -> _St:
        if path not in self.tree:
            raise FileNotFoundError(path)
        return _St(stat.S_IFDIR if self.tree[path] is None else stat.S_IFREG)

    def remove(self, path: str) -> None:
        if self.tree.get(path) is None:
            raise FileNotFoundError(path)
        del self.tree[path]

    def rename(self, src: str, dst: str) -> None:
        if src not in self.tree:
            raise FileNotFoundError(src)
        self.renames += 1
        data = self.tree[src]
        self.tree[dst] = data
        if self.mode == "copied" and self.renames % self.fail_every == 0:
            raise OSError("reply lost")
        del self.tree[src]
        if self.mode == "applied" and self.renames % self.fail_every == 0:
            raise OSError("reply lost")

    def scandir(self, path: str) -> list[_Entry]:
        prefix = path.rstrip("/") + "/"
        return [
            _Entry(p[len(prefix) :], v is None)
            for p, v in self.tree.items()
            if p.startswith(prefix) and "/" not in p[len(prefix) :]
        ]


def _run(fs: FakeFS, ops: int = 300) -> MetadataLoad:
    load = MetadataLoad([fs], seed=1, root="/l")
    load.start()
    deadline = time.monotonic() + 30
    while load.ack_count() < ops and not load.problems and time.monotonic() < deadline:
        time.sleep(0.001)
    load.stop()
    return load


def test_a_clean_run_verifies() -> None:
    fs = FakeFS()
    load = _run(fs)
    assert load.errors == [] and load.problems == [] and load.verify() == []
    assert {"create", "rename", "unlink", "mkdir", "read"} <= set(load.counts())


def test_failed_but_applied_operations_are_reconciled() -> None:
    load = _run(FakeFS("applied"))
    assert load.errors  # reported as failures...
    assert load.problems == []  # ...whose outcome is whole
    assert load.verify() == []


def test_half_done_renames_are_caught() -> None:
    load = _run(FakeFS("copied"))
    assert any("half done" in p or "both exist" in p for p in load.problems)


def test_lost_acknowledgements_and_wrong_bytes_are_caught() -> None:
    fs = FakeFS()
    load = _run(fs)
    files = sorted(p for p, v in fs.tree.items() if v is not None)
    assert len(files) >= 2
    del fs.tree[files[0]]
    fs.tree[files[1]] = os.urandom(8)
    fs.tree["/l/t0/stranger"] = b"x"
    bad = load.verify()
    assert f"file {files[0]}: missing (acked)" in bad
    assert f"file {files[1]}: wrong bytes" in bad
    assert "file /l/t0/stranger: unexpected" in bad
