"""The sync and async twins expose the same public names with the same parameters.

``chainfs.connect`` / ``chainfs.aio.connect`` promise one API in two styles
(methods of the async twin are coroutines). Each difference that is meant is
listed below with its reason; any other one fails here.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import pytest

from chainfs.client.aio_fs import AsyncFileSystem
from chainfs.client.file import AsyncFile
from chainfs.client.kvcache import AsyncKVCache, KVCache
from chainfs.client.sync import FileSystem
from chainfs.client.sync_file import File

# name -> why only the sync twin has it
SYNC_ONLY = {
    FileSystem: {"aio": "the async core of a sync FileSystem"},
    File: {
        "detach": "io.BufferedIOBase protocol (raises UnsupportedOperation)",
        "raw": "io.BufferedIOBase protocol (raises AttributeError)",
    },
    KVCache: {"aio": "the async core of a sync KVCache"},
}
# name -> why only the async twin has it
ASYNC_ONLY = {
    AsyncFileSystem: {"io": "the chunk I/O engine, bound to the async core's event loop"},
    AsyncFile: {
        "close_unwritten": "the sync File's close of a create without a loop hop",
        "seek_sync": "no-I/O seek the sync File calls without a loop hop",
        "try_read_buffered": "the sync File's fast path without a loop hop",
        "try_write_buffered": "the sync File's fast path without a loop hop",
    },
    AsyncKVCache: {"open": "async constructor; the sync KVCache wraps an opened one"},
}
# name -> why the parameters differ
PARAMS_DIFFER = {
    FileSystem: {
        "open": "the sync twin also opens text files (encoding, errors, newline)",
        "close": "timeout_s bounds the wait before the loop thread stops; async callers "
        "bound an await with asyncio.timeout",
    },
}

TWINS = [(FileSystem, AsyncFileSystem), (File, AsyncFile), (KVCache, AsyncKVCache)]


def _init_attributes(cls: type) -> dict[str, Any]:
    """Public attributes assigned as ``self.name = ...`` in the class's own __init__."""
    init = cls.__dict__.get("__init__")
    if init is None:
        return {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    return {
        node.attr: "attribute"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and not node.attr.startswith("_")
    }


def public_members(cls: type) -> dict[str, Any]:
    """Public names defined by chainfs classes in ``cls``'s MRO (not io's or object's)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("chainfs"):
            continue
        out.update(_init_attributes(klass))
        out.update({n: v for n, v in vars(klass).items() if not n.startswith("_")})
    return out


def _shape(member: Any) -> Any:
    """What must match: parameter names, kinds and defaults (annotations may differ)."""
    if isinstance(member, property) or member == "attribute":
        return "attribute"
    if isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    if not callable(member):
        return "attribute"
    return [(p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()]


@pytest.mark.parametrize(("sync_cls", "async_cls"), TWINS, ids=lambda c: c.__name__)
def test_twins_expose_the_same_names(sync_cls: type, async_cls: type) -> None:
    sync_names, async_names = set(public_members(sync_cls)), set(public_members(async_cls))
    assert sync_names - async_names == set(SYNC_ONLY.get(sync_cls, {}))
    assert async_names - sync_names == set(ASYNC_ONLY.get(async_cls, {}))


@pytest.mark.parametrize(("sync_cls", "async_cls"), TWINS, ids=lambda c: c.__name__)
def test_twins_take_the_same_parameters(sync_cls: type, async_cls: type) -> None:
    sync_members, async_members = public_members(sync_cls), public_members(async_cls)
    allowed = PARAMS_DIFFER.get(sync_cls, {})
    differ = {
        name
        for name in set(sync_members) & set(async_members)
        if _shape(sync_members[name]) != _shape(async_members[name])
    }
    assert differ == set(allowed)
