"""The pieces of a copy, handed out to the workers in increasing offset order."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pynbd.copy.endpoints import Extent, Handle

#: largest single zero piece (one WRITE_ZEROES) unless the destination says otherwise
ZERO_CHUNK = 64 << 20


def pieces(extents: Iterator[Extent], request_size: int,
           zero_chunk: int = ZERO_CHUNK) -> Iterator[Extent]:
    """Split extents into requests: data into ``request_size`` pieces (aligned to it
    after the first), zero ranges into ``zero_chunk`` pieces (with extended headers one
    piece: a 64-bit WRITE_ZEROES)."""
    for off, ln, zero in extents:
        step = zero_chunk if zero else request_size
        end = off + ln
        while off < end:
            n = min(step, end - off)
            if not zero and n == step and off % step:
                n = min(step - off % step, end - off)  # align later pieces
            yield off, n, zero
            off += n


class WorkQueue:
    """Hands out (offset, length, is_zero) pieces of ``[0, size)`` of the source, mapped
    through ``handle`` as they are asked for, to any number of threads."""

    def __init__(self, handle: Handle, size: int, request_size: int,
                 zero_chunk: int = ZERO_CHUNK) -> None:
        self.lock = threading.Lock()
        self.it = pieces(handle.extents(0, size), request_size, zero_chunk)

    def next(self) -> Extent | None:
        with self.lock:
            return next(self.it, None)
