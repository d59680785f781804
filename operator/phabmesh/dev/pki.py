"""The local control plane's certificates, keys and kubeconfigs (a CA of its own)."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server_names: Sequence[str] = (),
    client: bool = False,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        alt: list[x509.GeneralName] = []
        for name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclasses.dataclass(frozen=True)
class Pki:
    """The certificates and keys of one control plane, as files in ``root``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.root / f"{name}.crt", self.root / f"{name}.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "service-account.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "service-account.pub"

    @classmethod
    def create(cls, root: Path, node: tuple[str, str] | None = None) -> Pki:
        """A new CA and the control plane's leaves in ``root``. With ``node`` (its name and
        address), also a real kubelet's and kube-proxy's leaves and the API server's client
        certificate for kubelets."""
        root.mkdir(parents=True, exist_ok=True)
        pki = cls(root)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("phabmesh-dev-cluster-ca")
        ca = _cert(ca_name, ca_key, None, ca=True)
        pki._write(pki.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
        pki._write(pki.ca_key, _pem_key(ca_key))
        leaves = {
            "apiserver": dict(
                subject=_name("kube-apiserver"),
                server_names=[
                    "127.0.0.1",
                    "10.96.0.1",  # the kubernetes Service's ClusterIP, as pods reach it
                    "::1",
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
            ),
            "admin": dict(subject=_name("phabmesh-admin", "system:masters"), client=True),
            "controller-manager": dict(
                subject=_name("system:kube-controller-manager"), client=True
            ),
            "scheduler": dict(subject=_name("system:kube-scheduler"), client=True),
            # KWOK stands in for every kubelet at once: it acts on any node and any pod.
            "kwok": dict(subject=_name("kwok-controller", "system:masters"), client=True),
        }
        if node is not None:
            name, address = node
            leaves |= {
                # the API server to kubelets (logs, exec, port-forward)
                "apiserver-kubelet-client": dict(
                    subject=_name("kube-apiserver-kubelet-client", "system:masters"), client=True
                ),
                "kubelet-client": dict(
                    subject=_name(f"system:node:{name}", "system:nodes"), client=True
                ),
                "kubelet-serving": dict(
                    subject=_name(f"system:node:{name}", "system:nodes"),
                    server_names=[address, name],
                ),
                "kube-proxy": dict(subject=_name("system:kube-proxy"), client=True),
            }
        for leaf, opts in leaves.items():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(
                opts["subject"],  # type: ignore[arg-type]
                key,
                (ca_name, ca_key),
                server_names=opts.get("server_names", ()),  # type: ignore[arg-type]
                client=bool(opts.get("client", False)),
            )
            crt, keyfile = pki.pair(leaf)
            pki._write(crt, cert.public_bytes(serialization.Encoding.PEM))
            pki._write(keyfile, _pem_key(key))
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pki._write(pki.sa_key, _pem_key(sa))
        pki._write(
            pki.sa_pub,
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        return pki

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.write_bytes(data)
        path.chmod(0o600)

    def kubeconfig(self, server: str, user: str) -> dict[str, object]:
        crt, key = self.pair(user)

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "phabmesh-dev",
                    "cluster": {"server": server, "certificate-authority-data": b64(self.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(crt),
                        "client-key-data": b64(key),
                    },
                }
            ],
            "contexts": [
                {"name": "phabmesh-dev", "context": {"cluster": "phabmesh-dev", "user": user}}
            ],
            "current-context": "phabmesh-dev",
        }
