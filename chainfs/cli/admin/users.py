"""`chainfs admin user-add|user-list|user-remove|token-rotate`: users and their tokens.

A token is printed once, when made; mgmtd keeps only its hash. Give it to
the user as a 0600 file and point $CHAINFS_TOKEN_FILE (or --token-file) at it.
"""

from __future__ import annotations

from typing import Any

import click

from chainfs.cli.admin.cluster import with_mgmt
from chainfs.cli.admin.common import admin, emit, emit_object, mgmt_command
from chainfs.proto import mgmt_pb2 as mp

USER_COLUMNS = ["name", "uid", "gid", "groups", "admin", "impersonate"]


def user_object(user: mp.User) -> dict[str, Any]:
    return {
        "name": user.name,
        "uid": user.uid,
        "gid": user.gid,
        "groups": list(user.groups),
        "admin": user.admin,
        "impersonate": user.impersonate,
    }


def _groups(value: str) -> list[int]:
    try:
        return [int(g) for g in value.split(",") if g.strip()]
    except ValueError:
        raise click.BadParameter(f"groups must be numbers, comma-separated: {value!r}") from None


def _emit_token(name: str, token: str, as_json: bool) -> None:
    if as_json:
        emit_object({"name": name, "token": token}, True)
        return
    click.echo(f"token of {name} (shown once; only its hash is kept):")
    click.echo(token)


@admin.command("user-add")
@click.argument("name")
@click.option("--uid", type=click.IntRange(0, 2**32 - 2), required=True)
@click.option("--gid", type=click.IntRange(0, 2**32 - 2), required=True)
@click.option("--groups", default="", help="Supplementary gids, comma-separated.")
@click.option("--admin", "is_admin", is_flag=True, help="May call admin commands.")
@click.option(
    "--impersonate",
    is_flag=True,
    help="May act for the uid/gid each request claims (a multi-user FUSE mount); "
    "a claimed uid 0 becomes 65534 unless --admin (root_squash).",
)
@mgmt_command
async def user_add_cmd(
    address: str,
    as_json: bool,
    timeout_s: float,
    name: str,
    uid: int,
    gid: int,
    groups: str,
    is_admin: bool,
    impersonate: bool,
) -> None:
    """Add user NAME and print its token (once)."""
    user = mp.User(
        name=name, uid=uid, gid=gid, groups=_groups(groups), admin=is_admin, impersonate=impersonate
    )
    rsp = await with_mgmt(address, timeout_s, lambda c: c.user_add(user))
    _emit_token(rsp.user.name, rsp.token, as_json)


@admin.command("user-list")
@mgmt_command
async def user_list_cmd(address: str, as_json: bool, timeout_s: float) -> None:
    """Users (never their tokens)."""
    users = await with_mgmt(address, timeout_s, lambda c: c.user_list())
    emit([user_object(u) for u in users], USER_COLUMNS, as_json, title="users")


@admin.command("user-remove")
@click.argument("name")
@mgmt_command
async def user_remove_cmd(address: str, as_json: bool, timeout_s: float, name: str) -> None:
    """Remove user NAME: its tokens stop working (at meta within its refresh interval)."""
    await with_mgmt(address, timeout_s, lambda c: c.user_remove(name))
    emit_object({"removed": name}, as_json)


@admin.command("token-rotate")
@click.argument("name")
@mgmt_command
async def token_rotate_cmd(address: str, as_json: bool, timeout_s: float, name: str) -> None:
    """A new token for NAME (printed once); its old token stops working."""
    token = await with_mgmt(address, timeout_s, lambda c: c.token_rotate(name))
    _emit_token(name, token, as_json)
