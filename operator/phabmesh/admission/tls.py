"""The webhook's TLS: a CA and a serving certificate kept in a Secret, and the caBundle.

The API server calls admission webhooks over HTTPS only, and checks the serving
certificate against the ``caBundle`` of the MutatingWebhookConfiguration. phabmesh
manages both itself, so installing needs no cert-manager:

- the Secret ``phabmesh-webhook-tls`` (in phabmesh's namespace) holds a CA (ten
  years) and a serving certificate it signed (one year, for the webhook Service's
  DNS names and 127.0.0.1). The first replica to start creates it; the others read
  it (the Secret's resourceVersion settles races, as for the signing keys). A
  serving certificate with less than 30 days left is re-issued by the same CA, so
  the caBundle does not change and replicas serving the old or the new certificate
  are both trusted.
- every replica keeps the ``caBundle`` of phabmesh's webhooks in the
  MutatingWebhookConfiguration equal to that CA, and checks again every minute (a
  re-applied manifest without a caBundle is repaired within a minute).

Deleting the Secret makes a fresh CA; until every replica has picked it up (within
a minute) some injections may be skipped, as with phabmesh down (the failure
policy is Ignore).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import kopf
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from phabmesh import metrics
from phabmesh.kube import Conflict, KubeClient, KubeError, NotFound
from phabmesh.kube.client import JSON, resource_path

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime.datetime]
CA_LIFETIME = datetime.timedelta(days=3650)
CERT_LIFETIME = datetime.timedelta(days=365)
RENEW_BEFORE = datetime.timedelta(days=30)
CHECK_EVERY = 60.0  # seconds between checks of the Secret and the caBundle
WEBHOOK_SUFFIX = ".phabmesh.io"  # phabmesh's webhooks in the configuration end with this


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


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
    now = now or _utcnow()
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


class WebhookServer(kopf.WebhookServer):
    """kopf's webhook server, serving with :class:`WebhookTLS`'s context as it is.

    kopf either loads certificate files (and restarts when they change) or makes a
    self-signed certificate; phabmesh's certificate lives in a Secret and is reloaded
    into the same context in place, so the key never touches a mounted file.
    """

    def _build_ssl(self) -> tuple[bytes | None, ssl.SSLContext | None]:
        return self.cadata, self.context


class WebhookTLS:
    """Keeps the Secret, the serving context and the caBundle in step (see the module)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        secret_name: str,
        configuration: str,
        names: Sequence[str],
        *,
        clock: Clock = _utcnow,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.secret_name = secret_name
        self.configuration = configuration
        self.names = list(names)
        self.clock = clock
        self.material: Material | None = None
        self.context: ssl.SSLContext | None = None

    @property
    def secret_path(self) -> str:
        return resource_path("", "v1", "secrets", self.namespace, self.secret_name)

    def _wanted(self, material: Material | None) -> bool:
        """Is ``material`` good to serve with (names covered, not close to expiry)?"""
        if material is None:
            return False
        try:
            return (
                set(self.names) <= material.names()
                and material.not_after - self.clock() > RENEW_BEFORE
            )
        except ValueError:
            return False

    async def ensure(self) -> Material:
        """Read the Secret; create it, or re-issue its serving certificate, when needed."""
        for _ in range(5):
            try:
                secret: JSON | None = await self.client.get(self.secret_path)
            except NotFound:
                secret = None
            current = Material.from_secret(secret) if secret else None
            if current is not None and self._wanted(current):
                return current
            ca = (current.ca_cert, current.ca_key) if current else None
            fresh = issue(self.names, ca=ca, now=self.clock())
            body: JSON = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": self.secret_name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/part-of": "phabmesh"},
                },
                "data": fresh.to_secret_data(),
            }
            try:
                if secret is None:
                    await self.client.create(
                        resource_path("", "v1", "secrets", self.namespace), body
                    )
                else:
                    body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
                    await self.client.request("PUT", self.secret_path, body=body)
            except Conflict:
                continue  # another replica got there first: read what it wrote
            log.info("webhook_certificate_issued", not_after=fresh.not_after.isoformat())
            return fresh
        raise RuntimeError(f"could not settle Secret {self.namespace}/{self.secret_name}")

    async def refresh(self) -> bool:
        """Bring the serving context and the caBundle up to date; True if anything changed."""
        material = await self.ensure()
        changed = material != self.material
        if changed:
            if self.context is None:
                self.context = server_context(material)
            else:
                load_into(self.context, material)
            self.material = material
            metrics.current().webhook_certificate_expires(material.not_after)
        await self.inject_ca_bundle(material.ca_cert)
        return changed

    async def inject_ca_bundle(self, ca_pem: bytes) -> bool:
        """Set the caBundle of phabmesh's webhooks; False when there is no configuration."""
        path = resource_path(
            "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
            None, self.configuration,
        )  # fmt: skip
        bundle = base64.b64encode(ca_pem).decode()
        try:
            config = await self.client.get(path)
        except NotFound:
            log.warning("webhook_configuration_missing", name=self.configuration)
            return False
        webhooks: list[dict[str, Any]] = config.get("webhooks") or []
        stale = [
            w
            for w in webhooks
            if str(w.get("name", "")).endswith(WEBHOOK_SUFFIX)
            and (w.get("clientConfig") or {}).get("caBundle") != bundle
        ]
        if not stale:
            return True
        for webhook in stale:
            webhook.setdefault("clientConfig", {})["caBundle"] = bundle
        try:
            await self.client.request("PUT", path, body=config)
        except Conflict:
            return False  # changed meanwhile: the next check sets it
        log.info("webhook_ca_bundle_set", name=self.configuration, webhooks=len(stale))
        return True

    async def run(self, every: float = CHECK_EVERY) -> None:
        """Check every ``every`` seconds until cancelled; errors are logged and retried."""
        while True:
            await asyncio.sleep(every)
            try:
                if await self.refresh():
                    log.info("webhook_certificate_reloaded")
            except (KubeError, RuntimeError, ValueError) as exc:
                log.warning("webhook_tls_check_failed", error=str(exc))
