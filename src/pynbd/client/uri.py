"""NBD URIs (doc/uri.md in the NBD repository).

``nbd://host[:port]/export``, ``nbds://`` (TLS required), ``nbd+unix:///export?socket=PATH``
and ``nbds+unix://``. The export name is the path without its leading ``/``,
percent-decoded. TLS query parameters: ``tls-type`` (only ``x509`` is supported),
``tls-hostname``, ``tls-verify-peer`` (0/1), and the libnbd-compatible
``tls-certificates`` (a directory holding ``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``), plus ``x-tls-ca-file``, ``x-tls-cert-file``, ``x-tls-key-file``.
Unknown parameters are diagnosed (``x-`` ones are ignored).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, unquote, urlsplit

from pynbd.protocol.constants import NBD_DEFAULT_PORT

SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}

_KNOWN_PARAMS = {"socket", "tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates",
                 "x-tls-ca-file", "x-tls-cert-file", "x-tls-key-file", "tls-username"}


class URIError(ValueError):
    """The string is not a usable NBD URI."""


@dataclass(frozen=True)
class NBDURI:
    scheme: str
    export: str = ""
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket: str | None = None
    username: str | None = None
    tls_type: str | None = None
    tls_hostname: str | None = None
    tls_verify_peer: bool = True
    tls_certificates: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @property
    def tls(self) -> bool:
        return SCHEMES[self.scheme][0]

    @property
    def is_unix(self) -> bool:
        return SCHEMES[self.scheme][1]

    @property
    def server_hostname(self) -> str | None:
        """The name to verify the server's certificate against."""
        return self.tls_hostname or (None if self.is_unix else self.host)

    def __str__(self) -> str:
        return format_uri(self)


def parse_uri(text: str) -> NBDURI:
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise URIError(f"{text!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise URIError(f"{text!r}: unknown scheme {parts.scheme!r} "
                       f"(expected one of {', '.join(SCHEMES)})")
    path = parts.path
    if path and not path.startswith("/"):
        raise URIError(f"{text!r}: export path must start with '/'")
    export = unquote(path[1:], errors="strict") if path else ""
    if "\0" in export:
        raise URIError(f"{text!r}: export name contains NUL")
    params = _query(text, parts.query)
    kw: dict[str, object] = {"scheme": scheme, "export": export}
    if parts.username:
        kw["username"] = unquote(parts.username)
    kw.update(_where(text, parts, scheme, params))
    kw.update(_tls(text, params))
    return NBDURI(**kw)  # type: ignore[arg-type]


def _query(text: str, query: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in query.split("&") if query else ():
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = unquote(key)
        if not sep:
            raise URIError(f"{text!r}: query parameter {key!r} has no value")
        if key in params:
            raise URIError(f"{text!r}: query parameter {key!r} given twice")
        if key not in _KNOWN_PARAMS and not key.startswith("x-"):
            raise URIError(f"{text!r}: unknown query parameter {key!r}")
        params[key] = unquote(value)
    return params


def _where(text: str, parts: SplitResult, scheme: str,
           params: dict[str, str]) -> dict[str, object]:
    """The socket, or the host and port."""
    try:
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise URIError(f"{text!r}: {exc}") from exc
    if SCHEMES[scheme][1]:
        sock = params.get("socket")
        if not sock:
            raise URIError(f"{text!r}: {scheme} URIs need a socket= query parameter")
        if host or port:
            raise URIError(f"{text!r}: {scheme} URIs take no host or port")
        return {"socket": sock}
    if "socket" in params:
        raise URIError(f"{text!r}: socket= is only valid with nbd+unix/nbds+unix")
    if not host:
        raise URIError(f"{text!r}: missing host")
    return {"host": host, "port": port if port is not None else NBD_DEFAULT_PORT}


def _tls(text: str, params: dict[str, str]) -> dict[str, object]:
    """The ``tls-*`` parameters (a scheme without TLS ignores them)."""
    kw: dict[str, object] = {}
    tls_type = params.get("tls-type")
    if tls_type is not None:
        if tls_type not in ("anon", "x509", "psk"):
            raise URIError(f"{text!r}: unknown tls-type {tls_type!r}")
        if tls_type != "x509":
            raise URIError(f"{text!r}: tls-type={tls_type} is not supported (only x509)")
        kw["tls_type"] = tls_type
    if "tls-verify-peer" in params:
        v = params["tls-verify-peer"]
        if v not in ("0", "1"):
            raise URIError(f"{text!r}: tls-verify-peer must be 0 or 1")
        kw["tls_verify_peer"] = v == "1"
    for key, attr in (("tls-hostname", "tls_hostname"),
                      ("tls-certificates", "tls_certificates"),
                      ("x-tls-ca-file", "tls_ca_file"),
                      ("x-tls-cert-file", "tls_cert_file"),
                      ("x-tls-key-file", "tls_key_file")):
        if key in params:
            kw[attr] = params[key]
    return kw


def format_uri(uri: NBDURI) -> str:
    out = uri.scheme + "://"
    if uri.username:
        out += quote(uri.username, safe="") + "@"
    if not uri.is_unix and uri.host:
        host = uri.host
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        out += host
        if uri.port != NBD_DEFAULT_PORT:
            out += f":{uri.port}"
    out += "/" + quote(uri.export, safe="/")
    q = []
    if uri.socket:
        q.append("socket=" + quote(uri.socket, safe="/"))
    for key, val in (("tls-type", uri.tls_type), ("tls-hostname", uri.tls_hostname),
                     ("tls-certificates", uri.tls_certificates),
                     ("x-tls-ca-file", uri.tls_ca_file), ("x-tls-cert-file", uri.tls_cert_file),
                     ("x-tls-key-file", uri.tls_key_file)):
        if val:
            q.append(f"{key}={quote(val, safe='/')}")
    if not uri.tls_verify_peer:
        q.append("tls-verify-peer=0")
    if q:
        out += "?" + "&".join(q)
    return out


def is_uri(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES
