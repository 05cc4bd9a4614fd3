"""Zero-copy forwarding for the blocking client: a read whose payload goes to a
:class:`~pynbd.client._common.ReadSink` while still in the socket, and a write whose
payload the kernel takes from a descriptor (``splice(2)``, ``sendfile(2)``), so that
data copied between two connections never enters Python."""

from __future__ import annotations

import socket

from pynbd.client._common import ReadSink, Request
from pynbd.client._splice import Mover
from pynbd.client.session import ClientSession
from pynbd.protocol.client import ReadData
from pynbd.protocol.constants import Cmd

_MSG_MORE = getattr(socket, "MSG_MORE", 0)


class Forwarding(ClientSession):
    """The blocking client's forwarding calls (a part of :class:`Client`)."""

    _sock: socket.socket
    _mover: Mover | None

    def _recv_exact(self, view: memoryview) -> None:
        raise NotImplementedError

    def submit_write_from(self, offset: int, length: int, fd: int,
                          head: bytes | bytearray | memoryview = b"", flags: int = 0, *,
                          fd_offset: int | None = None) -> Request:
        """Queue a WRITE of ``length`` bytes whose payload is ``head`` followed by
        ``length - len(head)`` bytes taken from the descriptor ``fd``: from its current
        position (a socket or pipe, e.g. the socket handed to a :class:`ReadSink`), or
        with ``fd_offset`` from that offset of a regular file.

        The kernel moves the bytes (``splice(2)`` through a pipe for sockets,
        ``sendfile(2)`` for files) without copying them through Python; where it cannot
        (TLS on this connection, another OS) they are read into a buffer and sent.
        Blocks until the whole payload is sent (waits on ``fd`` are bounded by this
        connection's timeout). If taking the payload fails midway the connection is
        unusable afterwards (the server got a partial request)."""
        hv = memoryview(head).cast("B")
        if len(hv) > length:
            raise ValueError("head is longer than the write")
        req, header = self._start(Cmd.WRITE, offset, length, flags)
        rest = length - len(hv)
        try:
            sock = self._sock
            if self._tls:
                sock.sendall(header)
                if hv:
                    sock.sendall(hv)
            else:
                self._send_head(header, hv, _MSG_MORE if rest else 0)
            if rest:
                mover = self._mover
                if mover is None:
                    mover = self._mover = Mover()
                if self._tls:
                    mover.splice_ok = mover.sendfile_ok = False
                if fd_offset is None:
                    mover.stream(fd, sock.fileno(), rest, sock.gettimeout(), sock.sendall)
                else:
                    mover.file(fd, fd_offset, sock.fileno(), rest, sock.gettimeout(),
                               sock.sendall)
        except BaseException as exc:
            self._fail(exc)
            raise
        return req

    def _send_head(self, header: bytes, head: memoryview, flags: int) -> None:
        sock = self._sock
        total = len(header) + len(head)
        sent = sock.sendmsg([header, head] if head else [header], (), flags)
        if sent < total:
            rest = memoryview(header + bytes(head))[sent:]
            while rest:
                rest = rest[sock.send(rest, flags):]

    def _to_sink(self, sink: ReadSink, ev: ReadData) -> None:
        conn = self._conn
        length = ev.length
        k = min(conn.buffered, length)
        head = memoryview(bytearray(length if self._tls else k))
        if k:
            conn.payload_into(head[:k])
        rest = length - k
        try:
            if self._tls:
                if rest:
                    self._recv_exact(head[k:])
                    conn.payload_received(rest)
                sink.data(ev.offset, length, head, -1)
                return
            sink.data(ev.offset, length, head, self._sock.fileno())
        except BaseException as exc:
            self._fail(exc)
            raise
        if rest:
            conn.payload_received(rest)
