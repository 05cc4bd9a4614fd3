"""A sparse in-memory backend: unwritten and trimmed chunks take no memory."""

from __future__ import annotations

import threading

from pynbd.backends.base import STATE_HOLE, STATE_ZERO, Backend, Extent

CHUNK = 64 * 1024


class MemoryBackend(Backend):
    can_multi_conn = True
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_extents = True

    def __init__(self, size: int, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("memory backend size must be >= 0")
        self.size = size
        self.read_only = read_only
        self.name = f"memory:{size}"
        self._chunks: dict[int, bytearray] = {}
        self._lock = threading.Lock()

    def pread_into(self, buf: memoryview, offset: int) -> None:
        pos = 0
        n = len(buf)
        chunks = self._chunks
        while pos < n:
            idx, within = divmod(offset + pos, CHUNK)
            take = min(CHUNK - within, n - pos)
            chunk = chunks.get(idx)
            if chunk is None:
                buf[pos:pos + take] = bytes(take)
            else:
                buf[pos:pos + take] = memoryview(chunk)[within:within + take]
            pos += take

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        mv = memoryview(buf)
        pos = 0
        n = len(mv)
        chunks = self._chunks
        while pos < n:
            idx, within = divmod(offset + pos, CHUNK)
            take = min(CHUNK - within, n - pos)
            chunk = chunks.get(idx)
            if chunk is None:
                with self._lock:
                    chunk = chunks.setdefault(idx, bytearray(CHUNK))
            chunk[within:within + take] = mv[pos:pos + take]
            pos += take

    def _allocated(self, start: int, end: int) -> list[int]:
        """Sorted indices of the allocated chunks in [start, end): O(min(span, number
        of chunks)), so a 64-bit range (extended headers) costs no more than the
        chunks that exist."""
        chunks = self._chunks
        if end - start <= len(chunks):
            return [i for i in range(start, end) if i in chunks]
        return sorted(i for i in list(chunks) if start <= i < end)

    def _clear(self, offset: int, length: int) -> None:
        end = offset + length
        first, within = divmod(offset, CHUNK)
        last, tail = divmod(end, CHUNK)
        chunks = self._chunks
        if first == last:  # inside one chunk
            chunk = chunks.get(first)
            if chunk is not None:
                chunk[within:tail] = bytes(tail - within)
            return
        if within:  # partial head chunk
            chunk = chunks.get(first)
            if chunk is not None:
                chunk[within:] = bytes(CHUNK - within)
            first += 1
        if tail:  # partial tail chunk
            chunk = chunks.get(last)
            if chunk is not None:
                chunk[:tail] = bytes(tail)
        for idx in self._allocated(first, last):
            with self._lock:
                chunks.pop(idx, None)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._clear(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        # memory holes read as zeros, so zeroing is always fast
        if may_trim:
            self._clear(offset, length)
            return
        # NBD_CMD_FLAG_NO_HOLE: the range must stay allocated (block status: data),
        # so allocate zeroed chunks instead of dropping them
        end = offset + length
        pos = offset
        chunks = self._chunks
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            take = min(CHUNK - within, end - pos)
            chunk = chunks.get(idx)
            if chunk is None:
                with self._lock:
                    chunks.setdefault(idx, bytearray(CHUNK))
            else:
                chunk[within:within + take] = bytes(take)
            pos += take

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = min(offset + length, self.size)
        if offset >= end:
            return [Extent(max(length, 1), STATE_HOLE | STATE_ZERO)]
        hole = STATE_HOLE | STATE_ZERO

        def add(n: int, state: int) -> None:
            if out and out[-1].flags == state:
                out[-1] = Extent(out[-1].length + n, state)
            else:
                out.append(Extent(n, state))

        pos = offset
        for idx in self._allocated(offset // CHUNK, (end + CHUNK - 1) // CHUNK):
            start = max(idx * CHUNK, offset)
            if start > pos:
                add(start - pos, hole)
            stop = min((idx + 1) * CHUNK, end)
            add(stop - start, 0)
            pos = stop
            if len(out) > 1024:
                return out
        if pos < end:
            add(end - pos, hole)
        return out
