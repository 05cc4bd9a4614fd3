"""A backup chain on disk: what ``pynbd backup`` writes and ``pynbd restore`` reads.

::

    DIR/manifest.json     the chain: image size, and one entry per backup, in order
    DIR/0000.raw          backup 0 (full): a sparse raw image of the whole disk
    DIR/0000.json         its ranges: every range of the disk, data (with sha256) or zero
    DIR/0001.raw          backup 1 (incremental): a sparse raw image of the same size in
                          which only the ranges that changed are written
    DIR/0001.json         its ranges: the changed ranges only
    ...

With ``--format qcow2`` a backup's image is ``NNNN.qcow2`` instead (backup/qcow2.py): a
full one holds the whole disk, an incremental one holds the clusters that changed and
names the previous backup as its backing file, so qemu reads any of them as the whole
disk at that point. Its ``.json`` is the same. A chain with a qcow2 backup, or whose oldest
backups were pruned (backup/prune.py: indices then start above 0), is written as
manifest version 2 (an older pynbd refuses it instead of misreading it).

Ranges are ``[offset, length, sha256]`` (data: the bytes at that offset of the ``.raw``
file) or ``[offset, length, null]`` (the range reads as zeros); no range crosses a
``piece`` boundary (1 MiB), so each checksum covers at most one piece. The image as of
backup N is the last full backup at or before N with the ranges of every later backup
up to N applied in order. Any ``.raw`` file is an ordinary raw image (``qemu-img info``,
``losetup``); a full one is the disk as it was.

A backup joins the chain only when its files are complete and fsynced: ``manifest.json``
is replaced last (write, fsync, rename). Files of a backup that did not finish are not
listed and are removed by the next run.

Who may use a chain at once (:func:`locked`, an ``flock`` on the directory): one
``pynbd backup`` or ``pynbd prune`` (they change it), or any number of ``pynbd
restore`` (they read it); anything else is refused at once with an error saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pynbd.server.bitmaps import write_atomic

#: the names pynbd gives a chain's files (and their temporary forms)
_BACKUP_FILE = re.compile(r"\d{4,}\.(raw|qcow2|json)(\.full\.tmp|\.qcow2\.tmp|\.tmp)?")
MIN_PIECE = 64 << 10
MAX_PIECE = 64 << 20
FORMAT = "pynbd-backup"
VERSION = 2
#: the manifest version a chain without qcow2 backups is written as (read by any pynbd)
VERSION_RAW = 1
IMAGE_FORMATS = ("raw", "qcow2")
PIECE = 1 << 20
MANIFEST = "manifest.json"

#: (offset, length, sha256 hex or None for zeros)
Range = tuple[int, int, str | None]


class ChainError(Exception):
    """The backup directory is not usable (shown to the user)."""


@dataclass
class Backup:
    index: int
    type: str  # "full" or "incremental"
    file: str
    ranges_file: str
    source: str
    export: str
    checkpoint: str | None
    bitmap: str | None
    started: float
    finished: float
    data_bytes: int
    zero_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_format(self) -> str:
        """``raw`` or ``qcow2``: how the backup's data file is laid out."""
        return str(self.extra.get("format", "raw"))

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "type": self.type, "file": self.file,
                "ranges": self.ranges_file, "source": self.source, "export": self.export,
                "checkpoint": self.checkpoint, "bitmap": self.bitmap,
                "started": _iso(self.started), "finished": _iso(self.finished),
                "seconds": round(self.finished - self.started, 3),
                "data_bytes": self.data_bytes, "zero_bytes": self.zero_bytes, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Backup:
        known = {"index", "type", "file", "ranges", "source", "export", "checkpoint",
                 "bitmap", "started", "finished", "seconds", "data_bytes", "zero_bytes"}
        return cls(int(d["index"]), str(d["type"]), str(d["file"]), str(d["ranges"]),
                   str(d.get("source", "")), str(d.get("export", "")), d.get("checkpoint"),
                   d.get("bitmap"), _parse_iso(d.get("started")), _parse_iso(d.get("finished")),
                   int(d.get("data_bytes", 0)), int(d.get("zero_bytes", 0)),
                   {k: v for k, v in d.items() if k not in known})


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _parse_iso(s: Any) -> float:
    if not isinstance(s, str):
        return 0.0
    import calendar

    main, _, frac = s.rstrip("Z").partition(".")
    try:
        return calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S")) + (
            int(frac) / 1000 if frac.isdigit() else 0.0)
    except ValueError:
        return 0.0


