"""The trash: delayed deletion of regular files, on when the cluster setting
``meta.trash_retention_ms`` is above 0 (at 0, unlink frees at once as POSIX says).

Unlinking a file's last name moves that name to ``/.trash/<uid>/<ms>-<ino>-<name>``
(a real directory entry, so nlink, open sessions and fsck see an ordinary
file) and queues ``TRSH|due_ms|ino``. Purging is an ordinary unlink of that
entry, which hands the file to GC. ``/.trash`` (0711, root) and
``/.trash/<uid>`` (0700, the file's owner) are created on demand. Only unlink
goes through the trash: a rename over a file and rmdir free at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from chainfs.common.background import Periodic
from chainfs.common.errors import ChainfsError, Code
from chainfs.kv import Transaction
from chainfs.meta_service import perm, schema
from chainfs.meta_service.config import NAME_MAX
from chainfs.meta_service.ctx import DIRECTORY, FILE, Last, parse
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import M, OpCtx
from chainfs.proto import meta_pb2 as pb

TRASH_NAME = b".trash"
TRASH_ROOT_MODE = 0o711  # anyone may pass through to their own directory
TRASH_USER_MODE = 0o700


def entry_name(now_ms: int, ino: int, name: bytes) -> bytes:
    """``<ms>-<ino>-<name>``, the name cut to fit NAME_MAX (the record keeps it whole)."""
    return (f"{now_ms}-{ino}-".encode() + name)[:NAME_MAX]


def entry_ino(entry: bytes) -> int:
    parts = entry.split(b"-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise ChainfsError(Code.EINVAL, f"{entry!r} is not a trash entry (<ms>-<ino>-<name>)")
    return int(parts[1])


class TrashOps(NamespaceBase):
    async def _to_trash(
        self, ctx: OpCtx, parent: pb.Inode, name: bytes, inode: pb.Inode, retention_ms: int
    ) -> bool:
        """Move the last name of file ``inode`` to the trash; False (a real
        unlink then) when it is in the trash already."""
        assert inode.type == FILE and inode.nlink == 1, inode
        root = await ctx.inode(schema.ROOT_INO)
        top = await self._trash_dir(ctx, root, TRASH_NAME, 0, 0, TRASH_ROOT_MODE)
        if parent.ino == top.ino or parent.parent == top.ino:
            return False
        user_dir_name = str(inode.uid).encode()
        udir = await self._trash_dir(ctx, top, user_dir_name, inode.uid, inode.gid, TRASH_USER_MODE)
        entry = entry_name(ctx.now_ms, inode.ino, name)
        ctx.clear_entry(parent.ino, name)
        ctx.touch_dir(parent)
        ctx.set_entry(udir.ino, entry, inode.ino, FILE)
        ctx.touch_dir(udir)
        inode.ctime_ns = ctx.now_ns
        ctx.put(inode)
        due_ms = ctx.now_ms + retention_ms
        rec = pb.TrashRecord(
            ino=inode.ino,
            uid=inode.uid,
            entry=entry,
            orig_parent=parent.ino,
            orig_name=name,
            removed_ms=ctx.now_ms,
            due_ms=due_ms,
        )
        ctx.tx.set(schema.trash_key(due_ms, inode.ino), rec.SerializeToString())
        return True

    async def _trash_dir(
        self, ctx: OpCtx, parent: pb.Inode, name: bytes, uid: int, gid: int, mode: int
    ) -> pb.Inode:
        found = await ctx.lookup(parent.ino, name)
        if found is not None:
            d = await ctx.inode(found[0])
            if d.type != DIRECTORY:
                raise ChainfsError(Code.ENOTDIR, f"trash directory {name!r} is not a directory")
            return d
        d = self._new_inode(ctx, await ctx.new_ino(), DIRECTORY, mode, parent)
        d.uid, d.gid, d.mode = uid, gid, mode
        self._add_dir(ctx, parent, name, d)
        return d

    async def _user_dir_entry(self, ctx: OpCtx, rec: pb.TrashRecord) -> int | None:
        """The directory of ``rec``'s entry if the entry still names its file."""
        top = await ctx.lookup(schema.ROOT_INO, TRASH_NAME)
        udir = top and await ctx.lookup(top[0], str(rec.uid).encode())
        found = udir and await ctx.lookup(udir[0], rec.entry)
        if not udir or not found or found[0] != rec.ino:
            return None
        return udir[0]

    async def _find(self, ctx: OpCtx, entry: bytes) -> tuple[bytes, pb.TrashRecord]:
        ino = entry_ino(entry)
        rows = await ctx.tx.get_range(
            *schema.range_of(schema.TRSH), limit=self.cfg.trash_list_limit
        )
        for key, value in rows:
            rec = pb.TrashRecord.FromString(value)
            if rec.ino == ino and rec.entry == entry:
                return key, rec
        raise ChainfsError(Code.ENOENT, f"no trash entry {entry!r}")

    async def _as_root(self, body: Callable[[OpCtx], Awaitable[M]]) -> M:
        """An operator's call: one transaction as root, no answer kept for retries."""

        async def fn(tx: Transaction) -> M:
            return await body(OpCtx(tx, perm.ROOT, self.cfg, None, {}))

        return await self.kv.transact(fn)

    async def trash_list(self, r: pb.TrashListReq) -> pb.TrashListRsp:
        limit = self.cfg.trash_list_limit

        async def fn(tx: Transaction) -> pb.TrashListRsp:
            rows = await tx.get_range(*schema.range_of(schema.TRSH), limit=limit + 1)
            rsp = pb.TrashListRsp(counted_all=len(rows) <= limit)
            for _, value in rows[:limit]:
                rec = pb.TrashRecord.FromString(value)
                if r.by_uid and rec.uid != r.uid:
                    continue
                raw = await tx.get(schema.inode_key(rec.ino))
                rsp.records.append(rec)
                rsp.sizes.append(schema.decode_inode(raw).size if raw else 0)
            return rsp

        return await self.kv.transact(fn, read_only=True)

    async def trash_restore(self, r: pb.TrashRestoreReq) -> pb.TrashRestoreRsp:
        async def body(ctx: OpCtx) -> pb.TrashRestoreRsp:
            key, rec = await self._find(ctx, r.entry)
            udir = await self._user_dir_entry(ctx, rec)
            if udir is None:
                raise ChainfsError(Code.ENOENT, f"{r.entry!r} is no longer in the trash")
            parent, name = await self._restore_target(ctx, r.to, rec)
            ctx.clear_entry(udir, rec.entry)
            ctx.touch_dir(await ctx.inode(udir))
            ctx.set_entry(parent.ino, name, rec.ino, FILE)
            ctx.touch_dir(parent)
            inode = await ctx.inode(rec.ino)
            inode.ctime_ns = ctx.now_ns
            ctx.put(inode)
            ctx.tx.clear(key)
            return pb.TrashRestoreRsp(record=rec, parent=parent.ino, name=name)

        return await self._as_root(body)

    async def _restore_target(
        self, ctx: OpCtx, to: bytes, rec: pb.TrashRecord
    ) -> tuple[pb.Inode, bytes]:
        """The directory and free name a restore puts the file back under."""
        if to:
            t = await ctx.resolve(parse(pb.PathAt(path=to), self.cfg), follow_last=False)
            if t.kind is not Last.NORM or t.slash:
                raise ChainfsError(Code.EINVAL, f"cannot restore to {to!r}")
            parent, name, taken = await ctx.inode(t.parent_ino), t.name, t.inode is not None
        else:
            found = await self._inode_or_none(ctx, rec.orig_parent)
            if found is None or found.type != DIRECTORY or found.nlink == 0:
                raise ChainfsError(Code.ENOENT, "the original directory is gone: restore --to PATH")
            parent, name = found, rec.orig_name
            taken = await ctx.lookup(parent.ino, name) is not None
        if taken:
            raise ChainfsError(Code.EEXIST, f"{name!r} exists in directory {parent.ino}")
        return parent, name

    async def trash_purge(self, r: pb.TrashPurgeReq) -> pb.TrashPurgeRsp:
        if sum((bool(r.entry), r.all, r.expired)) != 1:
            raise ChainfsError(Code.EINVAL, "purge one of: an entry, all, expired")
        if r.entry:

            async def one(ctx: OpCtx) -> pb.TrashPurgeRsp:
                await self._purge(ctx, *await self._find(ctx, r.entry))
                return pb.TrashPurgeRsp(purged=1)

            return await self._as_root(one)
        batch = self.cfg.trash_purge_batch

        async def some(ctx: OpCtx) -> pb.TrashPurgeRsp:
            end = schema.trash_due_end(ctx.now_ms) if r.expired else schema.range_of(schema.TRSH)[1]
            rows = await ctx.tx.get_range(schema.TRSH, end, limit=batch + 1)
            for key, value in rows[:batch]:
                await self._purge(ctx, key, pb.TrashRecord.FromString(value))
            return pb.TrashPurgeRsp(purged=len(rows[:batch]), more=len(rows) > batch)

        return await self._as_root(some)

    async def _purge(self, ctx: OpCtx, key: bytes, rec: pb.TrashRecord) -> None:
        """Unlink the trash entry (the file goes to GC); a record whose entry was
        removed or renamed meanwhile is only dropped."""
        ctx.tx.clear(key)
        udir = await self._user_dir_entry(ctx, rec)
        if udir is None:
            return
        ctx.clear_entry(udir, rec.entry)
        ctx.touch_dir(await ctx.inode(udir))
        await self._unlink_inode(ctx, await ctx.inode(rec.ino))


class TrashPurger(Periodic):
    """Purges the trash records that are due, a batch per round."""

    name = "trash-purge"

    def __init__(self, ns: TrashOps) -> None:
        super().__init__(ns.cfg.trash_purge_interval_ms / 1000)
        self.ns = ns

    async def round(self) -> bool:
        return (await self.ns.trash_purge(pb.TrashPurgeReq(expired=True))).more
