"""Loopback addresses for tests and benchmarks: a free TCP port, a listening socket to
hand to a server (systemd socket activation: no race for a port), and whether something
listens.
"""

from __future__ import annotations

import socket

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

