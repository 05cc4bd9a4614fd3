"""``readonly``: the export is read-only whatever the plugin says. Specified in
docs/filters.md.

The export advertises NBD_FLAG_READ_ONLY (and no TRIM, WRITE_ZEROES or FUA), so clients
know before they try; the server's protocol core refuses WRITE, TRIM and WRITE_ZEROES
on a read-only export with EPERM, and this layer refuses them too should anything call
it directly. Reads, block status, CACHE and FLUSH pass through.
"""

from __future__ import annotations

import errno

from pynbd.backends.base import BackendError
from pynbd.filters.base import Filter


class ReadonlyFilter(Filter):
    """Refuses every change."""

    read_only = True
    can_trim = False
    can_zero = False
    can_fast_zero = False
    can_fua = False
    #: reads pass through unchanged: zero-copy stays possible
    sendfile_fd = property(lambda self: getattr(self.next, "sendfile_fd", None))

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return self.next.pread_nowait(buf, offset)

    def _refuse(self, what: str) -> BackendError:
        return BackendError(errno.EPERM, f"{what} refused: the export is read-only "
                                         "(filter readonly)")

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        raise self._refuse("write")

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise self._refuse("trim")

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        raise self._refuse("write zeroes")
