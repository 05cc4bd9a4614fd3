"""``pynbd prune DIR --keep N``: keep the newest N points of a backup chain restorable
and delete the older backups, folding them into a *synthetic full* backup when the
oldest kept one is incremental.

The synthetic full of backup K is the image as of K, rebuilt from the chain with every
range checked against its sha256 (backup/restore.py), written in K's format under K's
own file names. So K keeps its index, checkpoint and names: `--at K` still means the
same point, and a qcow2 backup K+1 still finds its backing file ``K.qcow2``.

Each step leaves a chain that restores every kept point correctly:

1. the new data file is written under a temporary name and fsynced;
2. it is renamed over K's data file: under the old manifest K's ranges now read the
   same bytes from the full image (K's image as of K holds, at K's ranges, exactly
   what K recorded), and qemu's backing chains see the whole disk;
3. K's ranges file is replaced (the whole image; still correct under the old manifest,
   applied on top of the older backups);
4. the manifest is replaced: K is full and first, the older backups are gone from it;
5. their files are deleted (files a crash leaves unlisted are removed by the next run
   of ``pynbd backup`` or ``pynbd prune``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pynbd.backup.chain import Backup, Chain, ChainError, Range, locked, split
from pynbd.backup.engine import COMPRESS_LEVEL
from pynbd.backup.qcow2 import Qcow2Error, Qcow2Writer
from pynbd.backup.restore import RestoreError, restore
from pynbd.server.bitmaps import write_atomic

SEEK_DATA = getattr(os, "SEEK_DATA", 3)


class PruneError(Exception):
    """The chain cannot be pruned as asked (shown to the user)."""


@dataclass
class PruneResult:
    kept: list[Backup]
    removed: list[Backup]
    #: the backup turned into a synthetic full one, if any
    synthesized: Backup | None


def _pieces(fd: int, size: int, piece: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, maybe data) for each ``piece`` of a sparse file: a piece
    without a data extent (SEEK_DATA) is known to be zeros."""
    for off, n in split(0, size, piece):
        try:
            data = os.lseek(fd, off, SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no SEEK_DATA here: read everything
                data = off
            else:
                data = size  # only a hole is left
        yield off, n, data < off + n


def _synthesize(chain: Chain, b: Backup,
                progress: Callable[[int, int], None] | None) -> tuple[list[Range], int, int]:
    """Write the full image as of ``b`` to ``b.file`` (steps 1-2); its ranges."""
    size = chain.size
    assert size is not None
    raw_tmp = chain.path(f"{b.file}.full.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(raw_tmp)
    try:
        # private from the start: it becomes the backup (backups are 0600)
        os.close(os.open(raw_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        restore(chain.dir, raw_tmp, b.index, progress=progress, lock=False)
    except (RestoreError, OSError) as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(raw_tmp)
        why = exc if isinstance(exc, RestoreError) else exc.strerror or exc
        raise PruneError(f"cannot rebuild backup {b.index} in {chain.dir}: {why}") from exc
    ranges: list[Range] = []
    zero = bytes(chain.piece)
    qtmp = chain.path(f"{b.file}.qcow2.tmp")
    fd = os.open(raw_tmp, os.O_RDONLY | os.O_CLOEXEC)
    qfd = -1
    try:
        writer = None
        if b.image_format == "qcow2":
            qfd = os.open(qtmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            level = COMPRESS_LEVEL if b.extra.get("compressed") else None
            writer = Qcow2Writer(qfd, size, compress=level)
        for off, n, maybe in _pieces(fd, size, chain.piece):
            if maybe:
                buf = os.pread(fd, n, off)
                if len(buf) != n:
                    raise PruneError(f"{raw_tmp}: short read at {off}")
                if buf != zero[:n]:
                    ranges.append((off, n, hashlib.sha256(buf).hexdigest()))
                    if writer is not None:
                        writer.write(off, buf)
                    continue
            ranges.append((off, n, None))
        if writer is not None:
            writer.finish()
            os.fsync(qfd)
        else:
            os.fsync(fd)
    except BaseException as exc:
        for p in (raw_tmp, qtmp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if isinstance(exc, (OSError, Qcow2Error)):
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise PruneError(f"cannot write the full image of backup {b.index} in "
                             f"{chain.dir}: {detail}") from exc
        raise
    finally:
        os.close(fd)
        if qfd >= 0:
            os.close(qfd)
    if b.image_format == "qcow2":
        os.rename(qtmp, chain.path(b.file))
        os.unlink(raw_tmp)
    else:
        os.rename(raw_tmp, chain.path(b.file))
    _fsync_dir(chain.dir)
    data = sum(n for _, n, h in ranges if h is not None)
    return ranges, data, size - data


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(directory: str, keep: int, dry_run: bool = False,
          progress: Callable[[int, int], None] | None = None) -> PruneResult:
    """Keep the newest ``keep`` backups of the chain in ``directory`` restorable; delete
    the older ones."""
    if keep < 1:
        raise PruneError("--keep must be at least 1")
    with locked(directory, exclusive=not dry_run):
        return _prune(directory, keep, dry_run, progress)


def _prune(directory: str, keep: int, dry_run: bool,
           progress: Callable[[int, int], None] | None) -> PruneResult:
    chain = Chain.open(directory)
    if not dry_run:
        chain.clean_partial()
    if len(chain.backups) <= keep:
        return PruneResult(list(chain.backups), [], None)
    kept = chain.backups[-keep:]
    removed = chain.backups[:-keep]
    base = kept[0]
    synthesized = base if base.type != "full" else None
    if dry_run:
        return PruneResult(kept, removed, synthesized)
    if synthesized is not None:
        sources = [b.index for b in chain.restore_plan(base.index)]
        ranges, data, zeros = _synthesize(chain, base, progress)
        doc = {"index": base.index, "size": chain.size, "piece": chain.piece,
               "ranges": [list(r) for r in ranges]}
        try:
            write_atomic(chain.path(base.ranges_file),
                         json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        except OSError as exc:
            raise ChainError(f"cannot write {base.ranges_file}: {exc}") from exc
        base.type = "full"
        base.data_bytes, base.zero_bytes = data, zeros
        base.extra["synthetic"] = {"from": sources}
        if base.image_format == "qcow2":
            base.extra["backing"] = None
    chain.backups = kept
    chain.write()
    listed = {b.file for b in kept} | {b.ranges_file for b in kept}
    for b in removed:
        for name in (b.file, b.ranges_file):
            if name not in listed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(chain.path(name))
    _fsync_dir(chain.dir)
    return PruneResult(kept, removed, synthesized)


__all__ = ["PruneError", "PruneResult", "prune"]
