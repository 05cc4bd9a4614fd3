"""A small pool of large buffers: fresh 32 MiB allocations page-fault every time."""

from __future__ import annotations

import threading


class BufferPool:
    """Buffers of power-of-two size classes (64 KiB .. 32 MiB), a few kept per class."""

    MIN = 64 * 1024

    def __init__(self, keep_per_class: int = 4) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep = keep_per_class
        self._lock = threading.Lock()

    @classmethod
    def size_class(cls, n: int) -> int:
        size = cls.MIN
        while size < n:
            size <<= 1
        return size

    def get(self, n: int) -> bytearray:
        size = self.size_class(n)
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        with self._lock:
            free = self._free.setdefault(size, [])
            if len(free) < self._keep:
                free.append(buf)
