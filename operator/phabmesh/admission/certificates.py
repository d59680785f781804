"""The webhook's certificates, as values: a CA, a serving certificate it signs, and the
TLS context that serves them. No I/O beyond a private temporary file for ``ssl``;
:mod:`phabmesh.admission.tls` keeps them in a Secret and in the webhook configuration.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phabmesh.clock import utcnow
from phabmesh.kube.client import JSON

CA_LIFETIME = datetime.timedelta(days=3650)
CERT_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclasses.dataclass(frozen=True)
class Material:
    """PEM bytes: the CA certificate and key, the serving certificate and key."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    @property
    def not_after(self) -> datetime.datetime:
        return x509.load_pem_x509_certificate(self.cert).not_valid_after_utc

    def names(self) -> set[str]:
        cert = x509.load_pem_x509_certificate(self.cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | {
            str(ip) for ip in sans.get_values_for_type(x509.IPAddress)
        }

    def to_secret_data(self) -> dict[str, str]:
        return {
            "ca.crt": base64.b64encode(self.ca_cert).decode(),
            "ca.key": base64.b64encode(self.ca_key).decode(),
            "tls.crt": base64.b64encode(self.cert).decode(),
            "tls.key": base64.b64encode(self.key).decode(),
        }

    @classmethod
    def from_secret(cls, secret: JSON) -> Material | None:
        data = secret.get("data") or {}
        try:
            return cls(
                ca_cert=base64.b64decode(data["ca.crt"]),
                ca_key=base64.b64decode(data["ca.key"]),
                cert=base64.b64decode(data["tls.crt"]),
                key=base64.b64decode(data["tls.key"]),
            )
        except (KeyError, ValueError):
            return None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_ca(now: datetime.datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phabmesh webhook CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue(
    names: Sequence[str],
    *,
    ca: tuple[bytes, bytes] | None = None,
    now: datetime.datetime | None = None,
) -> Material:
    """A serving certificate for ``names`` (DNS names or IP addresses), signed by ``ca``
    (certificate and key PEM) or by a new CA."""
    now = now or utcnow()
    ca_cert_pem, ca_key_pem = ca or _new_ca(now)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + CERT_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Material(
        ca_cert=ca_cert_pem,
        ca_key=ca_key_pem,
        cert=cert.public_bytes(serialization.Encoding.PEM),
        key=_key_pem(key),
    )


def service_names(service: str, namespace: str) -> list[str]:
    """The names the API server may call the webhook Service by, and loopback."""
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
        "127.0.0.1",
    ]


def load_into(context: ssl.SSLContext, material: Material) -> None:
    """Load the serving certificate and key into ``context`` (new handshakes use them).

    ``ssl`` reads keys from files only: the key goes through a private temporary
    file that is removed at once.
    """
    fd, path = tempfile.mkstemp(prefix="phabmesh-webhook-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(material.cert + material.key)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)


def server_context(material: Material) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_into(context, material)
    return context
