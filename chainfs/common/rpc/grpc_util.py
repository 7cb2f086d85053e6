"""gRPC helpers: errors across the wire, channels, servers.

Server side, handlers raise :class:`ChainfsError`; :func:`rpc_handler` turns it
into a gRPC status with the chainfs code in trailing metadata. Client side,
:func:`call` turns a failed call back into the same :class:`ChainfsError`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from chainfs.common import metrics, tls
from chainfs.common.auth.authenticator import Authenticator
from chainfs.common.auth.grpc_auth import AuthInterceptor, client_interceptors
from chainfs.common.errors import ChainfsError, Code
from chainfs.common.rpc.server_config import GrpcServerConfig
from chainfs.common.units import MiB
from chainfs.proto import common_pb2 as cpb

log = logging.getLogger(__name__)

CODE_KEY = "chainfs-code"
T = TypeVar("T")
S = TypeVar("S")  # a generated gRPC stub class

# Message size bound for control calls (bulk data goes over the data plane).
MAX_MESSAGE_BYTES = 64 * MiB

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

_GRPC_STATUS: dict[int, grpc.StatusCode] = {
    Code.ENOENT: grpc.StatusCode.NOT_FOUND,
    Code.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    Code.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    Code.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.BAD_CAPABILITY: grpc.StatusCode.PERMISSION_DENIED,
    Code.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    Code.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.ENOSYS: grpc.StatusCode.UNIMPLEMENTED,
    Code.EOPNOTSUPP: grpc.StatusCode.UNIMPLEMENTED,
    Code.ETIMEDOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.TXN_CONFLICT: grpc.StatusCode.ABORTED,
    Code.NOT_PRIMARY: grpc.StatusCode.UNAVAILABLE,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_status_for(code: int) -> grpc.StatusCode:
    return _GRPC_STATUS.get(code, grpc.StatusCode.FAILED_PRECONDITION)


GRPC_REQUESTS = metrics.RequestMetrics("chainfs_grpc_request", "gRPC request")


def rpc_handler(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate an async servicer method so ChainfsError becomes a gRPC status
    (and the call is timed in ``chainfs_grpc_request_seconds{op=<method>}``)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            with GRPC_REQUESTS.observe(op):
                return await fn(self, request, context)
        except ChainfsError as e:
            await _abort(context, e.code, e.message)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug: log it with its stack, answer INTERNAL
            log.exception("unhandled error in %s", fn.__qualname__)
            await _abort(context, Code.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    return wrapper


async def _abort(context: grpc.aio.ServicerContext, code: int, message: str) -> None:
    context.set_trailing_metadata(((CODE_KEY, str(int(code))),))
    await context.abort(grpc_status_for(code), message)


def error_from_rpc(e: grpc.aio.AioRpcError, target: str = "") -> ChainfsError:
    """The ChainfsError a failed call carried (or UNAVAILABLE/ETIMEDOUT/INTERNAL)."""
    md = e.trailing_metadata() or ()
    for key, value in md:
        if key == CODE_KEY:
            return ChainfsError(int(value), e.details() or "")
    where = f" ({target})" if target else ""
    status = e.code()
    if status == grpc.StatusCode.UNAVAILABLE:
        return ChainfsError(Code.UNAVAILABLE, f"cannot reach {target or 'server'}: {e.details()}")
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ChainfsError(Code.ETIMEDOUT, f"deadline exceeded{where}")
    if status == grpc.StatusCode.CANCELLED:
        return ChainfsError(Code.UNAVAILABLE, f"call cancelled{where}: {e.details()}")
    if status == grpc.StatusCode.UNIMPLEMENTED:
        return ChainfsError(Code.ENOSYS, f"not implemented{where}: {e.details()}")
    return ChainfsError(Code.INTERNAL, f"{status.name}{where}: {e.details()}")


async def call(
    method: Callable[..., Awaitable[T]], request: Any, timeout_s: float, target: str = ""
) -> T:
    """Invoke a stub method; failures raise ChainfsError."""
    try:
        return await method(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise error_from_rpc(e, target) from None


def channel(
    address: str,
    credential: cpb.Credential | None = None,
    options: list[tuple[str, Any]] | None = None,
    tls_config: tls.TlsConfig | None = None,
) -> grpc.aio.Channel:
    """A channel to ``address`` whose every call carries ``credential``; TLS
    when ``tls_config`` (default: tls.current()) is on."""
    opts = CHANNEL_OPTIONS if options is None else options
    cfg = tls.current() if tls_config is None else tls_config
    interceptors = client_interceptors(credential)
    if not cfg.enabled:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    ca, cert, key = cfg.read_files()
    creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)


class Stubs(Generic[S]):
    """A client's channels: one channel and stub per address, made on first
    use, all closed by :meth:`close` (after which ``get`` raises EBADF)."""

    def __init__(
        self,
        make_stub: Callable[[grpc.aio.Channel], S],
        owner: str,
        credential: cpb.Credential | None = None,
    ) -> None:
        self._make_stub = make_stub
        self._owner = owner
        self._credential = credential
        self._tls = tls.current()  # every channel of this client speaks alike
        self._by_address: dict[str, tuple[grpc.aio.Channel, S]] = {}
        self.closed = False

    def get(self, address: str) -> S:
        if self.closed:
            raise ChainfsError(Code.EBADF, f"{self._owner} is closed")
        entry = self._by_address.get(address)
        if entry is None:
            ch = channel(address, self._credential, tls_config=self._tls)
            entry = (ch, self._make_stub(ch))
            self._by_address[address] = entry
        return entry[1]

    async def close(self) -> None:
        self.closed = True
        channels, self._by_address = self._by_address, {}
        for ch, _ in channels.values():
            await ch.close()


# Servers accept the clients' keepalive pings (every keepalive_time_ms above);
# gRPC's default minimum of 5 minutes answers them with GOAWAY too_many_pings.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A port another process listens on must fail to bind, not be shared.
    ("grpc.so_reuseport", 0),
]


def server(
    config: GrpcServerConfig | None = None, auth: Authenticator | None = None
) -> grpc.aio.Server:
    """A gRPC server bounded by ``config`` (concurrency, handshake, idle, keepalive);
    with ``auth``, every call is checked against the access policy
    (chainfs.common.auth.policy) before its handler runs."""
    cfg = config if config is not None else GrpcServerConfig()
    cfg.validate()
    options = [
        *SERVER_OPTIONS,
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams_per_connection),
        ("grpc.server_handshake_timeout_ms", cfg.handshake_timeout_ms),
        ("grpc.max_connection_idle_ms", cfg.max_connection_idle_ms),
    ]
    # The server's own pings replace the clients' keepalive settings above.
    options = [(k, v) for k, v in options if k not in _SERVER_KEEPALIVE]
    options += [
        ("grpc.keepalive_time_ms", cfg.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", cfg.keepalive_timeout_ms),
    ]
    interceptors = [AuthInterceptor(auth, _abort)] if auth is not None else []
    return grpc.aio.server(
        options=options,
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
        interceptors=interceptors,
    )


_SERVER_KEEPALIVE = ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms")


def bind(
    srv: grpc.aio.Server, host: str, port: int, tls_config: tls.TlsConfig | None = None
) -> int:
    """Bind ``host:port`` (0 = ephemeral); returns the port actually bound.

    With TLS on (``tls_config``, default tls.current()) the port requires a
    client certificate signed by the cluster CA (mutual TLS)."""
    cfg = tls.current() if tls_config is None else tls_config
    try:
        if cfg.enabled:
            bound = srv.add_secure_port(f"{host}:{port}", server_credentials(cfg))
        else:
            bound = srv.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc: the port is taken (no SO_REUSEPORT sharing)
        raise ChainfsError(
            Code.EADDRINUSE, f"cannot listen on {host}:{port}: address in use"
        ) from None
    if bound == 0:
        raise ChainfsError(Code.EINVAL, f"cannot listen on {host}:{port}")
    return bound


def server_credentials(cfg: tls.TlsConfig) -> grpc.ServerCredentials:
    """Our certificate; clients must present one the CA signed."""
    ca, cert, key = cfg.read_files()
    if cert is None or key is None:
        raise ChainfsError(Code.EINVAL, "TLS server needs tls.cert_file and tls.key_file")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
