"""Loopback addresses for tests and benchmarks: a free TCP port, a listening socket to
hand to a server (systemd socket activation: no race for a port), and whether something
listens.
"""

from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"

#: run by a Python interpreter as ``-c ACTIVATE FD PROGRAM ARGS...``: hands the
#: listening socket FD to PROGRAM as fd 3 the way systemd does (LISTEN_FDS/LISTEN_PID)
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "if fd != 3: os.close(fd)\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago (nothing listens there now;
    prefer :func:`listening_socket` where the server can inherit the socket)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def listening_socket(host: str = LOOPBACK, backlog: int = 64) -> tuple[socket.socket, int]:
    """A socket listening on ``host`` port 0, and its port."""
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    port: int = s.getsockname()[1]
    return s, port


def activation_argv(python: str, fd: int, argv: list[str]) -> list[str]:
    """``argv`` run with the listening socket ``fd`` as its fd 3 (pass ``fd`` to the
    child with ``pass_fds``)."""
    return [python, "-c", ACTIVATE, str(fd), *argv]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def read_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends before it closes the connection (bounded: a peer that
    keeps it open past ``timeout`` is an error, with the first bytes it sent)."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data
    raise TimeoutError(f"the peer kept the connection open (sent {got[:32]!r})")
