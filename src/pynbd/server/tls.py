"""TLS for the server: x509 certificates in nbdkit's layout or given one by one."""

from __future__ import annotations

import os
import ssl


class TLSConfigError(ValueError):
    pass


def server_tls_context(certificates_dir: str | None = None, cert: str | None = None,
                       key: str | None = None, ca: str | None = None,
                       verify_peer: bool = False) -> ssl.SSLContext:
    """An SSLContext for NBD_OPT_STARTTLS.

    ``certificates_dir`` follows nbdkit: ``ca-cert.pem``, ``server-cert.pem``,
    ``server-key.pem``; explicit ``cert``/``key``/``ca`` override files from it.
    """
    if certificates_dir:
        if not os.path.isdir(certificates_dir):
            raise TLSConfigError(f"--tls-certificates {certificates_dir}: not a directory")
        cert = cert or os.path.join(certificates_dir, "server-cert.pem")
        key = key or os.path.join(certificates_dir, "server-key.pem")
        ca_default = os.path.join(certificates_dir, "ca-cert.pem")
        if ca is None and os.path.exists(ca_default):
            ca = ca_default
    if not cert or not key:
        raise TLSConfigError("TLS needs a certificate and key: use --tls-certificates DIR "
                             "or --tls-cert FILE --tls-key FILE")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from exc
    if verify_peer:
        if not ca:
            raise TLSConfigError("--tls-verify-peer needs a CA (--tls-ca or ca-cert.pem)")
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load TLS CA {ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
