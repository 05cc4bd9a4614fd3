"""The supervisor <-> worker channel: JSON messages and file descriptors over a
``SOCK_SEQPACKET`` Unix socket pair, driven by the event loop on each side.

A message is one JSON object per packet; sockets of new client connections and
shared-memory file descriptors travel with it (``SCM_RIGHTS``).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from pynbd.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop

log = logging.getLogger("pynbd.server")

MAX_MESSAGE = 4 * 1024 * 1024
MAX_FDS = 16

Message = dict[str, Any]
OnMessage = Callable[[Message, list[int]], None]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
    return a, b


def encode(msg: Message) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def recv_message(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """One message (blocking or not); None at end of stream. Raises BlockingIOError."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
    if not data:
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        return None
    if flags & socket.MSG_TRUNC:
        raise ValueError("channel message truncated")
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise ValueError("channel message is not an object")
    return msg, list(fds)


class Channel:
    """One end of the channel, registered with a loop. Only the loop thread calls it."""

    def __init__(self, loop: Loop, sock: socket.socket, on_message: OnMessage,
                 on_close: Callable[[], None]) -> None:
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.on_message = on_message
        self.on_close = on_close
        self._out: deque[tuple[bytes, list[int], list[socket.socket]]] = deque()
        self.closed = False
        loop.add(sock.fileno(), EPOLLIN, self._on_event)

    def send(self, msg: Message, fds: list[int] | None = None,
             keep: list[socket.socket] | None = None) -> None:
        """Queue ``msg`` (with ``fds``); objects in ``keep`` are closed once sent."""
        if self.closed:
            for s in keep or ():
                s.close()
            return
        self._out.append((encode(msg), fds or [], keep or []))
        if len(self._out) == 1:
            self._flush()

    def _flush(self) -> None:
        while self._out and not self.closed:
            data, fds, keep = self._out[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.loop.modify(self.sock.fileno(), EPOLLIN | EPOLLOUT)
                return
            except OSError as exc:
                log.debug("worker channel send failed: %s", exc)
                self._closed()
                return
            self._out.popleft()
            for s in keep:
                s.close()
        if not self.closed:
            self.loop.modify(self.sock.fileno(), EPOLLIN)

    def poll(self) -> None:
        """Handle the messages already waiting, without waiting for more."""
        if not self.closed:
            self._on_event(EPOLLIN)

    def _on_event(self, ev: int) -> None:
        if ev & EPOLLOUT:
            self._flush()
        if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
            for _ in range(64):
                try:
                    got = recv_message(self.sock)
                except (BlockingIOError, InterruptedError):
                    return
                except (OSError, ValueError) as exc:
                    log.warning("worker channel: %s", exc)
                    self._closed()
                    return
                if got is None:
                    self._closed()
                    return
                msg, fds = got
                try:
                    self.on_message(msg, fds)
                except Exception:
                    log.exception("worker channel: handling %r failed", msg.get("op"))

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self.sock.fileno())
        for _data, _fds, keep in self._out:
            for s in keep:
                s.close()
        self._out.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.on_close()

    def close(self) -> None:
        self._closed()
