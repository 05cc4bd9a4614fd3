"""Where the NBD server listens: TCP (every address, IPv6 and IPv4, by default),
Unix sockets, listening sockets handed over by systemd; the URIs clients can use; and
closing them (and removing the Unix socket files the server made) at shutdown.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass

from pynbd.protocol.server import TLSMode
from pynbd.server.server_state import ServerState


@dataclass
class Listener:
    sock: socket.socket
    kind: str  # "tcp" or "unix"
    address: str
    port: int = 0
    path: str = ""
    #: we created it (and remove a Unix socket's file at exit); not for inherited ones
    owned: bool = True


class ListenersMixin(ServerState):
    """The listening sockets of :class:`~pynbd.server.server.Server`."""

    def listen_tcp(self, host: str | None, port: int) -> list[Listener]:
        """Listen on ``host`` (None/"" = every address, IPv6 and IPv4) and ``port``."""
        new: list[Listener] = []
        if not host:
            try:
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                hosts = [("::", s)]
            except OSError:
                hosts = [("0.0.0.0", socket.socket(socket.AF_INET, socket.SOCK_STREAM))]
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            hosts = []
            for family, _, _, _, addr in infos[:1]:
                hosts.append((str(addr[0]), socket.socket(family, socket.SOCK_STREAM)))
        for bind_addr, s in hosts:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((bind_addr, port))
                s.listen(1024)
            except OSError:
                s.close()
                raise
            real_port = s.getsockname()[1]
            lst = Listener(s, "tcp", bind_addr, real_port)
            new.append(lst)
            self.listeners.append(lst)
        return new

    def listen_unix(self, path: str) -> Listener:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1024)
        lst = Listener(s, "unix", path, path=path)
        self.listeners.append(lst)
        return lst

    def adopt_listener(self, sock: socket.socket) -> Listener:
        """A listening socket made by someone else (systemd socket activation)."""
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            path = path if isinstance(path, str) else ""
            lst = Listener(sock, "unix", path or "(inherited)", path=path, owned=False)
        else:
            addr = sock.getsockname()
            lst = Listener(sock, "tcp", str(addr[0]), int(addr[1]), owned=False)
        self.listeners.append(lst)
        return lst

    def uris(self) -> list[str]:
        """The NBD URIs clients can use (the default export)."""
        from urllib.parse import quote

        scheme_tls = self.options.tls is TLSMode.REQUIRE
        name = self.registry.default or ""
        out = []
        for lst in self.listeners:
            if lst.kind == "unix":
                scheme = "nbds+unix" if scheme_tls else "nbd+unix"
                out.append(f"{scheme}:///{quote(name)}?socket={quote(lst.path)}")
            else:
                host = lst.address
                if host in ("::", "0.0.0.0"):
                    host = "localhost"
                elif ":" in host:
                    host = f"[{host}]"
                scheme = "nbds" if scheme_tls else "nbd"
                out.append(f"{scheme}://{host}:{lst.port}/{quote(name)}")
        return out

    def _close_listeners(self) -> None:
        for lst in self.listeners:
            self.loop.remove(lst.sock.fileno())
            with contextlib.suppress(OSError):
                lst.sock.close()
            if lst.kind == "unix" and lst.owned:
                with contextlib.suppress(OSError):
                    os.unlink(lst.path)
