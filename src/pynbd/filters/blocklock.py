"""Per-block exclusive locks shared by every thread and every worker process of an
export (used by the ``cow`` and ``blocksize`` filters around read-modify-write).

A lock is an open-file-description record lock (``F_OFD_SETLKW``) on byte ``N`` of a
memfd for block ``N``. OFD locks conflict between different open file descriptions even
inside one process, so each thread locks through its own description (a reopen of
``/proc/self/fd/FD``); worker processes inherit the memfd's number and do the same. The
memfd holds no data: record locks may lie past its end.

A thread holds at most one block lock at a time (the callers copy or patch one block,
then let go), so there is no lock order to get wrong and no deadlock.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (0 for OFD locks), padded to 8 bytes.
_FLOCK = struct.Struct("@hhqqi4x")


class BlockLocks:
    """Exclusive locks on block numbers, across threads and processes."""

    def __init__(self, fd: int | None = None) -> None:
        #: the memfd every process shares (created here unless inherited)
        self.fd = os.memfd_create("pynbd-blocklocks", os.MFD_CLOEXEC) if fd is None else fd
        self._local = threading.local()
        self._mine: list[int] = []
        self._mu = threading.Lock()

    def _ofd(self) -> int:
        fd: int | None = getattr(self._local, "fd", None)
        if fd is None:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
            self._local.fd = fd
            with self._mu:
                self._mine.append(fd)
        return fd

    @contextmanager
    def hold(self, block: int) -> Iterator[None]:
        """Hold block ``block`` exclusively (waits for other holders)."""
        fd = self._ofd()
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, block, 1, 0))
        try:
            yield
        finally:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, block, 1, 0))

    def close(self, owner: bool = True) -> None:
        """Close this process's descriptions (and the memfd when ``owner``)."""
        with self._mu:
            mine, self._mine = self._mine, []
        for fd in mine:
            try:
                os.close(fd)
            except OSError:
                pass
        self._local = threading.local()
        if owner:
            try:
                os.close(self.fd)
            except OSError:
                pass
