"""qcow2 images for backup chains: a writer for what ``pynbd backup --format qcow2``
produces and a reader for what ``pynbd restore`` needs of it.

The layout follows qemu's docs/interop/qcow2.txt (version 3, 64 KiB clusters, 16-bit
refcounts). A backup file is written once, front to back, while several reader
threads deliver cluster-aligned pieces in any order:

- cluster 0 is kept for the header, written last (a file whose header is still zeros
  is not a qcow2 image: a backup that never finished cannot be opened by mistake);
- data clusters are appended in the order they arrive; an all-zero cluster takes no
  space: left unallocated in an image without a backing file (it reads as zeros), or
  given the v3 "reads as zeros" flag in an incremental one (so it hides the backing
  file's data);
- with ``compress`` each data cluster is deflated (qcow2's default zlib type: raw
  deflate, 4 KiB window) and the streams are packed one after another into host
  clusters (a stream never crosses into the next host cluster); a cluster that does
  not shrink is stored as it is;
- at the end come the L2 tables, the L1 table, the refcount blocks and the refcount
  table (every cluster of the file is used once, a host cluster of compressed streams
  once per stream in it), then the header with the backing file's name and format.

An incremental backup's image names the previous backup as its backing file, so qemu
sees each backup as the whole disk at that point: ``qemu-img convert``, ``qemu-img
compare``, ``qemu-nbd`` and a VM's ``-drive ...,snapshot=on`` use it without pynbd.

The reader understands unencrypted images with standard L2 entries and zlib
compression (what the writer makes, and what qemu-img makes by default or with
``-c``); anything else is refused with a :class:`Qcow2Error` that says what.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import zlib
from array import array

from pynbd.util.zeros import is_zero

MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the version 3 header, 104 bytes
EXT = struct.Struct(">II")
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
REFCOUNT_ORDER = 4  # 16-bit refcounts
MAX_L1_BYTES = 32 << 20  # qemu refuses larger L1 tables (QCOW_MAX_L1_SIZE)

OFLAG_COPIED = 1 << 63  # refcount is exactly 1
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1  # v3: the cluster reads as zeros
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00

INCOMPAT_DIRTY = 1
INCOMPAT_CORRUPT = 2
INCOMPAT_EXTERNAL_DATA = 4
INCOMPAT_COMPRESSION = 8
INCOMPAT_EXTENDED_L2 = 16

_BIG = sys.byteorder == "big"


class Qcow2Error(Exception):
    """A qcow2 image this module cannot write or read (shown to the user)."""


def _be(a: array) -> bytes:  # type: ignore[type-arg]
    if _BIG:
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def _ceil(n: int, d: int) -> int:
    return -(-n // d)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class Qcow2Writer:
    """Writes one qcow2 image of ``size`` bytes into ``fd`` (an empty file).

    :meth:`write` and :meth:`zero` take cluster-aligned ranges (the last may end at
    ``size``) from any thread; each cluster is given at most once. :meth:`finish`
    writes the metadata and the header; the caller fsyncs.
    """

    def __init__(self, fd: int, size: int, backing: str | None = None,
                 backing_format: str | None = None, compress: int | None = None) -> None:
        """``compress``: a zlib level (1 fastest to 9 smallest) to deflate each data
        cluster with; None stores them as they are."""
        if size < 0 or size % 512:
            raise Qcow2Error(f"a qcow2 image's size must be a multiple of 512 bytes, "
                             f"not {size}")
        if backing is not None:
            if not backing or len(backing.encode()) > 1023 or "\0" in backing:
                raise Qcow2Error(f"unusable backing file name {backing!r}")
            if backing_format not in ("raw", "qcow2"):
                raise Qcow2Error(f"unknown backing format {backing_format!r}")
        self.fd = fd
        self.size = size
        self.backing = backing
        self.backing_format = backing_format
        self.cs = CLUSTER
        self.l2_entries = CLUSTER // 8
        self.l1_size = _ceil(size, CLUSTER * self.l2_entries)
        if 8 * self.l1_size > MAX_L1_BYTES:
            raise Qcow2Error(f"a {size}-byte image needs an L1 table larger than qemu's "
                             f"{MAX_L1_BYTES >> 20} MiB limit (2 PiB with 64 KiB clusters)")
        self._l2: dict[int, array] = {}  # type: ignore[type-arg]
        self._next = 1  # the next free host cluster; 0 is the header's
        self._lock = threading.Lock()
        self._zero = bytes(CLUSTER)
        self._finished = False
        self.data_clusters = 0
        self.zero_clusters = 0
        if compress is not None and not 0 <= compress <= 9:
            raise Qcow2Error(f"compression level {compress} is not 0 to 9")
        self.compress = compress
        self.compressed_clusters = 0
        self._streams: dict[int, int] = {}  # host cluster -> compressed streams in it
        self._cpos = self._cend = 0  # where the next stream goes, and its host cluster's end
        # bits of a compressed L2 entry below its sector count
        self._cbits = 62 - (CLUSTER_BITS - 8)
        _pwrite_all(fd, self._zero, 0)  # not an image until finish() writes the header

    def _check(self, offset: int, length: int) -> None:
        end = offset + length
        if (offset < 0 or length < 0 or end > self.size or offset % self.cs
                or (end % self.cs and end != self.size)):
            raise Qcow2Error(f"range {offset}+{length} is not cluster-aligned inside the "
                             f"{self.size}-byte image")
        if self._finished:
            raise Qcow2Error("the image is finished")

    def _set(self, cluster: int, entry: int) -> None:
        l1i, l2i = divmod(cluster, self.l2_entries)
        table = self._l2.get(l1i)
        if table is None:
            table = self._l2[l1i] = array("Q", bytes(self.cs))
        if table[l2i]:
            raise Qcow2Error(f"cluster {cluster} given twice")
        table[l2i] = entry

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """The bytes at ``offset``; all-zero clusters take no space."""
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        cs = self.cs
        n = len(view)
        pos = 0
        while pos < n:
            # one run of data clusters, or one zero cluster
            stop = pos
            while stop < n and not is_zero(view[stop:stop + cs]):
                stop += cs
            if stop == pos:
                self.zero(offset + pos, min(cs, n - pos))
                pos += cs
                continue
            if self.compress is not None:
                for p in range(pos, min(stop, n), cs):
                    self._write_compressed(offset + p, view[p:min(p + cs, n)])
                pos = stop
                continue
            k = _ceil(min(stop, n) - pos, cs)
            with self._lock:
                host = self._next
                self._next += k
                for i in range(k):
                    self._set((offset + pos) // cs + i, ((host + i) * cs) | OFLAG_COPIED)
                self.data_clusters += k
            _pwrite_all(self.fd, view[pos:min(stop, n)], host * cs)
            pos = stop

    def _write_compressed(self, offset: int, chunk: memoryview) -> None:
        cs = self.cs
        z = zlib.compressobj(self.compress or 0, zlib.DEFLATED, -12)
        data = z.compress(chunk)
        if len(chunk) < cs:  # the image's last cluster: qemu inflates whole clusters
            data += z.compress(bytes(cs - len(chunk)))
        data += z.flush()
        if len(data) >= cs:  # did not shrink: store it as it is
            with self._lock:
                host = self._next
                self._next += 1
                self._set(offset // cs, (host * cs) | OFLAG_COPIED)
                self.data_clusters += 1
            _pwrite_all(self.fd, chunk, host * cs)
            return
        with self._lock:
            if self._cpos + len(data) > self._cend:
                self._cpos = self._next * cs
                self._cend = self._cpos + cs
                self._next += 1
            at = self._cpos
            self._cpos += len(data)
            host = at // cs
            self._streams[host] = self._streams.get(host, 0) + 1
            sectors = (at + len(data) - 1) // 512 - at // 512
            self._set(offset // cs, OFLAG_COMPRESSED | (sectors << self._cbits) | at)
            self.compressed_clusters += 1
        _pwrite_all(self.fd, data, at)

    def zero(self, offset: int, length: int) -> None:
        """The range reads as zeros (hiding the backing file where there is one)."""
        self._check(offset, length)
        if self.backing is None:
            return  # unallocated clusters of an image without a backing file are zeros
        with self._lock:
            c = offset // self.cs
            end = c + _ceil(length, self.cs)
            while c < end:
                l1i, l2i = divmod(c, self.l2_entries)
                k = min(end - c, self.l2_entries - l2i)
                table = self._l2.get(l1i)
                if table is None:
                    table = self._l2[l1i] = array("Q", bytes(self.cs))
                if any(table[l2i:l2i + k]):
                    raise Qcow2Error(f"a cluster of {offset}+{length} was given twice")
                table[l2i:l2i + k] = array("Q", [OFLAG_ZERO]) * k
                self.zero_clusters += k
                c += k

    def _alloc(self, clusters: int) -> int:
        host = self._next
        self._next += clusters
        return host * self.cs

    def finish(self) -> int:
        """Write the tables and the header; returns the file's length."""
        with self._lock:
            if self._finished:
                raise Qcow2Error("the image is finished")
            self._finished = True
            cs = self.cs
            l1 = array("Q", bytes(8 * self.l1_size))
            for l1i in sorted(self._l2):
                off = self._alloc(1)
                _pwrite_all(self.fd, _be(self._l2[l1i]), off)
                l1[l1i] = off | OFLAG_COPIED
            l1_clusters = _ceil(8 * self.l1_size, cs)
            l1_off = self._alloc(l1_clusters) if l1_clusters else 0
            if l1_clusters:
                _pwrite_all(self.fd, _be(l1).ljust(l1_clusters * cs, b"\0"), l1_off)
            # refcount blocks and table covering every cluster, themselves included
            per_block = cs * 8 // (1 << REFCOUNT_ORDER)
            used = self._next
            blocks = table = 0
            while True:
                total = used + blocks + table
                need_blocks = _ceil(total, per_block)
                need_table = _ceil(need_blocks * 8, cs)
                if (need_blocks, need_table) == (blocks, table):
                    break
                blocks, table = need_blocks, need_table
            first_block = self._alloc(blocks)
            table_off = self._alloc(table)
            total = self._next
            refs = array("H", [1]) * per_block
            shared: dict[int, list[tuple[int, int]]] = {}  # block -> (index, streams)
            for host, streams in self._streams.items():
                shared.setdefault(host // per_block, []).append((host % per_block, streams))
            for b in range(blocks):
                count = min(per_block, total - b * per_block)
                block = refs if count == per_block and b not in shared else \
                    array("H", [1]) * count
                for i, streams in shared.get(b, ()):
                    block[i] = streams
                _pwrite_all(self.fd, _be(block).ljust(cs, b"\0"), first_block + b * cs)
            entries = array("Q", (first_block + b * cs for b in range(blocks)))
            _pwrite_all(self.fd, _be(entries).ljust(table * cs, b"\0"), table_off)
            _pwrite_all(self.fd, self._header(l1_off, table_off, table), 0)
            return total * cs

    def _header(self, l1_off: int, table_off: int, table_clusters: int) -> bytes:
        ext = b""
        if self.backing is not None:
            assert self.backing_format is not None
            fmt = self.backing_format.encode()
            ext += EXT.pack(EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(_ceil(len(fmt), 8) * 8,
                                                                       b"\0")
        ext += EXT.pack(EXT_END, 0)
        name = self.backing.encode() if self.backing is not None else b""
        name_off = HEADER.size + len(ext) if name else 0
        head = HEADER.pack(MAGIC, 3, name_off, len(name), CLUSTER_BITS, self.size, 0,
                           self.l1_size, l1_off, table_off, table_clusters, 0, 0, 0, 0, 0,
                           REFCOUNT_ORDER, HEADER.size)
        out = head + ext + name
        assert len(out) <= self.cs
        return out


class Qcow2Reader:
    """Reads the guest view of one qcow2 image, without its backing file: clusters the
    image does not hold read as zeros (``pynbd restore`` reads only the ranges a backup
    recorded, which its image holds)."""

    def __init__(self, fd: int, name: str = "image", size: int | None = None) -> None:
        """``size``: the virtual size the image must have (checked before any table
        is read, so a damaged header cannot make the reader allocate much)."""
        self.fd = fd
        self.name = name
        raw = os.pread(fd, HEADER.size, 0)
        if len(raw) < 72 or raw[:4] != MAGIC:
            raise Qcow2Error(f"{name} is not a qcow2 image")
        version = struct.unpack(">I", raw[4:8])[0]
        if version not in (2, 3):
            raise Qcow2Error(f"{name}: qcow2 version {version} is not supported")
        if version == 3 and len(raw) < HEADER.size:
            raise Qcow2Error(f"{name}: its header is cut short")
        if version == 2:
            raw = raw[:72] + bytes(HEADER.size - 72)
        (_m, _v, backing_off, backing_len, cluster_bits, vsize, crypt, l1_size, l1_off,
         _rt_off, _rt_clusters, _snaps, _snap_off, incompat, _compat, _auto, _order,
         _hlen) = HEADER.unpack(raw)
        if not 9 <= cluster_bits <= 21:
            raise Qcow2Error(f"{name}: cluster size 2^{cluster_bits} is not valid")
        if crypt:
            raise Qcow2Error(f"{name}: encrypted images are not supported")
        bad = incompat & ~INCOMPAT_DIRTY
        if bad & INCOMPAT_CORRUPT:
            raise Qcow2Error(f"{name}: the image is marked corrupt")
        if bad:
            raise Qcow2Error(f"{name}: incompatible features 0x{bad:x} are not supported "
                             "(external data file, compression type or extended L2)")
        if size is not None and vsize != size:
            raise Qcow2Error(f"{name} is a {vsize}-byte image, not {size} bytes")
        self.cs = 1 << cluster_bits
        self.l2_entries = self.cs // 8
        self.size = vsize
        file_size = os.fstat(fd).st_size
        if l1_size < _ceil(vsize, self.cs * self.l2_entries):
            raise Qcow2Error(f"{name}: its L1 table ({l1_size} entries) does not cover "
                             f"its {vsize} bytes")
        if 8 * l1_size > MAX_L1_BYTES or l1_off + 8 * l1_size > file_size:
            raise Qcow2Error(f"{name}: its L1 table ({l1_size} entries at {l1_off}) lies "
                             f"outside the {file_size}-byte file")
        if l1_size and l1_off % self.cs:
            raise Qcow2Error(f"{name}: its L1 table is not cluster-aligned")
        self.backing = self._backing_name(backing_off, backing_len)
        # only the entries that cover the image are ever used: read just those
        need = _ceil(vsize, self.cs * self.l2_entries)
        table = os.pread(fd, 8 * need, l1_off) if need else b""
        if len(table) != 8 * need:
            raise Qcow2Error(f"{name}: its L1 table is cut short")
        self.l1 = array("Q", table)
        if not _BIG:
            self.l1.byteswap()
        self._l2: dict[int, tuple[int, ...]] = {}

    def _backing_name(self, offset: int, length: int) -> str | None:
        if not offset:
            return None
        if length > 1023 or offset + length > self.cs:
            raise Qcow2Error(f"{self.name}: its backing file name ({length} bytes at "
                             f"{offset}) lies outside its header cluster")
        return os.pread(self.fd, length, offset).decode(errors="replace")

    def _table(self, l1i: int) -> tuple[int, ...] | None:
        entry = self.l1[l1i] & L1_OFFSET_MASK
        if not entry:
            return None
        t = self._l2.get(l1i)
        if t is None:
            raw = os.pread(self.fd, self.cs, entry)
            if len(raw) != self.cs or entry % self.cs:
                raise Qcow2Error(f"{self.name}: L2 table at {entry} is damaged")
            if len(self._l2) >= 64:
                self._l2.pop(next(iter(self._l2)))
            t = self._l2[l1i] = struct.unpack(f">{self.l2_entries}Q", raw)
        return t

    def _inflate(self, cluster: int, entry: int) -> bytes:
        """A compressed cluster's bytes (zlib: raw deflate)."""
        bits = 62 - (self.cs.bit_length() - 1 - 8)
        at = entry & ((1 << bits) - 1)
        sectors = (entry >> bits) & ((1 << (62 - bits)) - 1)
        length = (sectors + 1) * 512 - (at & 511)
        raw = os.pread(self.fd, length, at)
        try:
            out = zlib.decompressobj(-15).decompress(raw, self.cs)
        except zlib.error as exc:
            raise Qcow2Error(f"{self.name}: the compressed cluster at offset "
                             f"{cluster * self.cs} is damaged ({exc})") from None
        if len(out) != self.cs:
            raise Qcow2Error(f"{self.name}: the compressed cluster at offset "
                             f"{cluster * self.cs} is damaged (it inflates to {len(out)} "
                             "bytes)")
        return out

    def pread(self, offset: int, length: int) -> bytearray:
        """``length`` bytes of the image at ``offset``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Qcow2Error(f"{self.name}: {offset}+{length} is outside its {self.size} "
                             "bytes")
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        while pos < length:
            guest = offset + pos
            cluster, within = divmod(guest, self.cs)
            n = min(self.cs - within, length - pos)
            l1i, l2i = divmod(cluster, self.l2_entries)
            table = self._table(l1i)
            entry = table[l2i] if table is not None else 0
            if entry & OFLAG_COMPRESSED:
                view[pos:pos + n] = self._inflate(cluster, entry)[within:within + n]
                pos += n
                continue
            host = entry & L2_OFFSET_MASK
            if host and not entry & OFLAG_ZERO:
                got = os.preadv(self.fd, [view[pos:pos + n]], host + within)
                if got != n:
                    raise Qcow2Error(f"{self.name}: the cluster at offset "
                                     f"{cluster * self.cs} is cut short")
            pos += n
        return out
