"""asyncio driver for msgr2: client sessions (with transparent reconnect for lossless
sessions), a server, back-pressure, keepalive-based dead-peer detection and clean close.
The protocol itself is the sans-I/O core in :mod:`pynbd.msgr2`; this package only moves
its bytes and keeps its clock.

    session = await Msgr2Client.connect(host, port, auth=PskAuth(key), mode="secure")
    await session.send(0x7001, b"front", data)
    msg = await session.recv()

    server = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(key), handler=serve)

Modules: ``link`` (one TCP connection driving one core Connection), ``session`` (a
session's messages, keepalives and close, both roles), ``client``, ``server``.
"""

from pynbd.msgr2.aio.client import ClientSession, Msgr2Client
from pynbd.msgr2.aio.server import Handler, Msgr2Server, ServerSession
from pynbd.msgr2.aio.session import Msgr2Session, ReceivedMessage, SessionOptions

__all__ = ["ClientSession", "Handler", "Msgr2Client", "Msgr2Server", "Msgr2Session",
           "ReceivedMessage", "ServerSession", "SessionOptions"]
