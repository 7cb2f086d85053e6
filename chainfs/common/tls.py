"""TLS settings of one process, and the ssl contexts made from them.

TLS is on when ``ca_file`` is set: every TCP connection the process makes or
accepts (gRPC and the framed data plane) is then TLS, and peers are verified
against that CA. Who presents a certificate:

* nodes (mgmtd, meta, storage) present their node certificate on both ends;
* gRPC servers require a client certificate signed by the CA (mutual TLS):
  gRPC carries node-to-node calls and the admin tools, so operators hold a
  certificate too;
* framed data-plane servers verify a client certificate when one is
  presented and accept clients without one (user clients of the library
  authenticate the server only; their identity is the token's job).

Unix-socket connections stay plain: both ends are on one host and the
socket file's permissions decide who may connect.

Where a process finds its settings (:func:`current`): a ``using(cfg)``
block, else the process's own (a service's ``[tls]`` section, set with
:func:`configure_process`), else the ``CHAINFS_TLS_CA`` / ``CHAINFS_TLS_CERT``
/ ``CHAINFS_TLS_KEY`` environment variables, else TLS is off.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from chainfs.common.errors import ChainfsError, Code

CA_FILE_ENV = "CHAINFS_TLS_CA"
CERT_FILE_ENV = "CHAINFS_TLS_CERT"
KEY_FILE_ENV = "CHAINFS_TLS_KEY"


@dataclass
class TlsConfig:
    # PEM file of the cluster's CA certificate. Empty = TLS off (plain TCP).
    ca_file: str = ""
    # PEM certificate and private key this process presents. Nodes and admin
    # tools: required. User clients of the data plane may leave both empty.
    cert_file: str = ""
    key_file: str = ""
    # A connection whose TLS handshake does not finish within this is dropped.
    handshake_timeout_ms: int = 5_000

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file)

    @property
    def has_identity(self) -> bool:
        return bool(self.cert_file)

    def validate(self) -> None:
        if self.handshake_timeout_ms <= 0:
            raise ValueError("tls.handshake_timeout_ms must be > 0")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.cert_file and not self.ca_file:
            raise ValueError("tls.cert_file needs tls.ca_file (TLS is off without a CA)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"tls.{name}: no such file {path!r}")

    def read_files(self) -> tuple[bytes, bytes | None, bytes | None]:
        """(CA, certificate, key) PEM bytes; the last two None without an identity."""
        try:
            ca = _read(self.ca_file)
            if not self.has_identity:
                return ca, None, None
            return ca, _read(self.cert_file), _read(self.key_file)
        except OSError as e:
            raise ChainfsError(Code.EINVAL, f"TLS: cannot read {e.filename}: {e.strerror}") from e

    def server_context(self) -> ssl.SSLContext:
        """For accepting framed connections: our certificate; clients' verified if sent."""
        if not self.has_identity:
            raise ChainfsError(Code.EINVAL, "TLS server needs tls.cert_file and tls.key_file")
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For connecting: the server must hold a CA-signed certificate naming its address."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(purpose, cafile=self.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.has_identity:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as e:
            raise ChainfsError(Code.EINVAL, f"TLS: cannot load {self._files()}: {e}") from e
        return ctx

    def _files(self) -> str:
        return ", ".join(p for p in (self.ca_file, self.cert_file, self.key_file) if p)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


OFF = TlsConfig()

_scoped: contextvars.ContextVar[TlsConfig | None] = contextvars.ContextVar(
    "chainfs_tls", default=None
)
_process: TlsConfig | None = None


def from_env() -> TlsConfig:
    """The settings the ``CHAINFS_TLS_*`` environment variables name (OFF when unset);
    EINVAL when they do not fit together (a certificate without a CA turns nothing on)."""
    cfg = TlsConfig(
        ca_file=os.environ.get(CA_FILE_ENV, ""),
        cert_file=os.environ.get(CERT_FILE_ENV, ""),
        key_file=os.environ.get(KEY_FILE_ENV, ""),
    )
    try:
        cfg.validate()
    except ValueError as e:
        names = f"{CA_FILE_ENV}, {CERT_FILE_ENV}, {KEY_FILE_ENV}"
        raise ChainfsError(Code.EINVAL, f"TLS environment ({names}): {e}") from None
    return cfg


def configure_process(cfg: TlsConfig) -> None:
    """Make ``cfg`` this process's settings (a service calls it with its ``[tls]``)."""
    global _process
    cfg.validate()
    _process = cfg


def current() -> TlsConfig:
    """The settings in force here: see the module docstring for the order."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process is not None:
        return _process
    return from_env()


@contextlib.contextmanager
def using(cfg: TlsConfig) -> Iterator[None]:
    """Run a block (and the tasks it starts) under ``cfg`` instead of the process's settings."""
    token = _scoped.set(cfg)
    try:
        yield
    finally:
        _scoped.reset(token)


def describe_failure(e: BaseException, peer: str) -> ChainfsError:
    """A handshake failure as the error a caller sees: EACCES when the peer's
    certificate did not verify against our CA (retrying elsewhere will not
    help), UNAVAILABLE otherwise (the peer hung up: maybe it does not speak TLS)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return ChainfsError(
            Code.EACCES,
            f"TLS: certificate of {peer} not trusted ({e.verify_message}); "
            f"is {CA_FILE_ENV} / tls.ca_file the cluster's CA?",
        )
    return ChainfsError(Code.UNAVAILABLE, f"TLS handshake with {peer} failed: {e}")
