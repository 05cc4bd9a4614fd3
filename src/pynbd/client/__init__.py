"""pynbd's NBD client: blocking (:mod:`.blocking`), asyncio (:mod:`.aio`), multi-connection
pool (:mod:`.pool`), URIs (:mod:`.uri`) and TLS (:mod:`.tls`).

Both drivers are thin: what a client decides (options, request checks, reply routing,
how a connection ends) is one sans-I/O session (:mod:`.session`, with its plans in
:mod:`.plans` and its rules in :mod:`.rules`).

``pynbd.client.connect(uri)`` dials, negotiates extended headers (else structured
replies), ``base:allocation`` and safe close where offered, and enters the transmission
phase; the method ``Client.handshake()`` is only the greeting (its old name,
``Client.connect()``, still works and warns).
"""

from pynbd.client._common import Chunk, CloseResult, Extent
from pynbd.client.blocking import Client, ReadSink, Request, connect, dial
from pynbd.client.tls import TLSConfig
from pynbd.client.uri import NBDURI, URIError, format_uri, parse_uri
from pynbd.protocol.client import ExportEntry, ExportInfo, MetaContext
from pynbd.protocol.constants import CmdFlag, TransmissionFlag
from pynbd.protocol.errors import (
    LocalProtocolError,
    NBDRequestError,
    OptionError,
    PeerProtocolError,
    ProtocolError,
)

__all__ = [
    "NBDURI",
    "Chunk",
    "Client",
    "CloseResult",
    "CmdFlag",
    "ExportEntry",
    "ExportInfo",
    "Extent",
    "LocalProtocolError",
    "MetaContext",
    "NBDRequestError",
    "OptionError",
    "PeerProtocolError",
    "ProtocolError",
    "ReadSink",
    "Request",
    "TLSConfig",
    "TransmissionFlag",
    "URIError",
    "connect",
    "dial",
    "format_uri",
    "parse_uri",
]