class Chain:
    def __init__(self, directory: str, size: int | None = None,
                 backups: list[Backup] | None = None, piece: int = PIECE) -> None:
        self.dir = directory
        self.size = size
        self.piece = piece
        self.backups = backups or []

    @classmethod
    def open(cls, directory: str, create: bool = False) -> Chain:
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read())
        except FileNotFoundError:
            if not os.path.isdir(directory):
                if not create:
                    raise ChainError(f"{directory} is not a directory") from None
                os.makedirs(directory, exist_ok=True)
            elif not create:
                raise ChainError(f"{directory} holds no backup chain ({MANIFEST} is "
                                 "missing)") from None
            else:
                strays = sorted(fn for fn in os.listdir(directory) if _BACKUP_FILE.fullmatch(fn)
                                and not fn.startswith("0000."))
                if strays:  # a chain whose manifest is gone: never "clean" it away
                    raise ChainError(
                        f"{directory} holds backup files ({', '.join(strays[:3])}"
                        f"{', ...' if len(strays) > 3 else ''}) but no {MANIFEST}: put the "
                        "manifest back, or back up into an empty directory") from None
            return cls(directory)
        except (OSError, ValueError) as exc:
            raise ChainError(f"{path}: unreadable: {exc}") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ChainError(f"{path} is not a pynbd backup manifest")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ChainError(f"{path}: damaged (version {version!r})")
        if version > VERSION:
            raise ChainError(f"{path}: version {version} is newer than this pynbd "
                             f"({VERSION})")
        try:
            backups = [Backup.from_dict(b) for b in d.get("backups", [])]
            size, piece = int(d["size"]), int(d.get("piece", PIECE))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ChainError(f"{path}: damaged ({type(exc).__name__}: {exc})") from exc
        first = backups[0].index if backups else 0
        for i, b in enumerate(backups):
            if b.index != first + i or first < 0 or b.type not in ("full", "incremental") or (
                    i == 0 and b.type != "full") or (
                    b.image_format not in IMAGE_FORMATS) or any(
                    not _BACKUP_FILE.fullmatch(f) or f.endswith(".tmp")
                    for f in (b.file, b.ranges_file)) or b.file == b.ranges_file:
                raise ChainError(f"{path}: damaged (backup #{i} is not a backup of this "
                                 "chain)")
        names = [f for b in backups for f in (b.file, b.ranges_file)]
        if len(set(names)) != len(names):
            raise ChainError(f"{path}: damaged (two backups share a file)")
        if size < 0 or not MIN_PIECE <= piece <= MAX_PIECE or piece % MIN_PIECE:
            raise ChainError(f"{path}: damaged (size {size}, piece {piece})")
        return cls(directory, size, backups, piece)

    @property
    def last(self) -> Backup | None:
        return self.backups[-1] if self.backups else None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def new_names(self, image_format: str = "raw") -> tuple[int, str, str]:
        index = self.backups[-1].index + 1 if self.backups else 0
        return index, f"{index:04d}.{image_format}", f"{index:04d}.json"

    def find(self, index: int) -> int:
        """The position in :attr:`backups` of backup ``index`` (ChainError if none)."""
        first = self.backups[0].index if self.backups else 0
        pos = index - first
        if not self.backups or not 0 <= pos < len(self.backups):
            have = (f"{first} to {self.backups[-1].index}" if self.backups else "none")
            raise ChainError(f"no backup {index} in {self.dir} ({have})")
        return pos

    def clean_partial(self) -> None:
        """Remove files of backups that never joined the chain."""
        listed = {b.file for b in self.backups} | {b.ranges_file for b in self.backups}
        with contextlib.suppress(OSError):
            for fn in os.listdir(self.dir):
                if fn not in listed and (_BACKUP_FILE.fullmatch(fn) or fn == f"{MANIFEST}.tmp"):
                    os.unlink(self.path(fn))

    def ranges(self, b: Backup) -> list[Range]:
        path = self.path(b.ranges_file)
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read())
            out = [(int(r[0]), int(r[1]), r[2] if r[2] is None else str(r[2]))
                   for r in d["ranges"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ChainError(f"backup {b.index}: {path}: unreadable: {exc}") from exc
        size, piece = self.size or 0, self.piece
        end = 0
        for off, ln, _h in sorted(out):  # bounds every later read to one piece
            if off < 0 or ln <= 0 or off + ln > size or off // piece != (off + ln - 1) // piece:
                raise ChainError(f"backup {b.index}: {path}: damaged (range {off}+{ln} is "
                                 f"not inside one {piece}-byte piece of the {size}-byte "
                                 "image)")
            if off < end:
                raise ChainError(f"backup {b.index}: {path}: damaged (range {off}+{ln} "
                                 "overlaps another)")
            end = off + ln
        return out

    def add(self, b: Backup, ranges: list[Range]) -> None:
        """Join ``b`` to the chain (its data file is complete and fsynced)."""
        doc = {"index": b.index, "size": self.size, "piece": self.piece,
               "ranges": [list(r) for r in ranges]}
        write_atomic(self.path(b.ranges_file),
                     json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        self.backups.append(b)
        self.write()

    def write(self) -> None:
        version = VERSION if any(b.image_format != "raw" for b in self.backups) or (
            self.backups and self.backups[0].index) else VERSION_RAW
        d = {"format": FORMAT, "version": version, "size": self.size, "piece": self.piece,
             "backups": [b.as_dict() for b in self.backups]}
        write_atomic(self.path(MANIFEST), json.dumps(d, indent=1).encode() + b"\n")

    def restore_plan(self, at: int | None) -> list[Backup]:
        """The backups that rebuild the image as of backup ``at`` (default: the last)."""
        if not self.backups:
            raise ChainError(f"{self.dir} holds no backup yet")
        n = len(self.backups) - 1 if at is None else self.find(at)
        start = max(i for i in range(n + 1) if self.backups[i].type == "full")
        return self.backups[start:n + 1]


@contextlib.contextmanager
def locked(directory: str, exclusive: bool, create: bool = False) -> Iterator[None]:
    """Hold the chain in ``directory`` for a change (``exclusive``) or for reading; a
    ChainError at once if another process holds it the other way."""
    if create:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ChainError(f"{directory}: {exc.strerror or exc}") from exc
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ChainError(f"{directory} is not a directory") from None
    except OSError as exc:
        raise ChainError(f"{directory}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                raise ChainError(f"{directory}: cannot lock it: {exc.strerror or exc}"
                                 ) from exc
            what = ("a pynbd backup or prune is changing it, or a restore is reading it"
                    if exclusive else "a pynbd backup or prune is changing it")
            raise ChainError(f"{directory} is in use: {what}; try again when it has "
                             "finished") from None
        yield
    finally:
        os.close(fd)


def split(offset: int, length: int, piece: int = PIECE) -> list[tuple[int, int]]:
    """[offset, offset+length) cut at every multiple of ``piece``."""
    out = []
    end = offset + length
    while offset < end:
        stop = min(end, (offset // piece + 1) * piece)
        out.append((offset, stop - offset))
        offset = stop
    return out
