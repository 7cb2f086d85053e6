"""Chunk engine against a model (a dict of bytearrays), including crash recovery."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chainfs.common.errors import ChainfsError, Code
from chainfs.storage_service import crc
from chainfs.storage_service.chunk_engine import ChunkEngine, EngineOptions
from chainfs.storage_service.chunk_record import ChunkRecord, Origin

CHUNK = 64 * 1024
CHUNKS = st.sampled_from([(1, 0), (1, 1), (1, 5), (2, 0)])
OFFSETS = st.one_of(
    st.integers(0, 3000), st.integers(CHUNK - 3000, CHUNK - 1), st.sampled_from([0, CHUNK // 2])
)
DATA = st.binary(min_size=0, max_size=3000)
# Small CRC blocks and caches: writes and reads cross block boundaries, and the
# file and record caches evict all the time. Overwrites up to 1500 bytes are
# journaled (written in place at commit), longer ones copy the chunk: both run.
MODEL_OPTS = EngineOptions(
    crc_block_bytes=4096, open_files=2, meta_cache_entries=2, journal_write_max_bytes=1500
)


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="chunkeng-"))
        self.engine = ChunkEngine(self.dir / "t", MODEL_OPTS)
        self.committed: dict[tuple[int, int], bytearray] = {}
        self.versions: dict[tuple[int, int], int] = {}
        self.pending: set[tuple[int, int]] = set()
        self.seq = 0

    def teardown(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _version(self, key: tuple[int, int]) -> int:
        return self.versions.get(key, 0) + 1

    def _after_prepare(self, key: tuple[int, int], commit: bool, content: bytearray) -> None:
        if commit:
            rec = self.engine.commit(*key, self._version(key), chain_version=7)
            assert rec is not None
            self.committed[key] = content
            self.versions[key] = rec.committed_version
            self.pending.discard(key)
        else:
            self.pending.add(key)

    @rule(key=CHUNKS, offset=OFFSETS, data=DATA, commit=st.booleans())
    def write(self, key: tuple[int, int], offset: int, data: bytes, commit: bool) -> None:
        if offset + len(data) > CHUNK:
            with pytest.raises(ChainfsError) as e:
                self.engine.prepare_write(
                    *key, offset, memoryview(data), crc.value(data), CHUNK, self._version(key)
                )
            assert e.value.code == Code.EINVAL
            return
        self.seq += 1
        self.engine.prepare_write(
            *key,
            offset,
            memoryview(data),
            crc.value(data),
            CHUNK,
            self._version(key),
            Origin.of(b"c" * 16, self.seq),
        )
        content = bytearray(self.committed.get(key, b""))
        if len(content) < offset + len(data):
            content.extend(bytes(offset + len(data) - len(content)))
        content[offset : offset + len(data)] = data
        self._after_prepare(key, commit, content)

    @rule(key=CHUNKS, length=OFFSETS, commit=st.booleans())
    def truncate(self, key: tuple[int, int], length: int, commit: bool) -> None:
        self.engine.prepare_truncate(*key, length, CHUNK, self._version(key))
        content = bytearray(self.committed.get(key, b""))
        if length <= len(content):
            del content[length:]
        else:
            content.extend(bytes(length - len(content)))
        self._after_prepare(key, commit, content)

    @rule(key=CHUNKS, data=st.binary(min_size=0, max_size=5000))
    def replace_full(self, key: tuple[int, int], data: bytes) -> None:
        version = self.versions.get(key, 0) + 3  # a gap: replace ignores local versions
        self.engine.prepare_replace(*key, memoryview(data), crc.value(data), CHUNK, version)
        self.engine.commit(*key, version, chain_version=9)
        self.committed[key] = bytearray(data)
        self.versions[key] = version
        self.pending.discard(key)

    @rule(key=CHUNKS)
    def abort(self, key: tuple[int, int]) -> None:
        self.engine.abort(*key)
        self.pending.discard(key)

    @rule(key=CHUNKS)
    def remove(self, key: tuple[int, int]) -> None:
        rec = self.engine.prepare_remove(*key)
        if rec is None:
            assert key not in self.committed and key not in self.pending
            return
        assert self.engine.commit(*key, rec.pending_version, chain_version=7) is None
        self.committed.pop(key, None)
        self.versions.pop(key, None)
        self.pending.discard(key)

    @rule()
    def reopen(self) -> None:
        """Clean restart: complete pending versions survive recovery."""
        self.engine.close()
        self.engine = ChunkEngine(self.dir / "t", MODEL_OPTS)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def crash_mid_update(self, data: st.DataObject) -> None:
        """A crash while the pending bytes were half written: recovery drops that version."""
        key = data.draw(st.sampled_from(sorted(self.pending)))
        rec = self.engine.get(*key)
        assert rec is not None and rec.has_pending
        if rec.pending_length <= rec.length or rec.pending_remove or rec.pending_journal:
            # Nothing written past the committed bytes to tear (a journaled version
            # is written with its record in one atomic batch: tests in test_chunk_journal).
            return
        path = self.engine.file_path(*key, rec.pending_file_gen)
        torn = rec.length + (rec.pending_length - rec.length) // 2
        self.engine.close()
        if rec.pending_file_gen != rec.file_gen:
            torn = rec.pending_length // 2
        os.truncate(path, torn)
        # Leave an orphan file too: recovery deletes it.
        Path(self.engine.file_path(*key, 999_999)).write_bytes(b"junk")
        self.engine = ChunkEngine(self.dir / "t", MODEL_OPTS)
        assert self.engine.recovered["pending_dropped"] >= 1
        assert self.engine.recovered["orphans"] >= 1
        self.pending.discard(key)

    @rule(key=CHUNKS, offset=st.integers(0, CHUNK), length=st.integers(0, CHUNK))
    def read(self, key: tuple[int, int], offset: int, length: int) -> None:
        if key in self.pending:
            with pytest.raises(ChainfsError) as e:
                self.engine.read(*key, offset, length, verify=True)
            assert e.value.code == Code.NOT_COMMITTED
            return
        for verify in (True, False):
            _, got = self.engine.read(*key, offset, length, verify=verify)
            want = bytes(self.committed.get(key, b""))[offset : offset + length]
            assert bytes(got) == want

    @invariant()
    def metadata_matches(self) -> None:
        listed = {(1, i): r for i, r in self.engine.list_chunks(1)}
        listed.update({(2, i): r for i, r in self.engine.list_chunks(2)})
        assert set(listed) == set(self.committed) | self.pending
        for key, content in self.committed.items():
            rec = listed[key]
            assert rec.committed_version == self.versions[key]
            assert rec.length == len(content)
            assert rec.crc32c == crc.value(bytes(content))
            assert rec.has_pending == (key in self.pending)
            assert rec.block_size == MODEL_OPTS.crc_block_bytes
            assert rec.block_crcs == crc.block_crcs(bytes(content), rec.block_size)
        last = self.engine.last_chunk(1)
        committed_1 = sorted(i for (ino, i) in self.committed if ino == 1)
        if committed_1:
            assert last is not None and last[0] == committed_1[-1]
            assert last[1].length == len(self.committed[(1, committed_1[-1])])
        else:
            assert last is None


TestEngineModel = EngineModel.TestCase
TestEngineModel.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_corrupted_chunk_answers_checksum_mismatch(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    data = os.urandom(100_000)
    eng.prepare_write(3, 0, 0, memoryview(data), crc.value(data), 1 << 20, 1)
    rec = eng.commit(3, 0, 1, 1)
    assert rec is not None
    path = eng.file_path(3, 0, rec.file_gen)
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"\xff" if data[5000] != 0xFF else b"\0")
    with pytest.raises(ChainfsError) as e:
        eng.read(3, 0, 0, 10, verify=True)
    assert e.value.code == Code.CHECKSUM_MISMATCH
    # A truncated file is damage too, with or without verification.
    os.truncate(path, 50_000)
    for verify in (True, False):
        with pytest.raises(ChainfsError) as e:
            eng.read(3, 0, 40_000, 20_000, verify=verify)
        assert e.value.code == Code.CHECKSUM_MISMATCH
    eng.close()


def test_enospc_refuses_new_chunks_only(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    eng.prepare_write(4, 0, 0, memoryview(b"abc"), crc.value(b"abc"), 1 << 16, 1)
    eng.commit(4, 0, 1, 1)
    eng.close()
    eng = ChunkEngine(tmp_path / "t", EngineOptions(disk_usage_limit_ratio=1e-9))
    with pytest.raises(ChainfsError) as e:
        eng.prepare_write(4, 1, 0, memoryview(b"x"), crc.value(b"x"), 1 << 16, 1)
    assert e.value.code == Code.ENOSPC and e.value.errno == 28
    assert eng.get(4, 1) is None
    # Updating an existing chunk is still allowed (it does not take a new chunk).
    eng.prepare_write(4, 0, 3, memoryview(b"def"), crc.value(b"def"), 1 << 16, 2)
    eng.commit(4, 0, 2, 1)
    assert bytes(eng.read(4, 0, 0, 10, verify=True)[1]) == b"abcdef"
    eng.close()


def test_chunk_size_bounds(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    for size in (1 << 15, (64 << 20) + 1):
        with pytest.raises(ChainfsError) as e:
            eng.prepare_write(5, 0, 0, memoryview(b"x"), crc.value(b"x"), size, 1)
        assert e.value.code == Code.EINVAL
    eng.close()


def test_second_open_of_a_target_is_refused(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    with pytest.raises(ChainfsError) as e:
        ChunkEngine(tmp_path / "t")
    assert e.value.code == Code.STORE_LOCKED
    eng.close()


def test_crc_combine_matches_direct() -> None:
    for la, lb in [(0, 0), (1, 0), (0, 5), (1000, 777), (3, 1 << 20)]:
        a, b = os.urandom(la), os.urandom(lb)
        assert crc.combine(crc.value(a), crc.value(b), lb) == crc.value(a + b)
        assert crc.extend_zeros(crc.value(a), lb) == crc.value(a + bytes(lb))


def test_direct_write_of_an_aligned_whole_chunk(tmp_path: Path) -> None:
    """Page-aligned whole-chunk payloads (as the data plane's pooled buffers are) take the
    O_DIRECT path; the bytes and checksum read back like any other write."""
    import mmap

    eng = ChunkEngine(tmp_path / "t")
    size = 256 * 1024
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    view[:] = os.urandom(size)
    eng.prepare_write(6, 0, 0, view, crc.value(view), 1 << 20, 1)
    eng.commit(6, 0, 1, 1)
    # An unaligned slice falls back to buffered I/O.
    eng.prepare_write(6, 1, 0, view[1 : 1 + 8192], crc.value(view[1 : 1 + 8192]), 1 << 20, 1)
    eng.commit(6, 1, 1, 1)
    want = bytes(view)
    view.release()
    buf.close()
    for verify in (True, False):
        assert bytes(eng.read(6, 0, 0, size, verify=verify)[1]) == want
        assert bytes(eng.read(6, 1, 0, size, verify=verify)[1]) == want[1 : 1 + 8192]
    eng.close()


def test_direct_write_of_a_whole_chunk_with_a_short_tail(tmp_path: Path) -> None:
    """A new chunk whose length is not whole pages (a file's last chunk, a KV-cache
    entry) takes O_DIRECT for its pages and a buffered write for the rest: every
    byte and the checksum read back, and the file is exactly that long."""
    import mmap

    eng = ChunkEngine(tmp_path / "t", EngineOptions(direct_write_min_bytes=0))
    for index, size in enumerate((4096 + 1, 64 * 1024 + 48, 4096 * 3 - 1)):
        buf = mmap.mmap(-1, 128 * 1024)
        view = memoryview(buf)[:size]
        view[:] = os.urandom(size)
        want = bytes(view)
        eng.prepare_write(7, index, 0, view, crc.value(view), 1 << 20, 1)
        rec = eng.commit(7, index, 1, 1)
        view.release()
        buf.close()
        assert rec is not None and rec.length == size
        assert os.path.getsize(eng.file_path(7, index, rec.file_gen)) == size
        for verify in (True, False):
            assert bytes(eng.read(7, index, 0, size, verify=verify)[1]) == want
        assert bytes(eng.read(7, index, size - 100, 100, verify=True)[1]) == want[-100:]
    eng.close()


def test_small_whole_chunk_writes_stay_in_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Aligned whole-chunk writes under direct_write_min_bytes are buffered (so the
    reads that follow need no disk); from that size on they take O_DIRECT."""
    import mmap

    from chainfs.storage_service.chunk_files import ChunkFiles

    direct: list[int] = []
    real = ChunkFiles._write_direct

    def spy(self: ChunkFiles, inode: int, index: int, gen: int, data: memoryview) -> None:
        direct.append(len(data))
        real(self, inode, index, gen, data)

    monkeypatch.setattr(ChunkFiles, "_write_direct", spy)
    eng = ChunkEngine(tmp_path / "t", EngineOptions(direct_write_min_bytes=64 * 1024))
    buf = mmap.mmap(-1, 128 * 1024)
    view = memoryview(buf)
    view[:] = os.urandom(len(view))
    for index, size in enumerate((4096, 4096 + 100, 64 * 1024 - 4096, 64 * 1024, 128 * 1024)):
        eng.prepare_write(8, index, 0, view[:size], crc.value(view[:size]), 1 << 20, 1)
        assert eng.commit(8, index, 1, 1) is not None
        assert bytes(eng.read(8, index, 0, size, verify=True)[1]) == bytes(view[:size])
    assert direct == [64 * 1024, 128 * 1024]
    view.release()
    buf.close()
    eng.close()


# ---- per-block CRCs, file and record caches --------------------------------------

MiB = 1024 * 1024


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))


