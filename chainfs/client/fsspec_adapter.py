"""fsspec filesystem for chainfs: ``fsspec.filesystem("chainfs", address="host:port")``.

A thin shell over :class:`chainfs.client.sync.FileSystem` (as s3fs/gcsfs are
over their SDKs): ``info`` dicts from stat, files are chainfs's own buffered
files, ``mv`` is one atomic rename, ``cat_file`` reads only the range asked,
``cat_ranges`` fetches every range in one parallel ``read_ranges`` call.

URLs: ``chainfs:///path`` with ``address=`` (or $CHAINFS_ADDRESS), or
``chainfs://HOST:PORT/path`` naming the mgmtd address in the URL.
"""

from __future__ import annotations

import datetime
import errno
import os
import posixpath
import re
import stat as stat_mod
import uuid
from typing import Any

from fsspec.spec import AbstractFileSystem

from chainfs.client.config import resolve_address
from chainfs.client.sync import FileSystem
from chainfs.client.sync_file import File
from chainfs.common.errors import ChainfsError, Code

# host:port[,host:port...] at the start of a URL's location part.
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d+(,[A-Za-z0-9.\-\[\]:]+:\d+)*$")
_COPY_BLOCK_BYTES = 16 * 1024 * 1024  # server-side copy streams in blocks of this size


def _split_url(path: str) -> tuple[str | None, str]:
    """``chainfs://a:1/x`` -> ("a:1", "/x"); ``chainfs:///x`` -> (None, "/x")."""
    for prefix in ("chainfs://", "chainfs::"):
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            head, _sep, tail = rest.partition("/")
            if _ADDRESS_RE.match(head):
                return head, "/" + tail
            return None, "/" + rest.lstrip("/")
    return None, path


