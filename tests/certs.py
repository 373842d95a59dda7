"""Throwaway certificates for the TLS tests, made with ``cryptography`` (the ``[test]`` extra).

:func:`make_pki` writes, into a directory, a CA, a server certificate for
``127.0.0.1``/``localhost`` signed by it, a client certificate signed by it,
and a client certificate of another CA (one the server does not trust), each
as PEM; the private keys are mode 0600. :func:`client_context` builds a
client's ``ssl`` context from them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files :func:`make_pki` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: a client certificate signed by a CA the server does not know
    stranger_cert: Path
    stranger_key: Path
    #: a second server certificate of the same CA (a rotation)
    rotated_cert: Path
    rotated_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> Path:
    """``key`` as PEM at ``path`` (mode 0600), encrypted with ``password`` if given."""
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    os.chmod(path, 0o600)
    return path


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_pki(directory: Path) -> Pki:
    """Write the certificates and keys of :class:`Pki` into ``directory``."""
    ca_key, stranger_ca_key = new_key(), new_key()
    ca = _certificate("mproxy test CA", ca_key, "mproxy test CA", ca_key, ca=True)
    _write_cert(directory / "ca.pem", ca)

    def leaf(name: str, issuer: str, issuer_key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        key = new_key()
        cert = _certificate(name, key, issuer, issuer_key, ca=False)
        return _write_cert(directory / f"{name}.pem", cert), write_key(directory / f"{name}.key", key)

    server = leaf("server", "mproxy test CA", ca_key)
    client = leaf("client", "mproxy test CA", ca_key)
    stranger = leaf("stranger", "another CA", stranger_ca_key)
    rotated = leaf("rotated", "mproxy test CA", ca_key)
    return Pki(directory / "ca.pem", *server, *client, *stranger, *rotated)


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, showing ``cert``/``key`` if given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def peer_serial(sock: ssl.SSLSocket) -> int:
    """The serial number of the certificate the server showed."""
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
