"""`chainfs dump FILE` / `chainfs load FILE`: a namespace to and from a file (backup, migration).

FILE holds JSON lines: a header, one line per entry in depth-first pre-order
(a directory before what is in it), a footer with the totals; so both
directions stream, holding one readdir page per directory level and the
inodes of files with several links (to dump each hard-linked file once).
File contents go to ``FILE.data/`` (``--metadata-only``: not at all), one
local file per chainfs file, named in the entry with its SHA-256.

Kept: type, mode, uid, gid, atime and mtime (ctime is the time of the load,
as with tar), xattrs, symlink targets, hard links, and the chunk size and
stripe of every file and directory. The chains a layout names are a property
of the source cluster and are not kept: the loading cluster picks its own.

Namespace and data go through the client (``chainfs.aio.connect``); listing
with layouts and no-follow attribute changes (a symlink's owner and times)
go through the meta client, as `chainfs admin get-layout` does, because the
file API has neither.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import posixpath
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.progress import Progress

from chainfs.cli.admin.common import DEFAULT_ADDRESS_ENV
from chainfs.cli.admin.layout import meta_client
from chainfs.cli.options import token_options
from chainfs.cli.progress import byte_progress
from chainfs.client.aio_fs import AsyncFileSystem
from chainfs.common.errors import ChainfsError
from chainfs.common.rpc.meta_client import MetaClient
from chainfs.proto import meta_pb2 as pb

FORMAT = "chainfs-dump"
FORMAT_VERSION = 1
DATA_SUFFIX = ".data"
COPY_PIECE_BYTES = 8 * 1024 * 1024  # one read and one write per piece: memory per copy
READDIR_PAGE_ENTRIES = 1024  # entries per readdir call while dumping
_FILE_TYPES = {pb.FILE: "file", pb.DIRECTORY: "dir", pb.SYMLINK: "symlink"}
ProgressFn = Callable[[int], None]
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a dump or load; chainfs and file errors become a one-line message, exit 1."""
    try:
        return asyncio.run(coro)
    except (ChainfsError, OSError) as e:
        raise click.ClickException(str(e)) from None


@dataclass
class Totals:
    """What a dump holds; the footer line, checked by load."""

    entries: int = 0
    files: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"entries": self.entries, "files": self.files, "bytes": self.bytes}


def data_dir_of(dump_path: Path) -> Path:
    return dump_path.with_name(dump_path.name + DATA_SUFFIX)


def _join(root: str, rel: str) -> str:
    return root if rel == "." else posixpath.join(root, rel)


# -- dump -------------------------------------------------------------------
async def walk(meta: MetaClient, root: str, rel: str = ".") -> AsyncIterator[tuple[str, pb.Inode]]:
    """(relative path, inode) of everything under ``root``, depth-first pre-order."""
    async for e in meta.iterdir(_join(root, rel), with_attrs=True, page=READDIR_PAGE_ENTRIES):
        child = os.fsdecode(e.name) if rel == "." else f"{rel}/{os.fsdecode(e.name)}"
        yield child, e.inode
        if e.inode.type == pb.DIRECTORY:
            async for item in walk(meta, root, child):
                yield item


async def count(meta: MetaClient, root: str) -> Totals:
    """Entries, files and bytes under ``root`` (a hard-linked file once): the progress total."""
    totals = Totals(entries=1)
    seen: set[int] = set()
    async for _, inode in walk(meta, root):
        totals.entries += 1
        if inode.type == pb.FILE and inode.ino not in seen:
            if inode.nlink > 1:
                seen.add(inode.ino)
            totals.files += 1
            totals.bytes += inode.size
    return totals


def _layout(lay: pb.Layout) -> dict[str, int]:
    return {"chunk_size": lay.chunk_size, "stripe": lay.stripe}


async def entry_record(meta: MetaClient, path: str, rel: str, inode: pb.Inode) -> dict[str, Any]:
    """The JSON line of one entry (contents aside)."""
    rec: dict[str, Any] = {
        "path": rel,
        "type": _FILE_TYPES[inode.type],
        "mode": inode.mode,
        "uid": inode.uid,
        "gid": inode.gid,
        "atime_ns": inode.atime_ns,
        "mtime_ns": inode.mtime_ns,
    }
    names = await meta.listxattr(path, follow=False)
    if names:
        rec["xattrs"] = {
            n: base64.b64encode(await meta.getxattr(path, n, follow=False)).decode()
            for n in sorted(names)
        }
    if inode.type == pb.SYMLINK:
        rec["target"] = os.fsdecode(inode.symlink_target or await meta.readlink_bytes(path))
    else:
        rec["layout"] = _layout(inode.layout)
    if inode.type == pb.FILE:
        rec["size"] = inode.size
    return rec


