"""Every client gets its own empty scratch disk, gone when it disconnects: a plugin with
per-connection state (``open_connection`` / ``close_connection``).

    pynbd serve python:examples/plugins/tmpdisk.py size=1G

The object the server opens once answers for the export (its size and capabilities);
``open_connection`` gives each connection a ``_Scratch`` of its own, whose methods
serve that connection's requests, and ``close_connection`` frees it. Nothing is shared
between connections, so any worker process may serve any of them
(``multi_process = True``), but two connections never see each other's writes
(``can_multi_conn`` stays False). A scratch disk is an anonymous memory map: untouched
pages cost nothing, and every call is a memory copy, run inline (``blocking = False``).
"""

from __future__ import annotations

import mmap

from pynbd.backends import Backend, Param, parse_size


class _Scratch(Backend):
    """One connection's disk."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.map = mmap.mmap(-1, max(size, 1))  # private, zero-filled, allocated on use
        self.mv = memoryview(self.map)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.mv[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self.mv[offset:offset + len(buf)] = buf

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self.mv[offset:offset + length] = bytes(length)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset, length)

    def close_connection(self) -> None:
        self.mv.release()
        self.map.close()


class TmpDisk(Backend):
    params = {"size": Param("size of each client's disk, e.g. 1G", parse_size)}
    blocking = False
    multi_process = True
    can_trim = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"tmpdisk:{size}"

    def open_connection(self, export: str, read_only: bool) -> Backend:
        return _Scratch(self.size)
