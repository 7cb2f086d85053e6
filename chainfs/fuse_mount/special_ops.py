"""FUSE handlers of special files: mknod of FIFOs, UNIX sockets (bind(2)
makes one), character and block devices, and regular files.

Meta keeps the inode and its rdev; the kernel serves the rest itself (a FIFO
opened on this mount joins the processes of this machine; pyfuse3 never sees
its reads and writes).
"""

from __future__ import annotations

import pyfuse3

from chainfs.fuse_mount.ops_base import OpsBase, op, replied


class SpecialOps(OpsBase):
    @op
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rsp = await self._changing(
            self.meta.mknod_reply((parent_inode, name), mode, rdev, user=self._user(ctx)),
            added=[(parent_inode, name)],
            left=lambda r: replied(r, "parent"),
        )
        self._remember(rsp.inode.ino)
        return self._entry(rsp.inode)
