"""The namespace operations, one family per module, each a transaction body
run by :class:`~chainfs.meta_service.ops.base.NamespaceBase`."""
