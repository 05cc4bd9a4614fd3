"""A sparse in-memory backend: a memfd, so unwritten and trimmed ranges take no memory
and every worker process of the server sees the same bytes (shared memory)."""

from __future__ import annotations

import errno
import os

from pynbd.backends.base import Backend, BackendError, ConfigError, parse_params
from pynbd.backends.file import FileBackend

#: allocation granularity: tmpfs allocates and punches whole pages
CHUNK = os.sysconf("SC_PAGE_SIZE")


class MemoryBackend(FileBackend):
    """``memory:SIZE``: a sparse memfd (tmpfs) served like a file.

    Holes read as zeros and show as holes in block status; TRIM and zeroing punch holes;
    FLUSH has nothing to do. Worker processes map the same memfd, so writes through any
    connection are visible to all (CAN_MULTI_CONN holds).
    """

    can_multi_conn = True
    can_fast_zero = True
    slow_sync = False  # nothing to sync

    def __init__(self, size: int, read_only: bool = False, fd: int | None = None) -> None:
        if size < 0:
            raise ValueError("memory backend size must be >= 0")
        if fd is None:
            try:
                fd = os.memfd_create("pynbd-memory", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
            except OSError as exc:
                raise BackendError(exc.errno or errno.ENOMEM,
                                   f"cannot create a {size}-byte memory export: "
                                   f"{exc.strerror}") from exc
        super().__init__(f"memory:{size}", read_only=read_only, fd=fd)
        self.name = f"memory:{size}"
        self.path = None  # type: ignore[assignment]  # no file: no migration record
        self.size = size
        self.can_fast_zero = not read_only
        self._nowait_ok = False  # memory never waits for a disk

    @classmethod
    def open_target(cls, target: str, params: dict[str, str], read_only: bool) -> Backend:
        """``memory:SIZE`` (``64M``, ``1G``, bytes); no parameters."""
        from pynbd.backends import parse_size

        parse_params("memory backend", {}, params)
        try:
            size = parse_size(target)
        except ValueError as exc:
            raise ConfigError(f"memory:{target}: {exc}") from None
        return cls(size, read_only=read_only)

    def worker_spec(self) -> dict[str, object] | None:
        return {"kind": "memory", "fd": self.fd, "fds": [self.fd], "size": self.size,
                "read_only": self.read_only}

    def flush(self) -> None:
        """Memory has no stable storage to reach."""

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if not may_trim and length:
            # NO_HOLE: the range must stay allocated; writing zeros to memory is as fast
            # as zeroing gets
            super().zero(offset, length, may_trim=False, fast=False, fua=False)
            return
        super().zero(offset, length, may_trim=may_trim, fast=fast, fua=False)
