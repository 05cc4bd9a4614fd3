"""Named dirty bitmaps: which parts of an export changed since a point in time.

A bitmap has one byte per granule (default 64 KiB: 16 KiB of map per GiB of image) in
shared memory, a memfd mapped ``MAP_SHARED``, so every worker process marks the same
map with a plain byte store (no lock across processes; a byte store is atomic). Writes,
trims and zeroings mark it before and after the call (``mark_before``): a worker that
dies between changing the data and marking cannot lose the mark, and a ``clear`` that
races a write still sees it afterwards.

The map is served as the metadata context ``qemu:dirty-bitmap:NAME`` with qemu-nbd's
meaning (flag 1 = dirty), its extents following granule boundaries.

Persistence (:class:`BitmapStore`): next to a file image, in ``IMAGE.pynbd-bitmaps/``:

- ``bitmaps.json``: the list (name, granularity, kind, consistent, sha256 of the map
  file) and ``in_use``, true from the moment a server loads the store until it saved it
  at a clean stop. A store found ``in_use`` belonged to a server that did not stop
  cleanly: every bitmap in it is *inconsistent* (writes may have gone unrecorded) and
  refused until cleared.
- ``NAME.map``: the map, one byte per granule (0 clean, 1 dirty).

Every file is written to a temporary name, fsynced and renamed (then the directory is
fsynced), so a crash leaves the old or the new version, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pynbd.backends.base import Extent

CONTEXT_PREFIX = "qemu:dirty-bitmap:"
DEFAULT_GRANULARITY = 64 * 1024
MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 30
#: at most this many extents in one block status answer (qemu's limit too)
MAX_EXTENTS = 1 << 20
#: at most this many granules (bytes of shared memory) per bitmap: 256 MiB
MAX_GRANULES = 1 << 28
STORE_SUFFIX = ".pynbd-bitmaps"
META = "bitmaps.json"
FORMAT = "pynbd-bitmaps"
VERSION = 1

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")


class BitmapError(ValueError):
    """A bad name, granularity or operation (shown to the user)."""


def check_name(name: object, what: str = "bitmap") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BitmapError(f"{what} name {name!r} is not valid: 1 to 64 characters, letters, "
                          "digits and _ . + - (not first)")
    return name


def check_granularity(value: object) -> int:
    if isinstance(value, str):
        from pynbd.util.sizes import parse_size

        value = parse_size(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BitmapError(f"granularity {value!r} is not a number of bytes")
    if value & (value - 1) or not MIN_GRANULARITY <= value <= MAX_GRANULARITY:
        raise BitmapError(f"granularity {value} must be a power of two between "
                          f"{MIN_GRANULARITY} and {MAX_GRANULARITY}")
    return value


def context_name(name: str) -> str:
    return CONTEXT_PREFIX + name


class BitmapMap:
    """One byte per granule of an image of ``size`` bytes, in shared memory."""

    #: backup bitmaps are marked before a change as well as after (see the module doc)
    mark_before = True

    def __init__(self, size: int, granularity: int, fd: int | None = None,
                 close_fd: bool = False) -> None:
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.nchunks = (size + granularity - 1) >> self.shift
        if self.nchunks > MAX_GRANULES:
            least = 1 << max(0, (size - 1).bit_length() - MAX_GRANULES.bit_length() + 1)
            raise BitmapError(f"granularity {granularity} is too fine for a {size}-byte "
                              f"image (a bitmap holds at most {MAX_GRANULES} granules); use "
                              f"{least} or more")
        if fd is None:
            fd = os.memfd_create("pynbd-bitmap", os.MFD_CLOEXEC)
            os.ftruncate(fd, max(self.nchunks, 1))
        self.mm = mmap.mmap(fd, max(self.nchunks, 1), flags=mmap.MAP_SHARED)
        if close_fd:
            os.close(fd)
            self.fd = -1
        else:
            self.fd = fd

    # --- sharing with worker processes -------------------------------------------------

    def share(self) -> tuple[dict[str, Any], list[int]]:
        return {"size": self.size, "granularity": self.granularity}, [self.fd]

    @classmethod
    def attach(cls, meta: dict[str, Any], fd: int) -> BitmapMap:
        """A worker's mapping of the supervisor's map (takes ``fd``)."""
        return cls(int(meta["size"]), int(meta["granularity"]), fd=fd, close_fd=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mm.close()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    # --- the data path ----------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        a = offset >> self.shift
        b = min((offset + length + self.granularity - 1) >> self.shift, self.nchunks)
        if b > a:
            self.mm[a:b] = b"\x01" * (b - a)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """``qemu:dirty-bitmap`` extents from ``offset``: flag 1 dirty, 0 clean; every
        boundary is a granule boundary (or the request's start/end)."""
        end = min(offset + length, self.size)
        out: list[Extent] = []
        pos = offset
        mm = self.mm
        n = self.nchunks
        while pos < end and len(out) < MAX_EXTENTS:
            i = pos >> self.shift
            dirty = mm[i] != 0
            j = mm.find(b"\x00" if dirty else b"\x01", i + 1, n)
            stop = end if j < 0 else min(j << self.shift, end)
            out.append(Extent(stop - pos, 1 if dirty else 0))
            pos = stop
        if not out:
            out.append(Extent(max(length, 1), 0))
        return out

    # --- the supervisor's view -------------------------------------------------------

    def clear(self) -> None:
        self.mm[:self.nchunks] = bytes(self.nchunks)

    def fill(self) -> None:
        self.mm[:self.nchunks] = b"\x01" * self.nchunks

    @property
    def dirty_granules(self) -> int:
        return self.mm[:self.nchunks].count(1)

    @property
    def dirty_bytes(self) -> int:
        count = self.dirty_granules
        if count and self.mm[self.nchunks - 1]:
            tail = self.size - ((self.nchunks - 1) << self.shift)
            return (count - 1) * self.granularity + tail
        return count * self.granularity

    def runs(self) -> Iterator[tuple[int, int]]:
        """Dirty ranges (offset, length), coalesced."""
        mm, n, pos = self.mm, self.nchunks, 0
        while pos < n:
            i = mm.find(b"\x01", pos, n)
            if i < 0:
                return
            j = mm.find(b"\x00", i, n)
            j = n if j < 0 else j
            start = i << self.shift
            yield start, min(j << self.shift, self.size) - start
            pos = j

    def snapshot(self) -> bytes:
        return bytes(self.mm[:self.nchunks])

    def load(self, data: bytes) -> None:
        if len(data) != self.nchunks:
            raise BitmapError(f"map has {len(data)} granules, expected {self.nchunks}")
        self.mm[:self.nchunks] = bytes(1 if b else 0 for b in data) if \
            data.strip(b"\x00\x01") else data

    def merge(self, other: BitmapMap) -> None:
        """Mark everything ``other`` (same geometry) has dirty."""
        for off, ln in other.runs():
            self.mark(off, ln)


@dataclass
class Bitmap:
    """One named bitmap of an export, as the supervisor keeps it."""

    name: str
    map: BitmapMap
    #: a checkpoint bitmap (its chain: ``pynbd checkpoint``) rather than a user one
    checkpoint: bool = False
    consistent: bool = True
    #: why it is inconsistent
    reason: str = ""
    #: frozen: no longer marked; served by the point-in-time view named here
    frozen_by: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def granularity(self) -> int:
        return self.map.granularity

    @property
    def context(self) -> str:
        return context_name(self.name)

    @property
    def state(self) -> str:
        if not self.consistent:
            return "inconsistent"
        return "frozen" if self.frozen_by else "active"

    def describe(self, export: str, persistent: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "export": export, "context": self.context,
            "granularity": self.granularity, "state": self.state,
            "dirty_bytes": self.map.dirty_bytes if self.consistent else None,
            "kind": "checkpoint" if self.checkpoint else "user",
            "persistent": persistent and not self.frozen_by,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
        }
        if self.frozen_by:
            d["view"] = self.frozen_by
        if not self.consistent:
            d["reason"] = self.reason
        return d


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@dataclass
class StoredBitmap:
    name: str
    granularity: int
    checkpoint: bool
    consistent: bool
    reason: str
    created: float
    data: bytes | None


class BitmapStore:
    """The bitmaps of one image on disk (see the module docstring), locked while a
    server has them loaded (``flock`` on the directory: a second server on the same
    image is refused instead of corrupting them)."""

    def __init__(self, directory: str, image_size: int) -> None:
        self.dir = directory
        self.image_size = image_size
        self._lock_fd = -1

    @staticmethod
    def for_image(path: str) -> str:
        return path + STORE_SUFFIX

    def open(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BitmapError(f"the bitmaps in {self.dir} are in use by another process "
                              "(another pynbd serving the same image?)") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.map")

    def load(self) -> list[StoredBitmap]:
        """The stored bitmaps; those the last server did not save cleanly (or whose map
        file is missing, damaged or of another image size) come back inconsistent."""
        meta_path = os.path.join(self.dir, META)
        try:
            with open(meta_path, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise BitmapError(f"{meta_path}: unreadable ({exc}); move the directory away "
                              "to start without bitmaps") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BitmapError(f"{meta_path}: not a pynbd bitmap list")
        if int(meta.get("version", 0)) > VERSION:
            raise BitmapError(f"{meta_path}: version {meta.get('version')} is newer than "
                              f"this pynbd understands ({VERSION})")
        unclean = bool(meta.get("in_use"))
        resized = int(meta.get("image_size", -1)) != self.image_size
        out = []
        for b in meta.get("bitmaps", []):
            name = check_name(b.get("name"))
            gran = check_granularity(int(b.get("granularity", DEFAULT_GRANULARITY)))
            consistent = bool(b.get("consistent", True))
            reason = str(b.get("reason") or "")
            data: bytes | None = None
            if consistent and unclean:
                consistent = False
                reason = ("the server that had it loaded did not stop cleanly: writes may "
                          "be missing from it; clear it (pynbd bitmap clear) and take a "
                          "full backup")
            elif consistent and resized:
                consistent = False
                reason = (f"the image size changed (was {meta.get('image_size')}, now "
                          f"{self.image_size}); clear it")
            if consistent:
                try:
                    with open(self._path(name), "rb") as f:
                        data = f.read()
                except OSError as exc:
                    consistent, reason = False, f"its map file is unreadable: {exc}"
                else:
                    want = b.get("sha256")
                    nchunks = (self.image_size + gran - 1) // gran
                    if want != hashlib.sha256(data).hexdigest() or len(data) != nchunks:
                        consistent, reason = False, "its map file is damaged (checksum)"
                        data = None
            out.append(StoredBitmap(name, gran, bool(b.get("checkpoint")), consistent,
                                    reason, float(b.get("created") or time.time()), data))
        return out

    def write(self, bitmaps: list[Bitmap], in_use: bool, with_data: bool) -> None:
        """The list (and, with ``with_data``, every map file: the server is stopped or
        about to stop writing). ``in_use`` says a server has them loaded."""
        entries = []
        for b in bitmaps:
            e: dict[str, Any] = {"name": b.name, "granularity": b.granularity,
                                 "checkpoint": b.checkpoint, "consistent": b.consistent,
                                 "created": b.created}
            if not b.consistent:
                e["reason"] = b.reason
            if with_data and b.consistent:
                data = b.map.snapshot()
                write_atomic(self._path(b.name), data)
                e["sha256"] = hashlib.sha256(data).hexdigest()
            entries.append(e)
        meta = {"format": FORMAT, "version": VERSION, "image_size": self.image_size,
                "in_use": in_use, "saved": time.time(), "bitmaps": entries}
        write_atomic(os.path.join(self.dir, META),
                     json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n")
        if with_data:
            keep = {f"{b.name}.map" for b in bitmaps}
            for fn in os.listdir(self.dir):
                if fn.endswith(".map") and fn not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.dir, fn))

    def remove_data(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))
