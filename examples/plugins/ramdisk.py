"""A RAM disk: about the smallest useful pynbd plugin.

    pynbd serve python:examples/plugins/ramdisk.py size=64M

The disk is one bytearray in one process, so pynbd serves it from one worker
(``multi_process`` is False by default) and a FLUSH on any connection trivially covers
every other one (``can_multi_conn``). Every call is a memory copy that never waits, so
it runs inline on the server's event loop (``blocking = False``).
"""

from pynbd.backends import Backend, Param, parse_size


class RamDisk(Backend):
    params = {"size": Param("size of the disk, e.g. 64M or 1G", parse_size)}
    blocking = False
    can_multi_conn = True
    can_trim = True
    can_zero = True
    can_fast_zero = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.name = f"ramdisk:{size}"
        self.data = bytearray(size)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self.data[offset:offset + len(buf)] = buf

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self.data[offset:offset + length] = bytes(length)
