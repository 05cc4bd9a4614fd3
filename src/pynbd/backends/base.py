"""The one small interface every storage backend implements.

Calls are synchronous. A backend whose calls are fast (memory, page-cache files) is
called inline by the server's connection threads; a backend whose calls may block for
long (network storage such as librbd) sets ``blocking = True`` and the server runs its
calls on a bounded worker pool so one slow request does not stall the connection.

Every method may be called from several threads at once; backends must be thread-safe.
Errors are raised as :class:`BackendError` (or any ``OSError``): the server turns the
errno into the NBD error sent to the client.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

AioDone = Callable[[OSError | None], None]


class AioReadDone(Protocol):
    """How an asynchronous read ends: ``done(None)`` once ``buf`` is filled, or
    ``done(None, data)`` with a bytes-like object of exactly ``len(buf)`` bytes that the
    server sends instead (``buf`` stays untouched: no copy when the backend's library
    returns a buffer of its own), or ``done(error)``."""

    def __call__(self, err: OSError | None, data: bytes | None = None, /) -> None: ...

# base:allocation flags, as in the NBD spec.
STATE_HOLE = 1
STATE_ZERO = 2


class BackendError(OSError):
    """A storage failure with an errno the server can report to the client."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes sharing the same ``base:allocation`` flags."""

    length: int
    flags: int  # STATE_HOLE | STATE_ZERO bits


class Backend:
    """Base class with conservative defaults; subclasses override what they can do."""

    #: human name of the target, for logs and status ("file:/srv/disk.img", "memory:1G")
    name: str = "backend"
    size: int = 0
    read_only: bool = False
    #: flushes on one connection are visible to all connections (NBD_FLAG_CAN_MULTI_CONN)
    can_multi_conn: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = True
    can_extents: bool = False
    rotational: bool = False
    #: calls may block for a long time: the server runs them on worker threads
    blocking: bool = False
    #: flush() and FUA writes may take long (fdatasync): the server runs them on threads
    slow_sync: bool = False
    #: the backend implements the aio_* methods (with ``blocking``): the server starts
    #: READ, WRITE, FLUSH, TRIM and WRITE_ZEROES with them instead of using a thread
    aio: bool = False
    #: minimum, preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE)
    block_size: tuple[int, int, int] = (1, 4096, 32 * 1024 * 1024)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""
        raise NotImplementedError

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` if that cannot block (data in memory); False to have the server
        call :meth:`pread_into` on a thread instead. The default just reads."""
        self.pread_into(buf, offset)
        return True

    def resident(self, offset: int, length: int) -> bool:
        """Whether reading the range will not block (e.g. it is in the page cache)."""
        return True

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``; with ``fua`` it is durable on return."""
        raise BackendError(_errno.EPERM, f"{self.name} is read-only")

    def flush(self) -> None:
        """Make every completed write durable."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range (advisory: reads may return old data or zeros)."""

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        """Make a range read as zeros.

        ``may_trim`` false is NBD_CMD_FLAG_NO_HOLE: space must stay allocated.
        ``fast`` is NBD_CMD_FLAG_FAST_ZERO: raise ENOTSUP unless this is faster than
        writing zeros.
        """
        if fast:
            raise BackendError(_errno.ENOTSUP, f"{self.name}: fast zero not supported")
        chunk = min(length, 1 << 20)
        zeros = bytes(chunk)
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            self.pwrite(memoryview(zeros)[:n], offset)
            offset += n
        if fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch of a range."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents covering at least the first byte of the range.

        The extents start at ``offset``; together they may cover less than ``length``
        (never zero bytes) or more (the server trims). The default: all data.
        """
        return [Extent(length, 0)]

    def worker_spec(self) -> dict[str, object] | None:
        """How a worker process reopens this backend (see ``open_worker_backend``), or
        None when its state lives in this process only: the server then serves every
        connection from one process."""
        return None

    # --- asynchronous interface (optional; ``aio = True``) ------------------------------
    # Each call starts the operation and returns at once; ``done(None)`` or
    # ``done(OSError)`` is called exactly once, from any thread, when it finishes.

    def aio_pread(self, buf: memoryview, offset: int, done: AioReadDone) -> None:
        raise NotImplementedError

    def aio_pwrite(self, buf: memoryview, offset: int, fua: bool, done: AioDone) -> None:
        raise NotImplementedError

    def aio_flush(self, done: AioDone) -> None:
        raise NotImplementedError

    def aio_trim(self, offset: int, length: int, fua: bool, done: AioDone) -> None:
        raise NotImplementedError

    def aio_zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool,
                 done: AioDone) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources. Called once when the server stops."""
