"""TLS for NBD clients: STARTTLS with x509 (CA, client certificate and key, hostname
verification), configured from an :class:`NBDURI` or explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynbd.client.uri import NBDURI

if TYPE_CHECKING:  # imported when a context is made: ssl costs start-up time
    import ssl


@dataclass(frozen=True)
class TLSConfig:
    """How to establish TLS after NBD_OPT_STARTTLS.

    ``certificates`` is a directory in nbdkit/qemu layout (``ca-cert.pem``,
    ``client-cert.pem``, ``client-key.pem``; missing files are skipped). Explicit files
    override it. With no CA given the system trust store is used. ``hostname`` is what
    the server certificate must name (defaults to the URI host).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    certificates: str | None = None
    hostname: str | None = None
    verify_peer: bool = True

    @classmethod
    def from_uri(cls, uri: NBDURI) -> TLSConfig:
        return cls(ca_file=uri.tls_ca_file, cert_file=uri.tls_cert_file,
                   key_file=uri.tls_key_file, certificates=uri.tls_certificates,
                   hostname=uri.server_hostname, verify_peer=uri.tls_verify_peer)

    def files(self) -> tuple[str | None, str | None, str | None]:
        ca, cert, key = self.ca_file, self.cert_file, self.key_file
        if self.certificates:
            d = self.certificates

            def pick(name: str) -> str | None:
                path = os.path.join(d, name)
                return path if os.path.exists(path) else None

            ca = ca or pick("ca-cert.pem")
            cert = cert or pick("client-cert.pem")
            key = key or pick("client-key.pem")
        return ca, cert, key

    def context(self) -> ssl.SSLContext:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca, cert, key = self.files()
        if self.verify_peer:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = self.hostname is not None
            if ca:
                ctx.load_verify_locations(cafile=ca)
            else:
                ctx.load_default_certs()
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert:
            ctx.load_cert_chain(cert, key)
        return ctx

    @property
    def server_hostname(self) -> str | None:
        return self.hostname
