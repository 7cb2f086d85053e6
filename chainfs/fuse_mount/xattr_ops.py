"""FUSE handlers of extended attributes and access checks."""

from __future__ import annotations

import errno
import os

import pyfuse3

from chainfs.common.errors import ChainfsError
from chainfs.fuse_mount.ops_base import OpsBase, op
from chainfs.fuse_mount.state import permitted

_CAPS = b"security.capability"


class XattrOps(OpsBase):
    """getxattr and friends, answered by meta except the namespaces the mount owns."""

    def _check_xattr_name(self, name: bytes) -> None:
        """Namespaces the mount answers itself, without asking meta."""
        if name.startswith(b"system."):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # POSIX ACLs: meta has none
        if name.startswith(b"security.") and not self.config.security_xattrs:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    def _caps_changed(self, inode: int, name: bytes) -> None:
        st = self._open.get(inode)
        if st is not None and name == _CAPS:
            st.no_caps = False

    @op
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._check_xattr_name(name)
        self._caps_changed(inode, name)
        with self._changing_file(inode):  # its ctime
            await self._touching(
                inode, self.meta.setxattr(inode, name, value, follow=False, user=self._user(ctx))
            )

    @op
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._check_xattr_name(name)
        st = self._open.get(inode) if name == _CAPS else None
        if st is not None and st.no_caps:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return await self.meta.getxattr(inode, name, follow=False, user=self._user(ctx))
        except ChainfsError as e:
            if st is not None and e.errno == errno.ENODATA:
                st.no_caps = True
            raise

    @op
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = [
            os.fsencode(n)
            for n in await self.meta.listxattr(inode, follow=False, user=self._user(ctx))
        ]
        if not self.config.security_xattrs:
            names = [n for n in names if not n.startswith(b"security.")]
        return names

    @op
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._check_xattr_name(name)
        self._caps_changed(inode, name)
        with self._changing_file(inode):  # its ctime
            await self._touching(
                inode, self.meta.removexattr(inode, name, follow=False, user=self._user(ctx))
            )

    @op
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Called only without default_permissions.
        node = await self.meta.stat(inode, follow=False, user=self._user(ctx))
        return permitted(node, mode, self._user(ctx))
