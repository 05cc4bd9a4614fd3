"""Byte maps in shared memory, so every worker process marks the same dirty map.

A map is a memfd mapped ``MAP_SHARED``: the supervisor creates it, worker processes
receive its descriptor over their channel and map it too. Marking a range is a slice
assignment of whole bytes (one byte per chunk), which needs no lock across processes:
a byte store is atomic, and the reader (the mirror) clears a run before it copies it,
so a write that completes later marks it again.
"""

from __future__ import annotations

import mmap
import os
from typing import Any


def shared_bytes(n: int, fill: int = 0) -> tuple[mmap.mmap, int]:
    """A zero-initialized (or ``fill``-ed) shared map of ``n`` bytes and its memfd."""
    fd = os.memfd_create("pynbd-map", os.MFD_CLOEXEC)
    size = max(n, 1)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    if fill:
        mm[:n] = bytes([fill]) * n
    return mm, fd


class TrackerView:
    """A worker's view of a shared tracker: ``mark`` sets each region's bytes for the
    chunks a write touched (e.g. dirty = 1, known-zero = 0)."""

    def __init__(self, meta: dict[str, Any], fds: list[int]) -> None:
        self.shift = int(meta["shift"])
        self.nchunks = int(meta["nchunks"])
        self.maps: list[tuple[mmap.mmap, int]] = []
        for region, fd in zip(meta["regions"], fds, strict=True):
            mm = mmap.mmap(fd, max(self.nchunks, 1), flags=mmap.MAP_SHARED)
            os.close(fd)
            self.maps.append((mm, int(region["fill"])))
        self._fills = {f: bytes([f]) for _mm, f in self.maps}

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        a = offset >> self.shift
        b = min((offset + length + (1 << self.shift) - 1) >> self.shift, self.nchunks)
        if b <= a:
            return
        n = b - a
        for mm, fill in self.maps:
            mm[a:b] = self._fills[fill] * n


def attach_tracker(meta: dict[str, Any], fds: list[int]) -> TrackerView:
    return TrackerView(meta, fds)
