"""TLS material for a cluster: a CA and one certificate per process, as PEM files.

``init_tls_dir(DIR, nodes=["mgmtd", "meta", "storage0"], clients=["admin"])``
writes (reusing ``ca.key``/``ca.crt`` when DIR already has them)::

    DIR/ca.crt  ca.key            the cluster CA (its key 0600: keep it off the nodes)
    DIR/<node>.crt  <node>.key    server + client certificate of one node process
    DIR/<client>.crt  <client>.key  client-only certificate (admin tools, users)

Node certificates name every address the node may be reached at: 127.0.0.1,
::1, localhost, this host's name and addresses, plus ``extra_sans`` (names or
IP addresses, for nodes reached through other names). Keys are ECDSA P-256,
written 0600. Needs the ``cryptography`` package (the ``server`` extra).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from chainfs.common.errors import ChainfsError, Code
from chainfs.common.tls import TlsConfig

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as e:  # the server extra is not installed
    raise ImportError(
        f"TLS material needs the cryptography package (pip install 'chainfs[server]'): {e}"
    ) from e

CA_NAME = "ca"
DEFAULT_VALID_DAYS = 825  # the longest validity clients commonly accept for a leaf
CA_VALID_DAYS = 3650

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def init_tls_dir(
    directory: str | Path,
    nodes: Sequence[str] = (),
    clients: Sequence[str] = (),
    extra_sans: Sequence[str] = (),
    valid_days: int = DEFAULT_VALID_DAYS,
) -> dict[str, TlsConfig]:
    """Write the CA (if absent) and a certificate per name; name -> its TlsConfig."""
    for name in [*nodes, *clients]:
        if not name or "/" in name or name.startswith(".") or name == CA_NAME:
            raise ChainfsError(Code.EINVAL, f"bad certificate name {name!r}")
    if valid_days <= 0:
        raise ChainfsError(Code.EINVAL, f"valid_days must be > 0, not {valid_days}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _load_or_make_ca(d)
    dns, ips = host_names(extra_sans)
    out: dict[str, TlsConfig] = {}
    for name, is_node in [*((n, True) for n in nodes), *((c, False) for c in clients)]:
        key = _new_key()
        cert = _issue(ca_key, ca_cert, key, name, is_node, dns, ips, valid_days)
        _write_key(d / f"{name}.key", key)
        _write_cert(d / f"{name}.crt", cert)
        out[name] = TlsConfig(
            ca_file=str(d / f"{CA_NAME}.crt"),
            cert_file=str(d / f"{name}.crt"),
            key_file=str(d / f"{name}.key"),
        )
    return out


def host_names(extra: Iterable[str] = ()) -> tuple[list[str], list[IpAddress]]:
    """DNS names and IP addresses this host answers to (loopback included)."""
    dns = ["localhost"]
    ips: list[IpAddress] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    for name in {socket.gethostname(), socket.getfqdn()}:
        if name and name not in dns:
            dns.append(name)
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:  # a host name that does not resolve: its names still count
            continue
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if ip not in ips:
                ips.append(ip)
    for item in extra:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            if item not in dns:
                dns.append(item)
            continue
        if ip not in ips:
            ips.append(ip)
    return dns, ips


def _new_key() -> ec.EllipticCurvePrivateKey:

    return ec.generate_private_key(ec.SECP256R1())


def _load_or_make_ca(d: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:

    key_path, cert_path = d / f"{CA_NAME}.key", d / f"{CA_NAME}.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ChainfsError(Code.EINVAL, f"{key_path}: not an EC private key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = _new_key()
    cert = _build_ca(key)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return key, cert


def _subject(cn: str) -> x509.Name:

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chainfs"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _build_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:

    now = datetime.datetime.now(datetime.UTC)
    name = _subject("chainfs cluster CA")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _ca_usage() -> x509.KeyUsage:

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    is_node: bool,
    dns: list[str],
    ips: list[IpAddress],
    valid_days: int,
) -> x509.Certificate:
    """A leaf certificate: nodes serve and connect, clients only connect."""

    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if is_node:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if is_node:
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ip) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file was there with wider bits
        os.write(fd, pem)
    finally:
        os.close(fd)


def _write_cert(path: Path, cert: x509.Certificate) -> None:

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)
