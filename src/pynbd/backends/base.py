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
from dataclasses import dataclass

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
    #: minimum, preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE); a maximum of
    #: 0xFFFFFFFF means no limit of the backend's own (the server option decides)
    block_size: tuple[int, int, int] = (1, 4096, 0xFFFFFFFF)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""
        raise NotImplementedError

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

    def close(self) -> None:
        """Release resources. Called once when the server stops."""
