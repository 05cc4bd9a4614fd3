"""Test PKI: a CA, a server certificate (localhost, 127.0.0.1, ::1) and a client
certificate, written in the nbdkit/qemu directory layout (ca-cert.pem,
server-cert.pem, server-key.pem, client-cert.pem, client-key.pem)."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pynbd tests")])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def make_pki(directory: str | os.PathLike[str], *, server_names: tuple[str, ...] = (
        "localhost",), server_ips: tuple[str, ...] = ("127.0.0.1", "::1"),
        ca_name: str = "pynbd test CA") -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(prefix: str, cn: str, usage: x509.ObjectIdentifier,
             san: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                          content_commitment=False, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=False,
                                          crl_sign=False, encipher_only=False,
                                          decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        (d / f"{prefix}-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{prefix}-key.pem", key)

    san: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    san += [x509.IPAddress(ipaddress.ip_address(i)) for i in server_ips]
    leaf("server", server_names[0] if server_names else "server",
         ExtendedKeyUsageOID.SERVER_AUTH, san)
    leaf("client", "pynbd-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return d
