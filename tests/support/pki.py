"""A throw-away PKI for TLS tests, made with the ``cryptography`` package.

:func:`make_pki` writes PEM files: a test CA, a second unrelated CA ("wrong CA"), a
server certificate for ``localhost``/``127.0.0.1`` signed by the CA, the same server
name with an expired certificate, and a client certificate signed by the CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The files of one test PKI."""

    ca: Path
    other_ca: Path
    server: Pair
    expired_server: Pair
    client: Pair
    other_client: Pair
    """A client certificate signed by the other CA (not trusted by our CA)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(folder: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key, _write_cert(cert, folder / f"{name}.pem")


def _leaf(
    folder: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path],
    *,
    server: bool,
    expired: bool = False,
) -> Pair:
    ca_cert, ca_key, _ = ca
    key = _key()
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=10), now - dt.timedelta(days=3))
        if expired
        else (now - dt.timedelta(days=1), now + dt.timedelta(days=2))
    )
    # DICOM nodes are TLS clients and servers with one certificate (Orthanc uses its own for
    # both): every leaf may do both, the "server" ones list server use first.
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = both if server else both[::-1]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Pair(
        certificate=_write_cert(cert, folder / f"{name}.pem"),
        key=_write_key(key, folder / f"{name}.key"),
    )


def make_pki(folder: Path) -> Pki:
    """Write a fresh test PKI into ``folder``.

    Parameters
    ----------
    folder
        An empty temporary folder.

    Returns
    -------
    Pki
        Paths of the CA, the other CA and the leaf pairs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    other = _ca(folder, "other-ca")
    return Pki(
        ca=ca[2],
        other_ca=other[2],
        server=_leaf(folder, "server", ca, server=True),
        expired_server=_leaf(folder, "expired-server", ca, server=True, expired=True),
        client=_leaf(folder, "client", ca, server=False),
        other_client=_leaf(folder, "other-client", other, server=False),
    )
