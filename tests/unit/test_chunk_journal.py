"""Small overwrites written in place (journaled) by the chunk engine.

A model (bytes per version) against the engine: reads between prepare and
commit see the old bytes, the chunk file is never copied, per-block CRCs stay
exact, and a crash at any step of the update (simulated by an exception where
the process would die, then reopening the target) leaves the old version or
the new one, never a mix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_engine import ChunkEngine, EngineOptions
from chainfs.storage_service.chunk_record import ChunkRecord, Origin

CHUNK = 1 << 20
OPTS = EngineOptions(crc_block_bytes=4096, journal_write_max_bytes=16 * 1024)
KEY = (9, 0)


class Crash(Exception):
    """The storage process dies here."""


def _write(eng: ChunkEngine, offset: int, data: bytes, version: int) -> ChunkRecord:
    return eng.prepare_write(*KEY, offset, memoryview(data), crc.value(data), CHUNK, version)


def _committed_bytes(eng: ChunkEngine) -> bytes:
    """What a reader of the committed version gets from the chunk file, checked
    against the committed CRCs (a reader that looked up the record before a prepare)."""
    rec = eng.get(*KEY)
    assert rec is not None
    buf = memoryview(bytearray(rec.length))
    assert eng.files.read(*KEY, rec.file_gen, 0, buf) == rec.length
    assert crc.value(buf) == rec.crc32c
    assert crc.block_crcs(buf, rec.block_size) == rec.block_crcs
    return bytes(buf)


def _check_committed(eng: ChunkEngine, want: bytes, version: int) -> None:
    rec = eng.get(*KEY)
    assert rec is not None and not rec.has_pending and not rec.journal_applying
    assert rec.committed_version == version
    assert rec.crc32c == crc.value(want)
    assert rec.block_crcs == crc.block_crcs(want, rec.block_size)
    for verify in (True, False):
        assert bytes(eng.read(*KEY, 0, CHUNK, verify=verify)[1]) == want
    assert eng.records.journal_keys() == []


def _new_chunk(path: Path, size: int = 200_000) -> tuple[ChunkEngine, bytes]:
    eng = ChunkEngine(path, OPTS)
    base = os.urandom(size)
    _write(eng, 0, base, 1)
    eng.commit(*KEY, 1, 1)
    return eng, base


WRITES = st.lists(
    st.tuples(st.integers(0, 199_999), st.binary(min_size=1, max_size=20_000), st.booleans()),
    min_size=1,
    max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=WRITES)
def test_small_overwrites_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, writes: Any
) -> None:
    eng, model = _new_chunk(tmp_path_factory.mktemp("j") / "t")
    gen = eng.get(*KEY).file_gen  # type: ignore[union-attr]
    version = 1
    try:
        for offset, data, commit in writes:
            offset = min(offset, len(model) - 1)  # inside the committed bytes
            pending = _write(eng, offset, data, version + 1)
            new = bytearray(model) + bytes(max(0, offset + len(data) - len(model)))
            new[offset : offset + len(data)] = data
            assert pending.pending_journal == (len(data) <= OPTS.journal_write_max_bytes)
            assert pending.pending_crc32c == crc.value(bytes(new))
            # Between prepare and commit: readers are told "not committed", and the
            # committed bytes (what a reader already under way gets) are the old ones.
            with pytest.raises(ChainfsError) as e:
                eng.read(*KEY, 0, 10, verify=True)
            assert e.value.code == Code.NOT_COMMITTED
            assert _committed_bytes(eng) == model
            assert bytes(eng.read_pending(*KEY, pending)) == bytes(new)
            if commit:
                eng.commit(*KEY, version + 1, 1)
                version += 1
                model = bytes(new)
            else:
                eng.abort(*KEY)
            _check_committed(eng, model, version)
            if eng.get(*KEY).file_gen == gen:  # type: ignore[union-attr]
                assert os.path.getsize(eng.file_path(*KEY, gen)) == len(model)
    finally:
        eng.close()


def test_small_overwrite_never_copies_the_chunk(tmp_path: Path) -> None:
    eng, base = _new_chunk(tmp_path / "t", CHUNK)
    path = eng.file_path(*KEY, 1)
    ino = os.stat(path).st_ino
    patch = os.urandom(4096)
    _write(eng, 12_345, patch, 2)
    eng.commit(*KEY, 2, 1)
    rec = eng.get(*KEY)
    assert rec is not None and rec.file_gen == 1  # same file, written in place
    assert os.stat(path).st_ino == ino
    want = bytearray(base)
    want[12_345 : 12_345 + 4096] = patch
    _check_committed(eng, bytes(want), 2)
    eng.close()


def _crash_in(eng: ChunkEngine, obj: Any, name: str, torn: bool = False) -> None:
    """Make ``obj.name`` kill the process (``torn``: after writing half its bytes)."""
    real: Callable[..., Any] = getattr(obj, name)

    def dying(*args: Any, **kwargs: Any) -> None:
        if torn:
            *head, data = args
            real(*head, data[: len(data) // 2], **kwargs)
        raise Crash(name)

    setattr(obj, name, dying)


@pytest.mark.parametrize(
    "step, survives",
    [
        ("put_with_journal", "old"),  # dies before the pending record + journal are written
        ("prepared", "pending"),  # dies between prepare and commit
        ("switch", "pending"),  # dies writing the committed record
        ("write_in_place", "new"),  # dies before the bytes reach the chunk file
        ("torn", "new"),  # dies with half the bytes in the chunk file
        ("put_dropping_journal", "new"),  # dies before the journal is dropped
    ],
)
def test_crash_during_a_small_overwrite(tmp_path: Path, step: str, survives: str) -> None:
    eng, base = _new_chunk(tmp_path / "t")
    patch = os.urandom(9000)  # crosses CRC blocks, starts and ends mid-block
    new = bytearray(base)
    new[5000:14000] = patch
    if step == "put_with_journal":
        _crash_in(eng, eng.records, "put_with_journal")
    elif step == "switch":
        _crash_in(eng, eng.records, "put")
    elif step in ("write_in_place", "torn"):
        _crash_in(eng, eng.files, "write_in_place", torn=step == "torn")
    elif step == "put_dropping_journal":
        _crash_in(eng, eng.records, "put_dropping_journal")
    try:
        _write(eng, 5000, patch, 2)
        if step != "prepared":
            eng.commit(*KEY, 2, 1)
    except Crash:
        pass
    else:
        assert step == "prepared"
    eng.close()
    eng = ChunkEngine(tmp_path / "t", OPTS)  # restart: recovery
    try:
        if survives == "old":
            _check_committed(eng, base, 1)
            return
        if survives == "new":
            assert eng.recovered["journals_applied"] == 1
            _check_committed(eng, bytes(new), 2)
            return
        # Pending survives the restart (the chain re-drives it): the old bytes
        # stay intact beneath it; committing gives the new, aborting the old.
        rec = eng.get(*KEY)
        assert rec is not None and rec.pending_journal and eng.recovered["pending_kept"] == 1
        assert _committed_bytes(eng) == base
        assert bytes(eng.read_pending(*KEY, rec)) == bytes(new)
        eng.commit(*KEY, 2, 1)
        _check_committed(eng, bytes(new), 2)
    finally:
        eng.close()


def test_a_dropped_journaled_version_leaves_no_journal(tmp_path: Path) -> None:
    eng, base = _new_chunk(tmp_path / "t")
    # Replaced by a new update of the same version (a new head re-sends it).
    _write(eng, 100, b"a" * 100, 2)
    _write(eng, 300, b"b" * 100, 2)
    assert len(eng.records.journal_keys()) == 1
    eng.commit(*KEY, 2, 1)
    want = bytearray(base)
    want[300:400] = b"b" * 100
    _check_committed(eng, bytes(want), 2)
    # Replaced by a full-chunk copy (resync), and aborted.
    _write(eng, 100, b"c" * 100, 3)
    full = os.urandom(1000)
    eng.prepare_replace(*KEY, memoryview(full), crc.value(full), CHUNK, 5)
    eng.commit(*KEY, 5, 1)
    _check_committed(eng, full, 5)
    _write(eng, 10, b"d" * 10, 6)
    eng.abort(*KEY)
    _check_committed(eng, full, 5)
    # Removed while a journaled write is pending.
    _write(eng, 10, b"e" * 10, 6)
    rec = eng.prepare_remove(*KEY)
    assert rec is not None and eng.records.journal_keys() == []
    assert eng.commit(*KEY, rec.pending_version, 1) is None
    eng.close()


def test_recovery_drops_journals_nothing_refers_to(tmp_path: Path) -> None:
    eng, base = _new_chunk(tmp_path / "t")
    before = eng.get(*KEY)
    assert before is not None
    _write(eng, 10, b"x" * 10, 2)
    eng.records.put(*KEY, before)  # the record forgets the journal (it outlived its record)
    eng.close()
    eng = ChunkEngine(tmp_path / "t", OPTS)
    assert eng.recovered["orphans"] == 1
    _check_committed(eng, base, 1)
    eng.close()


def test_journal_bound_is_checked() -> None:
    from chainfs.storage_service.config import StorageConfig

    for bad in (-1, 64 << 20):
        with pytest.raises(ValueError, match="journal_write_max_bytes"):
            EngineOptions(journal_write_max_bytes=bad)
        with pytest.raises(ValueError, match="journal_write_max_bytes"):
            StorageConfig(journal_write_max_bytes=bad).validate()
    # 0 turns journaling off: every partial overwrite copies the chunk.
    assert EngineOptions(journal_write_max_bytes=0).journal_write_max_bytes == 0


def test_journaling_off_copies_the_chunk(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t", EngineOptions(journal_write_max_bytes=0))
    base = os.urandom(100_000)
    _write(eng, 0, base, 1)
    eng.commit(*KEY, 1, 1)
    pending = _write(eng, 10, b"z" * 10, 2)
    assert not pending.pending_journal and pending.pending_file_gen == 2
    eng.commit(*KEY, 2, 1)
    _check_committed(eng, base[:10] + b"z" * 10 + base[20:], 2)
    eng.close()


@pytest.mark.parametrize(
    "step, survives",
    [
        ("put_with_journal", "old"),  # dies before the decided record + journal are written
        ("write_in_place", "new"),  # dies before the bytes reach the chunk file
        ("torn", "new"),  # dies with half the bytes in the chunk file
        ("put_dropping_journal", "new"),  # dies before the journal is dropped
        ("lost_drop", "new"),  # a power loss drops the unsynced journal drop
    ],
)
def test_crash_during_a_small_overwrite_committed_at_once(
    tmp_path: Path, step: str, survives: str
) -> None:
    """A tail writes a small overwrite as committed at once (no pending version):
    a crash at any step leaves the old version or the new one, never a mix."""
    eng, base = _new_chunk(tmp_path / "t")
    patch = os.urandom(9000)
    new = bytearray(base)
    new[5000:14000] = patch
    if step == "put_with_journal":
        _crash_in(eng, eng.records, "put_with_journal")
    elif step in ("write_in_place", "torn"):
        _crash_in(eng, eng.files, "write_in_place", torn=step == "torn")
    elif step == "put_dropping_journal":
        _crash_in(eng, eng.records, "put_dropping_journal")
    decided: list[ChunkRecord] = []
    if step == "lost_drop":
        real = eng.records.put_with_journal

        def keep(*args: Any) -> None:
            decided.append(args[2])
            real(*args)

        eng.records.put_with_journal = keep  # type: ignore[method-assign]
    try:
        rec = eng.prepare_write(
            *KEY, 5000, memoryview(patch), crc.value(patch), CHUNK, 2, commit_at=1
        )
    except Crash:
        assert step != "lost_drop"
    else:
        assert step == "lost_drop" and rec.committed_version == 2 and not rec.has_pending
        # What a power loss that dropped the journal drop leaves: the decided record
        # and its journal, the new bytes already in the file.
        eng.records.put_with_journal(*KEY, decided[0], 5000, memoryview(patch))
    eng.close()
    eng = ChunkEngine(tmp_path / "t", OPTS)  # restart: recovery
    try:
        if survives == "old":
            _check_committed(eng, base, 1)
            assert eng.recovered["pending_kept"] == 0
        else:
            assert eng.recovered["journals_applied"] == 1
            _check_committed(eng, bytes(new), 2)
    finally:
        eng.close()


@pytest.mark.parametrize("kind", ["new_chunk", "append", "replace", "shrink"])
def test_crash_before_a_record_committed_at_once_keeps_the_old_version(
    tmp_path: Path, kind: str
) -> None:
    """The bytes of a version committed at once land before its one record write;
    a crash between the two leaves the old version (recovery drops the new bytes)."""
    eng, base = _new_chunk(tmp_path / "t")
    data = os.urandom(3000)
    key = (KEY[0], 1) if kind == "new_chunk" else KEY
    _crash_in(eng, eng.records, "put")
    with pytest.raises(Crash):
        if kind == "new_chunk":
            eng.prepare_write(*key, 0, memoryview(data), crc.value(data), CHUNK, 1, commit_at=1)
        elif kind == "append":
            eng.prepare_write(
                *key, len(base), memoryview(data), crc.value(data), CHUNK, 2, commit_at=1
            )
        elif kind == "replace":
            eng.prepare_replace(*key, memoryview(data), crc.value(data), CHUNK, 2, commit_at=1)
        else:
            eng.prepare_truncate(*key, 1000, CHUNK, 2, commit_at=1)
    eng.close()
    eng = ChunkEngine(tmp_path / "t", OPTS)
    try:
        _check_committed(eng, base, 1)
        assert eng.get(KEY[0], 1) is None
        assert sorted(os.listdir(os.path.dirname(eng.file_path(*KEY, 1)))) == [
            os.path.basename(eng.file_path(*KEY, 1))
        ]
    finally:
        eng.close()


@pytest.mark.parametrize(
    "kind", ["new_chunk", "append", "journaled", "copy", "replace", "truncate"]
)
def test_committed_at_once_matches_prepare_then_commit(tmp_path: Path, kind: str) -> None:
    """Same record (version, length, CRCs, the request that made it) and bytes as
    the two-step path, with one record write and no pending version in between."""
    results = []
    data = os.urandom(40_000 if kind == "copy" else 3000)
    base = os.urandom(200_000)
    for mode in ("two", "one"):
        eng = ChunkEngine(tmp_path / mode, OPTS)
        _write(eng, 0, base, 1)
        eng.commit(*KEY, 1, 1)
        at = {"new_chunk": 0, "append": len(base), "journaled": 7000, "copy": 7000}.get(kind, 0)
        key = (KEY[0], 1) if kind == "new_chunk" else KEY
        version = 1 if kind == "new_chunk" else 2
        commit_at = 1 if mode == "one" else None
        puts: list[str] = []
        for name in ("put", "put_with_journal"):
            real = getattr(eng.records, name)

            def counted(
                *args: Any, _real: Any = real, _name: str = name, _puts: list[str] = puts
            ) -> None:
                _puts.append(_name)
                _real(*args)

            setattr(eng.records, name, counted)
        o = Origin.of(b"x" * 16, 42)
        if kind == "replace":
            rec = eng.prepare_replace(
                *key, memoryview(data), crc.value(data), CHUNK, version, o, commit_at
            )
        elif kind == "truncate":
            rec = eng.prepare_truncate(*key, 150_000, CHUNK, version, o, commit_at)
        else:
            rec = eng.prepare_write(
                *key, at, memoryview(data), crc.value(data), CHUNK, version, o, commit_at
            )
        if mode == "two":
            assert rec.has_pending
            rec = eng.commit(*key, version, 1)  # type: ignore[assignment]
        else:
            assert not rec.has_pending and len(puts) == 1, puts
        assert rec is not None and not rec.journal_applying
        got = bytes(eng.read(*key, 0, CHUNK, verify=True)[1])
        assert eng.records.journal_keys() == []
        results.append((rec, got, eng.records.held_bytes))
        eng.close()
    assert results[0] == results[1]


@pytest.mark.parametrize("then", ["write", "truncate", "replace", "remove"])
def test_an_update_after_a_failed_in_place_write_builds_on_the_decided_version(
    tmp_path: Path, then: str
) -> None:
    """A commit decided (``journal_applying``) whose in-place write failed (ENOSPC,
    EIO) leaves the record applying while the target runs on; the chunk's next
    update of any kind (a write, a truncate, a whole-chunk replace from resync, a
    remove by GC) writes that journal first and builds on the decided version."""
    eng, base = _new_chunk(tmp_path / "t")
    patch = os.urandom(9000)
    decided = bytearray(base)
    decided[5000:14000] = patch
    real = eng.files.write_in_place
    failed: list[bool] = []

    def full_disk(*args: Any) -> None:
        if not failed:
            failed.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    eng.files.write_in_place = full_disk  # type: ignore[method-assign]
    _write(eng, 5000, patch, 2)
    with pytest.raises(OSError):
        eng.commit(*KEY, 2, 1)
    rec = eng.get(*KEY)
    assert rec is not None and rec.journal_applying and rec.committed_version == 2
    data = os.urandom(100)
    if then == "write":
        eng.prepare_write(*KEY, 100, memoryview(data), crc.value(data), CHUNK, 3)
        decided[100:200] = data
    elif then == "truncate":
        eng.prepare_truncate(*KEY, 20_000, CHUNK, 3)
        decided = decided[:20_000]
    elif then == "replace":
        eng.prepare_replace(*KEY, memoryview(data), crc.value(data), CHUNK, 3)
        decided = bytearray(data)
    else:
        eng.prepare_remove(*KEY)
    done = eng.commit(*KEY, 3, 1)
    if then == "remove":
        assert done is None and eng.get(*KEY) is None and eng.records.journal_keys() == []
    else:
        _check_committed(eng, bytes(decided), 3)
    eng.close()