async def copy_out(fs: AsyncFileSystem, path: str, dest: Path, advance: ProgressFn) -> str:
    """Copy the chainfs file ``path`` to ``dest`` piece by piece; its SHA-256."""
    digest = hashlib.sha256()
    dest.parent.mkdir(exist_ok=True)
    # Local disk I/O in a worker thread: the client's event loop keeps moving.
    out = await asyncio.to_thread(open, dest, "wb")
    try:
        async with await fs.open(path, "rb") as src:
            while piece := await src.read(COPY_PIECE_BYTES):
                digest.update(piece)
                await asyncio.to_thread(out.write, piece)
                advance(len(piece))
    finally:
        await asyncio.to_thread(out.close)
    return digest.hexdigest()


@dataclass
class Dumper:
    """Writes the entry lines of one dump (and the contents, if ``data_dir``)."""

    fs: AsyncFileSystem
    meta: MetaClient
    root: str
    out: IO[str]
    data_dir: Path | None
    advance: ProgressFn
    totals: Totals = field(default_factory=Totals)
    first_name: dict[int, str] = field(default_factory=dict)  # hard-linked ino -> first path

    def write(self, rec: dict[str, Any]) -> None:
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")

    async def entry(self, rel: str, inode: pb.Inode) -> None:
        self.totals.entries += 1
        if inode.type == pb.FILE and inode.nlink > 1:
            first = self.first_name.get(inode.ino)
            if first is not None:
                self.write({"path": rel, "type": "link", "link_to": first})
                return
            self.first_name[inode.ino] = rel
        path = _join(self.root, rel)
        rec = await entry_record(self.meta, path, rel, inode)
        if inode.type == pb.FILE:
            self.totals.files += 1
            self.totals.bytes += inode.size
            if self.data_dir is not None:
                name = f"{self.totals.files % 256:02x}/{self.totals.files}"
                rec["data"] = name
                dest = self.data_dir / name
                rec["sha256"] = await copy_out(self.fs, path, dest, self.advance)
                rec["size"] = dest.stat().st_size  # what was copied (the file may grow)
        self.write(rec)


async def dump_tree(
    address: str, root: str, out: IO[str], data_dir: Path | None, progress: Progress
) -> Totals:
    """Write header, entries and footer of ``root`` to ``out``; the totals."""
    import chainfs.aio

    fs = await chainfs.aio.connect(address)
    try:
        async with meta_client(address) as meta:
            root_inode = await meta.stat(root, follow=True)
            if root_inode.type != pb.DIRECTORY:
                raise click.ClickException(f"{root} is not a directory")
            expected = await count(meta, root)
            total = expected.bytes if data_dir is not None else expected.entries
            task = progress.add_task("dump", total=total, detail="")
            d = Dumper(fs, meta, root, out, data_dir, lambda n: progress.advance(task, n))
            header = {"format": FORMAT, "version": FORMAT_VERSION, "root": root}
            d.write({**header, "contents": data_dir is not None, "created_ns": time.time_ns()})
            await d.entry(".", root_inode)
            async for rel, inode in walk(meta, root):
                await d.entry(rel, inode)
                if data_dir is None:
                    progress.advance(task, 1)
                progress.update(task, detail=f"{d.totals.entries:,} entries")
            d.write({"end": True, **d.totals.as_dict()})
            return d.totals
    finally:
        await fs.close()


def _prepare_outputs(out_path: Path, metadata_only: bool, force: bool) -> Path | None:
    """Refuse to overwrite an earlier dump unless --force; the data directory to fill."""
    data_dir = data_dir_of(out_path)
    for p in (out_path, data_dir):
        if p.exists() and not force:
            raise click.ClickException(f"{p} exists (give --force to replace it)")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    if metadata_only:
        return None
    data_dir.mkdir(parents=True)
    return data_dir


_address_option = click.option(
    "--address",
    envvar=DEFAULT_ADDRESS_ENV,
    required=True,
    help=f"mgmtd address host:port (default ${DEFAULT_ADDRESS_ENV}).",
)


