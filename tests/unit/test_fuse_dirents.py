"""The plain READDIR reply (struct fuse_dirent records), checked against the
layout the kernel parses: 24-byte header, name, zero padding to 8 bytes; and
the INIT hook that lets the kernel ask for it."""

from __future__ import annotations

import ctypes
import stat
import struct
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainfs.fuse_mount import kernel_bridge
from chainfs.fuse_mount.dirents import PackedDirents, d_type, dirent

DT_DIR, DT_REG, DT_LNK = 4, 8, 10


def parse(buf: bytes) -> list[tuple[int, int, bytes, int]]:
    """(ino, off, name, type) of each record, as the kernel's parse_dirfile reads them."""
    out = []
    pos = 0
    while pos < len(buf):
        ino, off, namelen, typ = struct.unpack_from("<QQII", buf, pos)
        name = buf[pos + 24 : pos + 24 + namelen]
        reclen = (24 + namelen + 7) // 8 * 8
        assert buf[pos + 24 + namelen : pos + reclen] == bytes(reclen - 24 - namelen)
        out.append((ino, off, name, typ))
        pos += reclen
    assert pos == len(buf)
    return out


def test_a_record_is_header_name_and_padding() -> None:
    r = dirent(7, 3, b"abc", stat.S_IFREG | 0o644)
    assert len(r) == 32 and len(r) % 8 == 0
    assert r == struct.pack("<QQII", 7, 3, 3, DT_REG) + b"abc" + bytes(5)
    assert len(dirent(1, 1, b"x" * 8, stat.S_IFDIR)) == 32  # 24 + 8: no padding
    assert len(dirent(1, 1, b"x" * 255, stat.S_IFDIR)) == 280


def test_types_from_modes() -> None:
    assert d_type(stat.S_IFDIR | 0o755) == DT_DIR
    assert d_type(stat.S_IFREG) == DT_REG
    assert d_type(stat.S_IFLNK | 0o777) == DT_LNK
    assert d_type(stat.S_IFIFO) == 1 and d_type(stat.S_IFSOCK) == 12


@pytest.mark.parametrize("name", [b"", b"a/b", b"a\0b", b"x" * 256])
def test_bad_names_are_refused(name: bytes) -> None:
    with pytest.raises(ValueError):
        dirent(1, 1, name, stat.S_IFREG)


def _listing(names: list[bytes]) -> PackedDirents:
    p = PackedDirents()
    p.add(1, b".", stat.S_IFDIR)
    p.add(1, b"..", stat.S_IFDIR)
    for i, name in enumerate(names):
        p.add(100 + i, name, stat.S_IFLNK if i % 2 else stat.S_IFREG)
    return p


def test_a_request_smaller_than_one_record_gets_nothing() -> None:
    p = _listing([b"x" * 200])
    assert p.reply(2, 223) == b""  # the record is 224 bytes
    assert len(p.reply(2, 224)) == 224
    assert p.reply(3, 4096) == b"" and p.reply(99, 4096) == b""  # the end
    assert p.reply(-1, 4096) == b""


@given(
    names=st.lists(
        st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n),
        max_size=60,
    ),
    size=st.integers(min_value=0, max_value=2048),
)
def test_replies_continue_where_the_last_record_said(names: list[bytes], size: int) -> None:
    p = _listing(names)
    assert len(p) == len(names) + 2
    listed: list[bytes] = []
    pos = 0
    while True:
        buf = p.reply(pos, size)
        assert len(buf) <= size and len(buf) % 8 == 0
        if not buf:
            break
        records = parse(buf)
        for ino, off, name, typ in records:
            assert off == pos + 1  # each record names the position after it
            if pos >= 2:
                k = pos - 2
                assert (ino, name) == (100 + k, names[k])
                assert typ == (DT_LNK if k % 2 else DT_REG)
            listed.append(name)
            pos = off
    longest = max((len(dirent(1, 1, n, 0)) for n in [b".", b"..", *names]), default=0)
    if size >= longest:
        assert listed == [b".", b"..", *names]  # all of it, in order, none twice
    # A reply is never split mid-record: adding after replying keeps positions.
    p.add(999, b"late", stat.S_IFDIR)
    assert parse(p.reply(len(p) - 1, 4096)) == [(999, len(p), b"late", DT_DIR)]


def test_the_init_hook_asks_for_readdirplus_auto_when_the_kernel_offers_it() -> None:
    """pyfuse3's INIT handler clears READDIRPLUS_AUTO; the bridge's hook sets it
    again (so the kernel sends plain READDIR), but only if the kernel can."""
    auto, plus = kernel_bridge.FUSE_CAP_READDIRPLUS_AUTO, 1 << 13

    def pyfuse3_init(_userdata: int, conn: int) -> None:
        fields = (ctypes.c_uint * 10).from_address(conn)
        fields[6] &= ~auto

    original = kernel_bridge._INIT(pyfuse3_init)
    slots = kernel_bridge._SLOT
    table = (ctypes.c_void_p * len(kernel_bridge._OPS))()
    table[slots["init"]] = ctypes.cast(original, ctypes.c_void_p).value
    bridge = kernel_bridge.Bridge(cast(kernel_bridge.LockHandlers, None), max_inflight=4)
    bridge.install(ctypes.addressof(table))
    assert table[slots["readdir"]] and table[slots["readdirplus"]] is None
    init = kernel_bridge._INIT(table[slots["init"]])
    conn = (ctypes.c_uint * 32)()
    conn[5] = conn[6] = plus | auto  # capable, want
    init(None, ctypes.addressof(conn))
    assert conn[6] == plus | auto
    conn[5] = conn[6] = plus  # an old kernel: no AUTO to ask for
    init(None, ctypes.addressof(conn))
    assert conn[6] == plus