class ChainFileSystem(AbstractFileSystem):
    """chainfs through the fsspec interface."""

    protocol = "chainfs"
    root_marker = "/"
    sep = "/"

    def __init__(
        self,
        address: str | None = None,
        fs: FileSystem | None = None,
        auto_mkdir: bool = True,
        token: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``token``: the user's token (None: $CHAINFS_TOKEN, else the file
        $CHAINFS_TOKEN_FILE names, read when connecting)."""
        super().__init__(address=address, auto_mkdir=auto_mkdir, token=token, **kwargs)
        self._token = token
        # Writing a file creates its missing parent directories (object-store
        # style, what fsspec's copy/put/pipe expect); False: FileNotFoundError.
        self.auto_mkdir = auto_mkdir
        # No address: chainfs://HOST:PORT/path gave none either, so $CHAINFS_ADDRESS.
        self.address = resolve_address(address) if fs is None else fs.address
        self._client = fs
        self._client_pid = os.getpid()

    # -- connection (per process: a forked worker reconnects) ------------------
    @property
    def client(self) -> FileSystem:
        if self._client is None or self._client_pid != os.getpid() or self._client.closed:
            import chainfs

            assert self.address is not None
            self._client = chainfs.connect(self.address, token=self._token)
            self._client_pid = os.getpid()
        return self._client

    def close(self) -> None:
        if self._client is not None and self._client_pid == os.getpid():
            self._client.close()
        self._client = None

    # -- paths ---------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(os.fspath(path)) if not isinstance(path, str) else path
        _, p = _split_url(path)
        p = "/" + p.lstrip("/")
        p = p.rstrip("/")
        return p or "/"

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        address, _ = _split_url(path)
        return {"address": address} if address else {}

    def unstrip_protocol(self, name: str) -> str:
        if name.startswith("chainfs://"):
            return name
        return f"chainfs://{self.address}{self._strip_protocol(name)}"

    # -- info ----------------------------------------------------------------
    @staticmethod
    def _info_from_stat(path: str, st: os.stat_result, link_target: str | None = None) -> dict:
        if stat_mod.S_ISDIR(st.st_mode):
            kind = "directory"
        elif stat_mod.S_ISREG(st.st_mode):
            kind = "file"
        else:
            kind = "other"
        out: dict[str, Any] = {
            "name": path,
            "size": st.st_size if kind == "file" else 0,
            "type": kind,
            "mode": st.st_mode,
            "ino": st.st_ino,
            "nlink": st.st_nlink,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "created": st.st_ctime,
            "mtime": st.st_mtime,
            "islink": link_target is not None,
        }
        if link_target is not None:
            out["destination"] = link_target
        return out

    def info(self, path: str, **kwargs: Any) -> dict:
        path = self._strip_protocol(path)
        st = self.client.lstat(path)
        if stat_mod.S_ISLNK(st.st_mode):
            target = self.client.readlink(path)
            try:
                st = self.client.stat(path)
            except FileNotFoundError:
                pass  # dangling link: describe the link itself
            return self._info_from_stat(path, st, target)
        return self._info_from_stat(path, st)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        try:
            entries = self.client.scandir(path)
        except NotADirectoryError:
            info = self.info(path)
            return [info] if detail else [info["name"]]
        out: list[dict] = []
        for e in entries:
            full = posixpath.join(path, e.name)
            if stat_mod.S_ISLNK(e.stat.st_mode):
                out.append(self.info(full))
            else:
                out.append(self._info_from_stat(full, e.stat))
        out.sort(key=lambda d: d["name"])
        return out if detail else [d["name"] for d in out]

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self.client.exists(self._strip_protocol(path))

    def isdir(self, path: str) -> bool:
        return self.client.isdir(self._strip_protocol(path))

    def isfile(self, path: str) -> bool:
        return self.client.isfile(self._strip_protocol(path))

    def islink(self, path: str) -> bool:
        try:
            return stat_mod.S_ISLNK(self.client.lstat(self._strip_protocol(path)).st_mode)
        except FileNotFoundError:
            return False

    def created(self, path: str) -> datetime.datetime:
        st = self.client.stat(self._strip_protocol(path))
        return datetime.datetime.fromtimestamp(st.st_ctime, tz=datetime.UTC)

    def modified(self, path: str) -> datetime.datetime:
        st = self.client.stat(self._strip_protocol(path))
        return datetime.datetime.fromtimestamp(st.st_mtime, tz=datetime.UTC)

    def ukey(self, path: str) -> str:
        st = self.client.stat(self._strip_protocol(path))
        return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"

    # -- namespace -------------------------------------------------------------
    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        if create_parents:
            self.client.mkdir(path, parents=True, exist_ok=False)
        else:
            self.client.mkdir(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.client.mkdir(self._strip_protocol(path), parents=True, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        self.client.rmdir(self._strip_protocol(path))

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        try:
            self.client.remove(path)
        except IsADirectoryError:
            self.client.rmdir(path)

    _rm = rm_file

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        # Deepest first, so directories are empty when their turn comes.
        for p in sorted(paths, key=lambda p: (p.count("/"), p), reverse=True):
            self.rm_file(p)

    def mv(
        self,
        path1: Any,
        path2: Any,
        recursive: bool = False,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Atomic rename (a file or a whole directory tree), like ``mv``."""
        if isinstance(path1, list) or isinstance(path2, list):
            super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)
            return
        src = self._strip_protocol(path1)
        dst = self._strip_protocol(path2)
        if src == dst:
            return
        if self.client.isdir(dst) and not self.client.isdir(src):
            dst = posixpath.join(dst, posixpath.basename(src))
        self._make_parent(dst)
        self.client.rename(src, dst)

    def rename(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.client.rename(self._strip_protocol(path1), self._strip_protocol(path2))

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        src = self._strip_protocol(path1)
        dst = self._strip_protocol(path2)
        if self.client.isdir(src):
            self.client.mkdir(dst, parents=True, exist_ok=True)
            return
        self._make_parent(dst)
        fin = self.client.open(src, "rb")
        fout = self.client.open(dst, "wb")
        assert isinstance(fin, File) and isinstance(fout, File)
        with fin, fout:
            buf = bytearray(_COPY_BLOCK_BYTES)
            mv = memoryview(buf)
            while True:
                n = fin.readinto(mv)
                if not n:
                    break
                fout.write(mv[:n])

    def symlink(self, src: str, dst: str, **kwargs: Any) -> None:
        self.client.symlink(self._strip_protocol(src), self._strip_protocol(dst))

    def link(self, src: str, dst: str, **kwargs: Any) -> None:
        self.client.link(self._strip_protocol(src), self._strip_protocol(dst))

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self._make_parent(path)
        if truncate or not self.client.exists(path):
            with self.client.open(path, "wb"):
                pass
        else:
            self.client.utime(path)

    def _make_parent(self, path: str) -> None:
        if self.auto_mkdir:
            parent = posixpath.dirname(path)
            if parent != "/":
                self.client.mkdir(parent, parents=True, exist_ok=True)

    # -- data ----------------------------------------------------------------
    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        path = self._strip_protocol(path)
        if "r" not in mode or "+" in mode:
            self._make_parent(path)
        if autocommit or "r" in mode:
            return self.client.open(path, mode)
        return _DeferredFile(self, path, mode)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        if start is None and end is None:
            return self.client.read_file(path)
        size = self.client.stat(path).st_size
        lo = 0 if start is None else (start if start >= 0 else max(0, size + start))
        hi = size if end is None else (end if end >= 0 else size + end)
        hi = min(hi, size)
        if hi <= lo:
            return b""
        (data,) = self.client.read_ranges([(path, lo, hi - lo)])
        return bytes(data)

    def cat_ranges(
        self,
        paths: list[str],
        starts: Any,
        ends: Any,
        max_gap: int | None = None,
        on_error: str = "return",
        **kwargs: Any,
    ) -> list[Any]:
        """Every range in one parallel batched read (fsspec's dataloader/parquet path)."""
        if max_gap is not None:
            raise NotImplementedError("max_gap")
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        n = len(paths)
        starts = starts if isinstance(starts, list) else [starts] * n
        ends = ends if isinstance(ends, list) else [ends] * n
        if len(starts) != n or len(ends) != n:
            raise ValueError("paths, starts and ends differ in length")
        stripped = [self._strip_protocol(p) for p in paths]
        out: list[Any] = [None] * n
        ranges: list[tuple[str, int, int]] = []
        where: list[int] = []
        sizes: dict[str, int] = {}
        for i, (p, s, e) in enumerate(zip(stripped, starts, ends, strict=True)):
            try:
                if (s is not None and s < 0) or e is None or e < 0:
                    if p not in sizes:
                        sizes[p] = self.client.stat(p).st_size
                    size = sizes[p]
                else:
                    size = None
                if s is None:
                    lo = 0
                elif s >= 0:
                    lo = s
                else:
                    assert size is not None
                    lo = max(0, size + s)
                if e is not None and e >= 0:
                    hi = e
                else:
                    assert size is not None
                    hi = size if e is None else size + e
                ranges.append((p, lo, max(0, hi - lo)))
                where.append(i)
            except Exception as err:
                if on_error != "return":
                    raise
                out[i] = err
        if ranges:
            try:
                results = self.client.read_ranges(ranges)
            except Exception:
                if on_error != "return":
                    raise
                # One bad range fails the batch: retry one by one to place the errors.
                results = []
                for r in ranges:
                    try:
                        results.extend(self.client.read_ranges([r]))
                    except Exception as err:
                        results.append(err)
            for i, r in zip(where, results, strict=True):
                out[i] = r if isinstance(r, Exception) else bytes(r)
        return out

    def pipe_file(self, path: str, value: Any, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self._make_parent(path)
        if mode == "create":
            with self.client.open(path, "xb") as f:
                f.write(value)
        elif mode == "overwrite":
            self.client.write_file(path, value)
        else:
            raise ValueError(f"pipe_file mode must be 'create' or 'overwrite', not {mode!r}")

    def checksum(self, path: str) -> int:
        return int(self.ukey(path).replace("-", ""))

    def __reduce__(self) -> Any:
        # Pickles as its address (and the token it was given): a worker process
        # opens its own connection.
        return (_rebuild, (self.address, self._token))


def _rebuild(address: str, token: str | None = None) -> ChainFileSystem:
    return ChainFileSystem(address=address, token=token)


class _DeferredFile:
    """A write inside an fsspec transaction: goes to a temp name, renamed on commit."""

    def __init__(self, fs: ChainFileSystem, path: str, mode: str) -> None:
        if "a" in mode or "+" in mode:
            raise ChainfsError(Code.EOPNOTSUPP, f"mode {mode!r} inside a transaction", path)
        self.fs = fs
        self.path = path
        parent, name = posixpath.split(path)
        self.temp = posixpath.join(parent, f".{name}.chainfs-tx-{uuid.uuid4().hex[:12]}")
        if "x" in mode and fs.client.exists(path):
            raise FileExistsError(errno.EEXIST, "file exists", path)
        self._f = fs.client.open(self.temp, "wb")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _DeferredFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()

    def commit(self) -> None:
        self._f.close()
        self.fs.client.rename(self.temp, self.path)

    def discard(self) -> None:
        self._f.close()
        self.fs.client.remove(self.temp)