@click.command()
@token_options
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--path", "root", default="/", show_default=True, help="Directory to dump.")
@click.option(
    "--metadata-only",
    is_flag=True,
    help="The namespace without file contents (load creates the files empty).",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT and OUT.data.")
@_address_option
def dump(out: Path, root: str, metadata_only: bool, force: bool, address: str) -> None:
    """Write the namespace under --path to OUT (JSON lines) and the contents to OUT.data/."""
    data_dir = _prepare_outputs(out, metadata_only, force)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w") as f, byte_progress() as progress:
        totals = run(dump_tree(address, root, f, data_dir, progress))
        f.flush()
        os.fsync(f.fileno())
    partial.replace(out)
    where = "" if data_dir is None else f", contents in {data_dir}"
    click.echo(
        f"dumped {totals.entries} entries ({totals.files} files, {totals.bytes:,} bytes) "
        f"of {root} to {out}{where}"
    )


# -- load -------------------------------------------------------------------
def read_ends(dump_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and footer of a dump; a clear error for anything else or a cut-off dump."""
    with open(dump_path, "rb") as f:
        header = _parse_line(f.readline(), dump_path, "first")
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        footer = _parse_line(f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1], dump_path, "last")
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise click.ClickException(f"{dump_path} is not a chainfs dump (version {FORMAT_VERSION})")
    if footer.get("end") is not True:
        raise click.ClickException(f"{dump_path} is incomplete: it has no end line")
    return header, footer


def _parse_line(line: bytes, dump_path: Path, which: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError:
        raise click.ClickException(f"{dump_path}: the {which} line is not JSON") from None
    if not isinstance(rec, dict):
        raise click.ClickException(f"{dump_path}: the {which} line is not an object")
    return rec


def entries(dump_path: Path) -> Iterator[dict[str, Any]]:
    """The entry lines of a dump, one at a time (header and footer skipped)."""
    with open(dump_path, "rb") as f:
        f.readline()
        for line in f:
            rec = json.loads(line)
            if rec.get("end") is True:
                return
            yield rec


def _under(path: str, directory: str) -> bool:
    return directory == "." or path.startswith(directory + "/")


@dataclass
class Loader:
    """Recreates entries under ``target``; a directory's attributes once its subtree is done."""

    fs: AsyncFileSystem
    meta: MetaClient
    target: str
    data_dir: Path | None
    chains: int  # chains of this cluster: a file's stripe is at most that
    advance: ProgressFn
    force: bool
    open_dirs: list[dict[str, Any]] = field(default_factory=list)  # the current path's dirs
    staging: dict[tuple[int, int], str] = field(default_factory=dict)  # layout -> dir
    narrowed: int = 0  # files whose stripe this cluster cannot match
    # Only root may give files away (as tar): anyone else loads them as their own.
    keep_owners: bool = field(default_factory=lambda: os.geteuid() == 0)

    def path(self, rec: dict[str, Any]) -> str:
        return _join(self.target, rec["path"])

    async def entry(self, rec: dict[str, Any]) -> None:
        while self.open_dirs and not _under(rec["path"], self.open_dirs[-1]["path"]):
            await self.finish(self.open_dirs.pop())
        kind = rec["type"]
        if kind == "dir":
            await self.directory(rec)
            self.open_dirs.append(rec)
            return
        if self.force:
            await self._clear(self.path(rec))
        if kind == "link":
            await self.fs.link(_join(self.target, rec["link_to"]), self.path(rec))
            return
        if kind == "symlink":
            await self.fs.symlink(rec["target"], self.path(rec))
        elif kind == "file":
            await self.file(rec)
        else:
            raise click.ClickException(f"unknown entry type {kind!r} at {rec['path']}")
        await self.attributes(rec)

    async def directory(self, rec: dict[str, Any]) -> None:
        path = self.path(rec)
        if rec["path"] != ".":
            await self.fs.mkdir(path, 0o700, exist_ok=self.force)
        lay = rec["layout"]
        if lay["chunk_size"] or lay["stripe"]:
            await self.meta.set_layout(path, chunk_size=lay["chunk_size"], stripe=lay["stripe"])

    async def file(self, rec: dict[str, Any]) -> None:
        """Create the file with its layout (through a staging directory when the
        parent's differs: a file's layout is fixed at create), then its contents."""
        final = self.path(rec)
        lay = rec["layout"]
        parent = self.open_dirs[-1]["layout"]
        stripe = min(lay["stripe"], self.chains)
        self.narrowed += stripe < lay["stripe"]
        inherits = parent["stripe"] and min(parent["stripe"], self.chains) == stripe
        inherits = inherits and parent["chunk_size"] == lay["chunk_size"]
        path = final if inherits else await self._staged(lay, rec["path"])
        async with await self.fs.open(path, "wb") as out:
            if self.data_dir is not None and "data" in rec:
                await self._copy_in(rec, out)
        if path != final:
            await self.fs.rename(path, final)

    async def _copy_in(self, rec: dict[str, Any], out: Any) -> None:
        digest = hashlib.sha256()
        assert self.data_dir is not None
        src = await asyncio.to_thread(open, self.data_dir / rec["data"], "rb")
        try:
            while piece := await asyncio.to_thread(src.read, COPY_PIECE_BYTES):
                digest.update(piece)
                await out.write(piece)
                self.advance(len(piece))
        finally:
            src.close()
        if digest.hexdigest() != rec["sha256"]:
            raise click.ClickException(
                f"{self.data_dir / rec['data']} (contents of {rec['path']}) does not match "
                "the checksum in the dump: the data directory is damaged"
            )

    async def _staged(self, lay: dict[str, int], rel: str) -> str:
        """A path for a new file in a hidden directory whose layout is ``lay``."""
        key = (lay["chunk_size"], lay["stripe"])
        if key not in self.staging:
            d = _join(self.target, f".chainfs-load-{secrets.token_hex(6)}")
            await self.fs.mkdir(d, 0o700)
            await self.meta.set_layout(d, chunk_size=key[0], stripe=key[1])
            self.staging[key] = d
        return posixpath.join(self.staging[key], posixpath.basename(rel))

    async def _clear(self, path: str) -> None:
        """--force: make room for a non-directory entry (an existing directory stays an error)."""
        try:
            st = await self.fs.lstat(path)
        except FileNotFoundError:
            return
        if st.st_mode & 0o170000 == 0o040000:
            raise click.ClickException(f"{path} is a directory in the target, not in the dump")
        await self.fs.remove(path)

    async def attributes(self, rec: dict[str, Any]) -> None:
        """Owner, xattrs, then mode and times (chown clears setuid; times last)."""
        path = self.path(rec)
        if self.keep_owners:
            await self.meta.setattr(path, follow=False, uid=rec["uid"], gid=rec["gid"])
        for name, value in rec.get("xattrs", {}).items():
            await self.meta.setxattr(path, name, base64.b64decode(value), follow=False)
        mode = None if rec["type"] == "symlink" else rec["mode"]
        times = {"atime_ns": rec["atime_ns"], "mtime_ns": rec["mtime_ns"]}
        await self.meta.setattr(path, follow=False, mode=mode, **times)

    async def finish(self, rec: dict[str, Any]) -> None:
        await self.attributes(rec)

    async def close(self) -> None:
        """Remove the staging directories, then finish the directories still open."""
        for d in self.staging.values():
            await self.fs.rmdir(d)
        while self.open_dirs:
            await self.finish(self.open_dirs.pop())


async def _check_target(fs: AsyncFileSystem, target: str, force: bool) -> None:
    """The target directory: created if absent; refused if it holds anything (unless --force)."""
    try:
        st = await fs.stat(target)
    except FileNotFoundError:
        await fs.mkdir(target, parents=True, exist_ok=True)
        return
    if st.st_mode & 0o170000 != 0o040000:
        raise click.ClickException(f"{target} is not a directory")
    if not force and await fs.listdir(target):
        raise click.ClickException(f"{target} is not empty (give --force to load into it)")


async def load_tree(
    address: str,
    dump_path: Path,
    target: str,
    footer: dict[str, Any],
    force: bool,
    progress: Progress,
) -> Loader:
    import chainfs.aio
    from chainfs.common.rpc.mgmt_client import MgmtClient

    data_dir = data_dir_of(dump_path)
    fs = await chainfs.aio.connect(address)
    try:
        async with meta_client(address) as meta, MgmtClient(address) as mgmt:
            await _check_target(fs, target, force)
            routing = await mgmt.get_routing()
            assert routing is not None  # asked with no known version
            with_data = data_dir.is_dir()
            total = footer["bytes"] if with_data else footer["entries"]
            task = progress.add_task("load", total=total, detail="")
            loader = Loader(
                fs,
                meta,
                target,
                data_dir if with_data else None,
                max(len(routing.chains), 1),
                lambda n: progress.advance(task, n),
                force,
            )
            done = 0
            for rec in entries(dump_path):
                await loader.entry(rec)
                done += 1
                progress.update(
                    task,
                    advance=0 if with_data else 1,
                    detail=f"{done:,}/{footer['entries']:,} entries",
                )
            await loader.close()
            if done != footer["entries"]:
                raise click.ClickException(
                    f"{dump_path}: {done} entries, but its end line says {footer['entries']}"
                )
            return loader
    finally:
        await fs.close()


@click.command()
@token_options
@click.argument("dump_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", default="/", show_default=True, help="Directory to recreate the dump in.")
@click.option("--force", is_flag=True, help="Load into a directory that is not empty.")
@_address_option
def load(dump_file: Path, target: str, force: bool, address: str) -> None:
    """Recreate the namespace (and contents) of DUMP_FILE under --target."""
    header, footer = read_ends(dump_file)
    if header["contents"] and not data_dir_of(dump_file).is_dir():
        raise click.ClickException(
            f"the contents of this dump, {data_dir_of(dump_file)}, are missing"
        )
    with byte_progress() as progress:
        loader = run(load_tree(address, dump_file, target, footer, force, progress))
    click.echo(
        f"loaded {footer['entries']} entries ({footer['files']} files, {footer['bytes']:,} bytes) "
        f"into {target}"
    )
    if not loader.keep_owners:
        click.echo("note: not run as root, so the files belong to you, not to their owners")
    if loader.narrowed:
        click.echo(
            f"note: {loader.narrowed} files spread over fewer chains than in the dump "
            f"(this cluster has {loader.chains})"
        )
