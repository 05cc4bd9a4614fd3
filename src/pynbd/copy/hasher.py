"""The checksum of a copy made by several workers: pieces are hashed in offset order."""

from __future__ import annotations

import threading
import time

from pynbd.copy.endpoints import ZEROES
from pynbd.copy.errors import STALL_LIMIT, CopyError


class OrderedHasher:
    """Hash pieces delivered by several threads, in offset order (each thread hands in
    its own pieces in increasing order, so the earliest piece is never waiting)."""

    def __init__(self, algorithm: str) -> None:
        import hashlib  # only when asked for: it costs start-up time
        self.h = hashlib.new(algorithm)
        self.next = 0
        self.cond = threading.Condition()
        self.failed = False

    def update(self, offset: int, data: memoryview | None, length: int) -> None:
        """Hash ``data`` (``None``: ``length`` zeroes) once every earlier piece is in."""
        with self.cond:
            deadline = time.monotonic() + STALL_LIMIT
            while self.next != offset:
                if self.failed:
                    raise CopyError("copy aborted")
                if self.next > offset or time.monotonic() > deadline:
                    raise CopyError(f"checksum out of order at {offset} (at {self.next})")
                self.cond.wait(1.0)
        # only the thread whose turn it is gets here: hash outside the lock (GIL released)
        if data is None:
            pos = 0
            while pos < length:
                k = min(length - pos, len(ZEROES))
                self.h.update(memoryview(ZEROES)[:k])
                pos += k
        else:
            self.h.update(data)
        with self.cond:
            self.next = offset + length
            self.cond.notify_all()

    def abort(self) -> None:
        """A worker failed: wake the others waiting for their turn."""
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def hexdigest(self) -> str:
        return self.h.hexdigest()
