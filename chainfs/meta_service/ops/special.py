"""Special files (mknod: FIFOs, UNIX sockets, character and block devices),
fallocate, and the setuid/setgid drop Linux makes on writes by others.

A special file is an inode with a type and, for devices, ``rdev``: it has no
layout and its data never reaches storage (the kernel that opens it serves
it: a FIFO between two processes of one machine, a device of that machine).
Its removal drops the inode at once, like a symlink's.
"""

from __future__ import annotations

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.meta_wire import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from chainfs.meta_service import perm
from chainfs.meta_service.ctx import FILE, parse
from chainfs.meta_service.ops.base import NamespaceBase
from chainfs.meta_service.ops.context import OpCtx, Tag, check_mode
from chainfs.meta_service.perm import S_ISGID, S_ISUID, Caller
from chainfs.proto import meta_pb2 as pb

SPECIAL_TYPES = frozenset({pb.FIFO, pb.SOCKET, pb.CHAR_DEVICE, pb.BLOCK_DEVICE})
DEVICE_TYPES = frozenset({pb.CHAR_DEVICE, pb.BLOCK_DEVICE})
MAX_RDEV = (1 << 64) - 1

# The modes chainfs implements; any other is EOPNOTSUPP and changes nothing.
FALLOCATE_MODES = frozenset({0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE})


def kill_priv(inode: pb.Inode, caller: Caller) -> bool:
    """Linux's should_remove_suid: a write or truncate by anyone but root drops
    setuid, and setgid when group-execute is set (setgid without it marks
    mandatory locking, which stays). Returns whether the mode changed."""
    if inode.type != FILE or caller.is_root:
        return False
    drop = inode.mode & S_ISUID
    if inode.mode & (S_ISGID | 0o010) == S_ISGID | 0o010:
        drop |= S_ISGID
    inode.mode &= ~drop
    return bool(drop)


def is_priv_drop(inode: pb.Inode, new_mode: int) -> bool:
    """Whether ``new_mode`` is the current mode with only setuid/setgid cleared."""
    cleared = inode.mode & ~new_mode
    return new_mode & ~inode.mode == 0 and cleared & ~(S_ISUID | S_ISGID) == 0


def check_openable(inode: pb.Inode) -> None:
    """Meta serves no data of special files: opening one goes to the kernel that has it."""
    if inode.type in SPECIAL_TYPES:
        raise ChainfsError(
            Code.ENXIO, f"inode {inode.ino} is a special file (open it through a mount)"
        )


class SpecialOps(NamespaceBase):
    async def mknod(self, r: pb.MknodReq) -> pb.MknodRsp:
        p = parse(r.at, self.cfg)
        mode = check_mode(r.mode)
        if r.type not in SPECIAL_TYPES and r.type != FILE:
            raise ChainfsError(Code.EINVAL, f"mknod of inode type {r.type}")
        if r.rdev and r.type not in DEVICE_TYPES:
            raise ChainfsError(Code.EINVAL, "a device number for a file that is not a device")

        async def body(ctx: OpCtx) -> pb.MknodRsp:
            t = await ctx.resolve(p, follow_last=False)
            parent = await self._creation_parent(ctx, t)
            if r.type in DEVICE_TYPES and not ctx.caller.is_root:
                raise ChainfsError(Code.EPERM, "only root may create device nodes")
            inode = self._new_inode(ctx, await ctx.new_ino(), r.type, mode, parent)
            if r.type == FILE:
                inode.layout.CopyFrom(self._file_layout(parent.layout))
            inode.rdev = r.rdev
            ctx.put(inode)
            ctx.set_entry(parent.ino, t.name, inode.ino, r.type)
            ctx.touch_dir(parent)
            return pb.MknodRsp(inode=inode, parent=parent)

        return await self._mutate(r.req, Tag.MKNOD, pb.MknodRsp, body, new_ids=True, paths=(p,))

    async def fallocate(self, r: pb.FallocateReq) -> pb.FallocateRsp:
        """The metadata side of fallocate: checks, the new length, the times.
        Punching a hole changes no length; the caller then drops the bytes."""
        p = parse(r.at, self.cfg)
        if r.mode not in FALLOCATE_MODES:
            raise ChainfsError(Code.EOPNOTSUPP, f"fallocate mode {r.mode:#x} is not supported")
        if r.length == 0:
            raise ChainfsError(Code.EINVAL, "fallocate of 0 bytes")
        end = r.offset + r.length
        if end > self.cfg.max_file_size_bytes:
            raise ChainfsError(Code.EFBIG, f"fallocate to {end} beyond the file size limit")

        async def body(ctx: OpCtx) -> pb.FallocateRsp:
            inode = await self._lookup_target(ctx, p, follow=True)
            if inode.type != FILE:
                raise ChainfsError(
                    Code.ESPIPE if inode.type == pb.FIFO else Code.ENODEV,
                    f"inode {inode.ino} is not a regular file",
                )
            perm.check(inode, perm.W, ctx.caller, "fallocate")
            changed = False
            if r.mode == 0 and end > inode.size:
                inode.size = end
                changed = True
            if r.mode & FALLOC_FL_PUNCH_HOLE:
                changed = True
            if changed:
                kill_priv(inode, ctx.caller)
                inode.mtime_ns = inode.ctime_ns = ctx.now_ns
                ctx.put(inode)
            return pb.FallocateRsp(inode=inode)

        return await self._mutate(r.req, Tag.FALLOCATE, pb.FallocateRsp, body, paths=(p,))
