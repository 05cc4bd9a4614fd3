"""Payload buffers: pooled, and backed by memory only as bytes arrive.

A WRITE header announces up to the maximum request size (64 MiB by default) before a
single payload byte has arrived. Buffers above :data:`LAZY_MIN` are anonymous ``mmap``
regions: the kernel backs a page only when the first byte is received into it, so a
client that sends a 32 MiB header and trickles its payload holds exactly what it sent,
not 32 MiB (issue 11). Returned buffers are kept for reuse (fresh 32 MiB allocations
page-fault every time); the pool keeps at most :attr:`BufferPool.keep_bytes` of them
and hands the rest back to the kernel.
"""

from __future__ import annotations

import mmap

#: below this size a bytearray is cheaper than an mmap and its page faults
LAZY_MIN = 256 * 1024

Buffer = bytearray | mmap.mmap


class BufferPool:
    """Buffers of power-of-two size classes (64 KiB and up). Not thread-safe: each
    event loop owns one pool (buffers lent to worker threads come back on the loop)."""

    MIN = 64 * 1024

    def __init__(self, keep_per_class: int = 32, keep_bytes: int = 128 * 1024 * 1024) -> None:
        self._free: dict[int, list[Buffer]] = {}
        self._keep = keep_per_class
        self.keep_bytes = keep_bytes
        self._kept = 0

    @classmethod
    def size_class(cls, n: int) -> int:
        size = cls.MIN
        while size < n:
            size <<= 1
        return size

    def get(self, n: int) -> Buffer:
        if n < self.MIN:
            return bytearray(n)  # small: allocating is as cheap as pooling
        size = self.size_class(n)
        free = self._free.get(size)
        if free:
            self._kept -= size
            return free.pop()
        if size >= LAZY_MIN:
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return bytearray(size)

    def put(self, buf: Buffer) -> None:
        size = len(buf)
        if size < self.MIN:
            return
        free = self._free.setdefault(size, [])
        if len(free) < self._keep and self._kept + size <= self.keep_bytes:
            free.append(buf)
            self._kept += size
        elif isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:  # a memoryview still points into it: let GC take it
                pass

    @property
    def kept_bytes(self) -> int:
        return self._kept
