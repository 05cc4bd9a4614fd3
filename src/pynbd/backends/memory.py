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

    def _clear(self, offset: int, length: int) -> None:
        end = offset + length
        pos = offset
        chunks = self._chunks
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            take = min(CHUNK - within, end - pos)
            if take == CHUNK:
                with self._lock:
                    chunks.pop(idx, None)
            else:
                chunk = chunks.get(idx)
                if chunk is not None:
                    chunk[within:within + take] = bytes(take)
            pos += take

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
        pos = offset
        chunks = self._chunks
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            take = min(CHUNK - within, end - pos)
            state = 0 if idx in chunks else STATE_HOLE | STATE_ZERO
            if out and out[-1].flags == state:
                out[-1] = Extent(out[-1].length + take, state)
            else:
                out.append(Extent(take, state))
            pos += take
            if len(out) > 1024:
                break
        return out
