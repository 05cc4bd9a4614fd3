"""Running as a service: systemd socket activation and readiness, dying with the parent,
pid files. Each piece is what systemd and nbdkit users expect; none needs libsystemd.

- Socket activation (``sd_listen_fds(3)``): ``LISTEN_PID`` is our pid, ``LISTEN_FDS``
  descriptors start at 3, ``LISTEN_FDNAMES`` names them. The variables are removed from
  the environment once read (children must not take them for theirs).
- Readiness (``sd_notify(3)``): datagrams ``READY=1`` / ``STOPPING=1`` / ``STATUS=...`` to
  ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import stat
from dataclasses import dataclass

log = logging.getLogger("pynbd.service")

SD_LISTEN_FDS_START = 3
PR_SET_PDEATHSIG = 1


class ActivationError(ValueError):
    """The socket-activation environment is inconsistent (a configuration error)."""


@dataclass
class ActivatedSocket:
    sock: socket.socket
    name: str
    kind: str  # "tcp" or "unix"


def listen_fds(unset: bool = True) -> list[ActivatedSocket]:
    """The listening sockets systemd passed us (empty when not socket-activated)."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names_text = os.environ.get("LISTEN_FDNAMES", "")
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process (e.g. our parent)
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r}: not numbers") from None
    if not 0 <= n <= 1024:
        raise ActivationError(f"LISTEN_FDS={n}: out of range")
    names = names_text.split(":") if names_text else []
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={n} but descriptor {fd} is not open: "
                                  f"{exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ActivationError(f"descriptor {fd} (LISTEN_FDS) is not a socket")
        s = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        if s.type != socket.SOCK_STREAM:
            raise ActivationError(f"descriptor {fd} is not a stream socket (use "
                                  "ListenStream= in the .socket unit)")
        kind = "unix" if s.family == socket.AF_UNIX else "tcp"
        out.append(ActivatedSocket(s, names[i] if i < len(names) else f"fd{fd}", kind))
    return out


def sd_notify(state: str) -> bool:
    """Tell the service manager ``state`` (``READY=1``...); False when not asked for."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", path, exc)
        return False
    return True


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Get ``sig`` when the parent process exits (Linux PR_SET_PDEATHSIG), like nbdkit's
    --exit-with-parent; if the parent is already gone, send it now."""
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent or parent == 1:  # it died before prctl took effect
        os.kill(os.getpid(), sig)


class PidFile:
    """Write our pid to ``path`` (atomically) once serving; remove it at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = False

    def write(self) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)
        self.written = True

    def remove(self) -> None:
        if not self.written:
            return
        with contextlib.suppress(OSError):
            with open(self.path, encoding="ascii") as f:
                if f.read().strip() != str(os.getpid()):
                    return  # someone else's now
            os.unlink(self.path)
        self.written = False
