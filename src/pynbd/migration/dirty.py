"""Dirty-range tracking for live migration: a bitmap, never a queue that blocks writers.

One byte per chunk (default 64 KiB: 16 KiB of bitmap per GiB of image), in shared
memory so the server's worker processes mark the same map (``server/sharedmap.py``).
Marking is a slice assignment of whole bytes; the mirror takes the dirty set in
coalesced runs and clears what it takes, so a write that lands while a run is being
copied marks it dirty again and it is copied again later.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from pynbd.server.exports import WriteTracker
from pynbd.server.sharedmap import shared_bytes

DEFAULT_CHUNK = 64 * 1024


class DirtyMap:
    def __init__(self, size: int, chunk: int = DEFAULT_CHUNK, all_dirty: bool = False) -> None:
        if chunk <= 0 or chunk & (chunk - 1):
            raise ValueError("chunk size must be a power of two")
        self.size = size
        self.chunk = chunk
        self.nchunks = (size + chunk - 1) // chunk
        self._bits, self.fd = shared_bytes(self.nchunks, 1 if all_dirty else 0)
        self._lock = threading.Lock()
        self._shift = chunk.bit_length() - 1

    def __del__(self) -> None:
        import contextlib
        import os

        with contextlib.suppress(Exception):
            self._bits.close()
        with contextlib.suppress(Exception):
            os.close(self.fd)

    def chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        first = offset >> self._shift
        last = min((offset + length + self.chunk - 1) >> self._shift, self.nchunks)
        return first, last

    def mark(self, offset: int, length: int) -> None:
        """Record that [offset, offset+length) changed."""
        if length <= 0:
            return
        a, b = self.chunk_range(offset, length)
        if b > a:
            self._bits[a:b] = b"\x01" * (b - a)

    def mark_all(self) -> None:
        with self._lock:
            self._bits[:self.nchunks] = b"\x01" * self.nchunks

    def clear(self, offset: int, length: int) -> None:
        a, b = self.chunk_range(offset, length)
        if b > a:
            with self._lock:
                self._bits[a:b] = bytes(b - a)

    @property
    def dirty_chunks(self) -> int:
        return self._bits[:self.nchunks].count(1)

    @property
    def dirty_bytes(self) -> int:
        count = self.dirty_chunks
        if not count:
            return 0
        last_partial = self.size - (self.nchunks - 1) * self.chunk
        n = count * self.chunk
        if self._bits[self.nchunks - 1]:
            n -= self.chunk - last_partial
        return n

    def is_dirty(self, offset: int, length: int) -> bool:
        a, b = self.chunk_range(offset, length)
        return self._bits.find(b"\x01", a, b) >= 0

    def take(self, max_bytes: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """Yield dirty runs (offset, length) from ``start`` on, clearing each as it is
        yielded; runs are coalesced up to ``max_bytes``. Wraps around once."""
        max_chunks = max(1, max_bytes >> self._shift)
        pos = min(start >> self._shift, self.nchunks)
        wrapped = False
        while True:
            with self._lock:
                bits = self._bits
                i = bits.find(b"\x01", pos, self.nchunks)
                if i < 0:
                    if wrapped or pos == 0:
                        return
                    wrapped = True
                    pos = 0
                    continue
                j = bits.find(b"\x00", i, min(i + max_chunks, self.nchunks))
                if j < 0:
                    j = min(i + max_chunks, self.nchunks)
                bits[i:j] = bytes(j - i)
            offset = i << self._shift
            length = min(j << self._shift, self.size) - offset
            pos = j
            yield offset, length


class DirtyTracker(WriteTracker):
    """Told about every client write: marks it dirty and forgets it was a hole.

    Its maps live in shared memory: worker processes mark them through a
    ``TrackerView`` (``share()``), with the same effect as :meth:`mark`.
    """

    def __init__(self, dirty: DirtyMap) -> None:
        self.dirty = dirty
        self.lock = threading.Lock()
        n = dirty.nchunks
        self.known_zero, self._kz_fd = shared_bytes(n)
        self.touched, self._t_fd = shared_bytes(n)

    def share(self) -> tuple[dict[str, object], list[int]]:
        # the order of mark(): forget "hole" (touched = 1, known-zero = 0), then dirty
        meta = {"shift": self.dirty.chunk.bit_length() - 1, "nchunks": self.dirty.nchunks,
                "regions": [{"fill": 1}, {"fill": 0}, {"fill": 1}]}
        return meta, [self._t_fd, self._kz_fd, self.dirty.fd]

    def mark(self, offset: int, length: int) -> None:
        # forget "hole" before marking dirty: whoever saw the hole flag and sent ZERO
        # will see this range dirty again afterwards (see Mirror._zero_pass)
        a, b = self.dirty.chunk_range(offset, length)
        if b > a:
            self.touched[a:b] = b"\x01" * (b - a)
            self.known_zero[a:b] = bytes(b - a)
        self.dirty.mark(offset, length)

    def set_holes(self, holes: bytearray) -> None:
        with self.lock:
            for i in range(len(holes)):
                if holes[i] and not self.touched[i]:
                    self.known_zero[i] = 1

    def __del__(self) -> None:
        for fd in (self._kz_fd, self._t_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
