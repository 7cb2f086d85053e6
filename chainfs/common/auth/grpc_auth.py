"""Credentials over gRPC: a client interceptor that attaches them, a server
interceptor that checks them against :mod:`.policy` before any handler runs.

The credential travels as the binary metadata entry ``chainfs-credential-bin``
(a serialized :class:`Credential`). Admin methods leave an audit line
(logger ``chainfs.audit``) with the peer, the identity, the method and the
outcome, whether allowed or refused.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.identity import ANONYMOUS, Identity, Need, set_current_identity
from chainfs.common.auth.policy import authorize, need_of
from chainfs.common.errors import ChainfsError
from chainfs.proto import common_pb2 as cpb

CREDENTIAL_KEY = "chainfs-credential-bin"
audit = logging.getLogger("chainfs.audit")

Metadata = Sequence[tuple[str, str | bytes]]


def credential_metadata(cred: cpb.Credential | None) -> tuple[tuple[str, bytes], ...]:
    if cred is None or not (cred.token or cred.node_id):
        return ()
    return ((CREDENTIAL_KEY, cred.SerializeToString()),)


def credential_of(metadata: Metadata | None) -> cpb.Credential:
    """The credential in call metadata; an empty one (anonymous) if none or malformed."""
    for key, value in metadata or ():
        if key == CREDENTIAL_KEY and isinstance(value, bytes):
            try:
                return cpb.Credential.FromString(value)
            except Exception:  # DecodeError: treat as no credential (refused by policy)
                return cpb.Credential()
    return cpb.Credential()


class _AttachBase:
    """Adds the credential to every call of one kind on a channel."""

    def __init__(self, md: tuple[tuple[str, bytes], ...]) -> None:
        self._md = md

    def _details(self, details: Any) -> Any:
        md = list(details.metadata or ()) + list(self._md)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, md, details.credentials, details.wait_for_ready
        )


# One class per call kind: grpc.aio files an interceptor under the first kind
# it implements only, so one class doing both would leave streams unsigned
# (the routing watch then ran anonymous and was refused).
class _AttachUnary(_AttachBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AttachStream(_AttachBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def client_interceptors(cred: cpb.Credential | None) -> list[Any]:
    md = credential_metadata(cred)
    return [_AttachUnary(md), _AttachStream(md)] if md else []


def _audit(key: str, who: Identity, peer: str, outcome: str) -> None:
    audit.info("audit method=%s identity=%r peer=%s outcome=%s", key, who.describe(), peer, outcome)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call the policy does not allow for its credential."""

    def __init__(self, authenticator: Authenticator, abort: Callable[..., Awaitable[None]]) -> None:
        self._auth = authenticator
        self._abort = abort  # grpc_util's abort: sets the chainfs code trailer

    async def _admit(self, key: str, context: grpc.aio.ServicerContext) -> Identity:
        who = ANONYMOUS
        try:
            who = await self._auth.authenticate(credential_of(context.invocation_metadata()))
            authorize(key, who)
        except ChainfsError as e:
            if need_of(key) is Need.ADMIN:
                _audit(key, who, context.peer(), f"refused: {e.message}")
            await self._abort(context, e.code, e.message)
        if need_of(key) is Need.ADMIN:
            _audit(key, who, context.peer(), "allowed")
        return who

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        key = details.method.lstrip("/")
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                who = await self._admit(key, context)
                set_current_identity(who)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                who = await self._admit(key, context)
                set_current_identity(who)
                result = inner_us(request, context)
                if hasattr(result, "__aiter__"):
                    return _drain(result, context)
                return await result

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        # Streaming requests are not part of any chainfs service: refuse them.
        return _refuse_all(handler)


async def _drain(gen: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
    async for item in gen:
        await context.write(item)


def _refuse_all(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "streaming requests are refused")

    return grpc.unary_unary_rpc_method_handler(
        refuse, handler.request_deserializer, handler.response_serializer
    )