def _chunk(eng: ChunkEngine, data: bytes, inode: int = 5, version: int = 1) -> str:
    eng.prepare_write(inode, 0, 0, memoryview(data), crc.value(data), 4 * MiB, version)
    rec = eng.commit(inode, 0, version, 1)
    assert rec is not None
    return eng.file_path(inode, 0, rec.file_gen)


def test_partial_read_verifies_the_blocks_it_touches(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")  # 64 KiB blocks
    data = os.urandom(4 * MiB)
    path = _chunk(eng, data)
    rec = eng.get(5, 0)
    assert rec is not None and rec.block_size == 64 * 1024 and len(rec.block_crcs) == 4 * 64
    # A span read loads only the blocks around the range.
    assert ChunkEngine.read_span(rec, 100_000, 256 * 1024, True) == (65536, 6 * 65536)
    assert ChunkEngine.read_span(rec, 100_000, 256 * 1024, False) == (100_000, 100_000 + 262144)
    middle = 2 * MiB + 12345  # block 32
    _flip(path, middle)
    # Ranges in other blocks are served, byte-exact.
    for off, n in ((0, 256 * 1024), (3 * MiB, 256 * 1024), (2 * MiB + 65536, 4096)):
        _, got = eng.read(5, 0, off, n, verify=True)
        assert bytes(got) == data[off : off + n]
    # Any read touching block 32 answers CHECKSUM_MISMATCH, even if its own bytes
    # are intact (the block they share cannot be trusted).
    for off, n in (
        (middle, 1),
        (2 * MiB, 4096),
        (2 * MiB - 100, 200),
        (middle + 5000, 9),
        (0, 4 * MiB),
    ):
        with pytest.raises(ChainfsError) as e:
            eng.read(5, 0, off, n, verify=True)
        assert e.value.code == Code.CHECKSUM_MISMATCH
        assert "block 32" in e.value.message
    # Unverified reads return the file's bytes (the switch off means no checking).
    _, got = eng.read(5, 0, middle, 1, verify=False)
    assert got[0] == data[middle] ^ 0x10
    eng.close()


def test_damage_seen_while_the_record_keeps_changing_is_reported_as_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chunk rewritten all the time and damaged: once the read-race retries run
    # out, the answer is CHECKSUM_MISMATCH (the client reads another replica),
    # not NOT_COMMITTED (the client would retry this one).
    eng = ChunkEngine(tmp_path / "t")
    path = _chunk(eng, os.urandom(4 * MiB))
    _flip(path, MiB + 7)  # block 16
    monkeypatch.setattr(eng, "_record_unchanged", lambda *_: False)
    with pytest.raises(ChainfsError) as e:
        eng.read(5, 0, MiB, 4096, verify=True)
    assert e.value.code == Code.CHECKSUM_MISMATCH and "block 16" in e.value.message
    eng.close()


def test_partial_overwrite_never_blesses_a_damaged_block(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t")
    data = bytearray(os.urandom(4 * MiB))
    path = _chunk(eng, bytes(data))
    _flip(path, 2 * MiB + 10)  # block 32
    # A write sharing block 32 with the damage is refused, nothing pending.
    patch = os.urandom(1000)
    with pytest.raises(ChainfsError) as e:
        eng.prepare_write(5, 0, 2 * MiB + 500, memoryview(patch), crc.value(patch), 4 * MiB, 2)
    assert e.value.code == Code.CHECKSUM_MISMATCH
    assert not eng.get(5, 0).has_pending  # type: ignore[union-attr]
    # A write elsewhere goes through and keeps block 32's old CRC: still detected.
    eng.prepare_write(5, 0, 1000, memoryview(patch), crc.value(patch), 4 * MiB, 2)
    rec = eng.commit(5, 0, 2, 1)
    assert rec is not None
    data[1000:2000] = patch
    _, got = eng.read(5, 0, 0, 64 * 1024, verify=True)
    assert bytes(got) == data[: 64 * 1024]
    with pytest.raises(ChainfsError) as e:
        eng.read(5, 0, 2 * MiB, 100, verify=True)
    assert e.value.code == Code.CHECKSUM_MISMATCH
    # A write covering all of block 32 replaces the damaged bytes.
    whole = os.urandom(64 * 1024)
    eng.prepare_write(5, 0, 2 * MiB, memoryview(whole), crc.value(whole), 4 * MiB, 3)
    rec = eng.commit(5, 0, 3, 1)
    assert rec is not None
    data[2 * MiB : 2 * MiB + 64 * 1024] = whole
    _, got = eng.read(5, 0, 0, 4 * MiB, verify=True)
    assert bytes(got) == bytes(data)
    assert rec.crc32c == crc.value(bytes(data))
    assert rec.block_crcs == crc.block_crcs(bytes(data), rec.block_size)
    eng.close()


def test_records_from_before_block_crcs_stay_readable(tmp_path: Path) -> None:
    """A target written before per-block CRCs: whole-chunk verification, converted on update."""
    from chainfs.storage_service.chunk_record import RECORD, ChunkRecord, chunk_key

    eng = ChunkEngine(tmp_path / "t")
    data = bytearray(os.urandom(300_000))
    path = _chunk(eng, bytes(data))
    rec = eng.get(5, 0)
    assert rec is not None
    legacy = replace(rec, block_size=0, block_crcs=b"")
    raw = legacy.encode()
    assert len(raw) == RECORD.size
    eng.records.db.put(chunk_key(5, 0), raw)
    eng.close()
    eng = ChunkEngine(tmp_path / "t", EngineOptions(crc_block_bytes=16 * 1024))
    rec = eng.get(5, 0)
    assert rec is not None and rec.block_size == 0 and ChunkRecord.decode(raw) == rec
    assert ChunkEngine.read_span(rec, 1000, 10, True) == (0, 300_000)
    _, got = eng.read(5, 0, 1000, 10, verify=True)
    assert bytes(got) == data[1000:1010]
    _flip(path, 250_000)
    with pytest.raises(ChainfsError) as e:
        eng.read(5, 0, 1000, 10, verify=True)
    assert e.value.code == Code.CHECKSUM_MISMATCH
    with pytest.raises(ChainfsError) as e:  # conversion checks the whole CRC first
        eng.prepare_write(5, 0, 10, memoryview(b"xy"), crc.value(b"xy"), 4 * MiB, 2)
    assert e.value.code == Code.CHECKSUM_MISMATCH
    _flip(path, 250_000)  # undo
    eng.prepare_write(5, 0, 10, memoryview(b"xy"), crc.value(b"xy"), 4 * MiB, 2)
    rec = eng.commit(5, 0, 2, 1)
    data[10:12] = b"xy"
    assert rec is not None and rec.block_size == 16 * 1024
    assert rec.block_crcs == crc.block_crcs(bytes(data), 16 * 1024)
    _, got = eng.read(5, 0, 0, 300_000, verify=True)
    assert bytes(got) == bytes(data)
    eng.close()


def test_cached_descriptors_never_serve_a_replaced_file(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t", EngineOptions(open_files=4))
    a, b = os.urandom(100_000), os.urandom(100_000)
    path = _chunk(eng, a)
    _, got = eng.read(5, 0, 0, 100, verify=False)
    assert bytes(got) == a[:100] and len(eng.files.cache) == 1
    # Remove and re-create: the same file name (generation 1) with new bytes.
    rec = eng.prepare_remove(5, 0)
    assert rec is not None and eng.commit(5, 0, rec.pending_version, 1) is None
    assert _chunk(eng, b) == path
    for verify in (False, True):
        _, got = eng.read(5, 0, 0, 100, verify=verify)
        assert bytes(got) == b[:100]
    # Replaced behind the engine's back (the scrubber's repair renames a new file in).
    tmp = path + ".new"
    Path(tmp).write_bytes(b"\0" * 100_000)
    os.replace(tmp, path)
    _, got = eng.read(5, 0, 0, 100, verify=False)
    assert bytes(got) == b"\0" * 100
    # Bounded.
    for ino in range(10, 20):
        _chunk(eng, a, inode=ino)
        eng.read(ino, 0, 0, 10, verify=False)
    assert len(eng.files.cache) == 4
    eng.close()


def test_record_cache_is_bounded_and_current(tmp_path: Path) -> None:
    eng = ChunkEngine(tmp_path / "t", EngineOptions(meta_cache_entries=3))
    for ino in range(10):
        _chunk(eng, b"x" * 10, inode=ino)
        assert eng.get(ino, 0) is not None
    assert eng.records.cached == 3
    eng.prepare_write(2, 0, 0, memoryview(b"y" * 20), crc.value(b"y" * 20), 4 * MiB, 2)
    assert eng.get(2, 0).pending_version == 2  # type: ignore[union-attr]
    eng.commit(2, 0, 2, 1)
    _, got = eng.read(2, 0, 0, 100, verify=True)
    assert bytes(got) == b"y" * 20
    eng.close()


def test_page_cache_reads_without_waiting(tmp_path: Path) -> None:
    """nowait reads (RWF_NOWAIT, served on the event loop) return the same bytes."""
    eng = ChunkEngine(tmp_path / "t", EngineOptions(crc_block_bytes=4096))
    data = os.urandom(1_000_000)
    _chunk(eng, data)
    for off, n in ((0, 10), (4000, 200), (123_456, 70_000), (999_990, 100)):
        for verify in (True, False):
            try:
                _, got = eng.read(5, 0, off, n, verify=verify, nowait=True)
            except BlockingIOError:  # not in the page cache: the caller uses a thread
                _, got = eng.read(5, 0, off, n, verify=verify)
            assert bytes(got) == data[off : off + n]
            assert len(got) == min(n, len(data) - off)
    eng.close()


@pytest.mark.timeout(120)
def test_reads_racing_updates_see_a_committed_version(tmp_path: Path) -> None:
    """Readers in threads (cached files and records, nowait or not, verifying or not)
    against one writer: every read returns the bytes of the committed version it reports,
    never a mix and never a false checksum error."""
    import random
    import threading

    eng = ChunkEngine(
        tmp_path / "t", EngineOptions(crc_block_bytes=4096, open_files=2, meta_cache_entries=2)
    )
    size = 256 * 1024
    contents: dict[int, bytes] = {}
    rng = random.Random(7)
    content = bytearray(os.urandom(100_000))
    contents[1] = bytes(content)
    _chunk(eng, bytes(content))  # version 1 (chunk size 4 MiB)
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            off, n = r.randrange(size), r.randrange(1, 40_000)
            try:
                verify, nowait = r.random() < 0.5, r.random() < 0.5
                rec, got = eng.read(5, 0, off, n, verify=verify, nowait=nowait)
            except BlockingIOError:
                continue
            except ChainfsError as e:
                if e.code != Code.NOT_COMMITTED:
                    errors.append(f"{e}")
                continue
            assert rec is not None
            want = contents[rec.committed_version][off : off + n]
            if bytes(got) != want:
                errors.append(f"v{rec.committed_version} [{off}, +{n}) wrong bytes")
            reads[0] += 1

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for version in range(2, 80):
            kind = rng.choice(["rmw", "append", "truncate", "replace"])
            if kind == "rmw" and content:
                off = rng.randrange(len(content))
                data = os.urandom(rng.randrange(1, 20_000))
                new = bytearray(content)
                new[off : off + len(data)] = data
                eng.prepare_write(5, 0, off, memoryview(data), crc.value(data), 4 * MiB, version)
            elif kind in ("append", "rmw"):
                off = len(content) + rng.randrange(0, 5000)
                data = os.urandom(rng.randrange(1, 20_000))
                if off + len(data) > size:
                    off, data = 0, os.urandom(rng.randrange(1000, 50_000))
                new = bytearray(content) + bytes(max(0, off - len(content)))
                new[off : off + len(data)] = data
                eng.prepare_write(5, 0, off, memoryview(data), crc.value(data), 4 * MiB, version)
            elif kind == "truncate":
                n = rng.randrange(0, size)
                new = bytearray(content[:n]) + bytes(max(0, n - len(content)))
                eng.prepare_truncate(5, 0, n, 4 * MiB, version)
            else:
                new = bytearray(os.urandom(rng.randrange(0, size)))
                eng.prepare_replace(5, 0, memoryview(bytes(new)), crc.value(new), 4 * MiB, version)
            contents[version] = bytes(new)
            rec = eng.commit(5, 0, version, 1)
            assert rec is not None and rec.crc32c == crc.value(bytes(new))
            content = new
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert reads[0] > 0
    eng.close()


@pytest.mark.parametrize("commit_at", [None, 1])
@pytest.mark.parametrize("kind", ["existing_file", "no_file"])
def test_durable_truncate_extension_is_on_disk_before_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, commit_at: int | None
) -> None:
    """On a durable target the bytes of a version are on disk before the record that
    makes it committed: a truncate that extends the chunk (zeros past the old end)
    syncs the file's new size, and a file it creates its directory entry, first."""
    eng = ChunkEngine(tmp_path / "t", EngineOptions(durable=True))
    key = (9, 0)
    version = 1
    if kind == "existing_file":
        data = os.urandom(3000)
        eng.prepare_write(*key, 0, memoryview(data), crc.value(data), CHUNK, 1)
        eng.commit(*key, 1, 1)
        version = 2
    events: list[tuple[str, str]] = []

    def spying(real: Callable[[int], None]) -> Callable[[int], None]:
        def spy(fd: int) -> None:
            events.append(("sync", os.path.realpath(f"/proc/self/fd/{fd}")))
            real(fd)

        return spy

    monkeypatch.setattr(os, "fdatasync", spying(os.fdatasync))
    monkeypatch.setattr(os, "fsync", spying(os.fsync))
    real_put = eng.records.put

    def put(*args: Any) -> None:
        events.append(("put", ""))
        real_put(*args)

    monkeypatch.setattr(eng.records, "put", put)
    eng.prepare_truncate(*key, 20_000, CHUNK, version, commit_at=commit_at)
    if commit_at is None:
        eng.commit(*key, version, 1)
    rec = eng.get(*key)
    assert rec is not None and rec.committed_version == version and rec.length == 20_000
    synced = {path for what, path in events[: events.index(("put", ""))] if what == "sync"}
    path = os.path.realpath(eng.file_path(*key, rec.file_gen))
    assert path in synced, events
    if kind == "no_file":
        assert os.path.dirname(path) in synced, events
    eng.close()


@pytest.mark.parametrize("verify", [True, False])
def test_read_plan_spans_and_sizes_every_kind_of_read(verify: bool) -> None:
    """(lo, hi) is read_span's; the buffer is the range, or the whole chunk when
    verifying a record without per-block CRCs."""
    blocks = ChunkRecord(
        committed_version=1, length=300_000, block_size=65536, block_crcs=b"\0" * 20
    )
    legacy = ChunkRecord(committed_version=1, length=300_000)
    for rec in (blocks, legacy):
        for offset, length in (
            (0, 4096),
            (100_000, 70_000),
            (299_000, 5000),
            (400_000, 10),
            (5, 0),
        ):
            lo, hi, need = ChunkEngine.read_plan(rec, offset, length, verify)
            assert (lo, hi) == ChunkEngine.read_span(rec, offset, length, verify)
            served = max(0, min(offset + length, rec.length) - min(offset, rec.length))
            whole = verify and not rec.has_block_crcs and served
            assert need == (rec.length if whole else served)
            assert lo <= min(offset, rec.length) and hi >= min(offset + length, rec.length)
