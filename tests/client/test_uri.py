"""NBD URI parsing per doc/uri.md."""

from __future__ import annotations

import pytest

from pynbd.client import URIError, format_uri, parse_uri


@pytest.mark.parametrize("uri,export", [
    ("nbd://example.com/disk", "disk"),
    ("nbd+unix:///disk?socket=sock", "disk"),
    ("nbd://example.com/", ""),
    ("nbd://example.com", ""),
    ("nbd://example.com//disk", "/disk"),
    ("nbd://example.com/hello%20world", "hello world"),
    ("nbd://example.com/caf%C3%A9", "café"),
])
def test_export_names_from_spec(uri: str, export: str) -> None:
    assert parse_uri(uri).export == export


def test_tcp_defaults_and_ipv6() -> None:
    u = parse_uri("nbd://example.com/x")
    assert (u.host, u.port, u.tls, u.is_unix) == ("example.com", 10809, False, False)
    u = parse_uri("nbds://[::1]:10810/x")
    assert (u.host, u.port, u.tls) == ("::1", 10810, True)
    assert u.server_hostname == "::1"
    assert format_uri(u) == "nbds://[::1]:10810/x"


def test_unix_and_tls_params() -> None:
    u = parse_uri("nbds+unix:///e?socket=/run/nbd.sock&tls-hostname=srv.example"
                  "&tls-verify-peer=0&tls-certificates=/etc/pki&tls-type=x509")
    assert u.is_unix and u.tls and u.socket == "/run/nbd.sock"
    assert u.server_hostname == "srv.example"
    assert not u.tls_verify_peer and u.tls_certificates == "/etc/pki" and u.tls_type == "x509"
    assert parse_uri(format_uri(u)) == u
    abstract = parse_uri("nbd+unix:///?socket=%00/abstract")
    assert abstract.socket == "\0/abstract"
    u = parse_uri("nbd://user@host/e?x-experimental=1")
    assert u.username == "user"


@pytest.mark.parametrize("bad", [
    "http://example.com/",
    "nbd+unix:///disk",  # no socket=
    "nbd+unix://host/disk?socket=s",  # authority on unix
    "nbd://host/?socket=/x",  # socket on tcp
    "nbd:///disk",  # no host
    "nbd://host/?unknown=1",
    "nbd://host/?tls-verify-peer=yes",
    "nbds://host/?tls-type=psk",  # not supported
    "nbd://host:notaport/",
    "nbd://host/a%00b",
    "nbd://host/?socket",
])
def test_invalid(bad: str) -> None:
    with pytest.raises(URIError):
        parse_uri(bad)
