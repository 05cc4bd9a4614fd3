"""``pynbd backup URI DIR``, ``pynbd restore DIR TARGET`` and ``pynbd prune DIR``: backup
chains of NBD exports (full, then incremental from dirty bitmaps), rebuilding or
verifying any point of one, and deleting its oldest points (docs/backup.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar


def _bar(stream: TextIO, label: str) -> Callable[[int, int], None]:
    start = time.monotonic()
    last = [0.0]

    def draw(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-6) / (1 << 20)
        frac = min(done / total, 1.0) if total else 1.0
        bar = "#" * int(frac * 40)
        stream.write(f"\r{label} [{bar:<40}] {frac * 100:5.1f}% {done / (1 << 20):9.1f} MiB "
                     f"{rate:8.1f} MiB/s")
        stream.flush()
    return draw


def _show(args: argparse.Namespace) -> bool:
    return bool(args.progress if args.progress is not None else sys.stderr.isatty())


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


T = TypeVar("T")


def _attempt(cmd: str, show: bool, fn: Callable[[], T],
             errors: tuple[type[BaseException], ...]) -> T | None:
    """``fn()``, ending the progress line; None after printing one of ``errors``."""
    try:
        res = fn()
    except errors as exc:
        if show:
            sys.stderr.write("\n")
        print(f"pynbd {cmd}: {exc}", file=sys.stderr)
        return None
    if show:
        sys.stderr.write("\n")
    return res


def run_backup(args: argparse.Namespace) -> int:
    from pynbd.backup.chain import ChainError
    from pynbd.backup.engine import BackupError, BackupOptions, backup
    from pynbd.protocol.errors import ProtocolError

    show = _show(args)
    opts = BackupOptions(full=args.full, bitmap=args.bitmap, checkpoint=args.checkpoint,
                         connections=args.connections, requests=args.requests,
                         format=args.format, compress=args.compress,
                         progress=_bar(sys.stderr, "backup") if show else None)
    res = _attempt("backup", show, lambda: backup(args.uri, args.dir, opts),
                   (BackupError, ChainError, ProtocolError, OSError))
    if res is None:
        return 1
    b = res.backup
    if args.json:
        json.dump(b.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        kind = b.type if b.bitmap is None else f"incremental, bitmap {b.bitmap}"
        print(f"backup {b.index} ({kind}) of {b.export or '(default export)'}"
              + (f" at checkpoint {b.checkpoint}" if b.checkpoint else "")
              + f": {_mib(b.data_bytes)} data, {_mib(b.zero_bytes)} zero in "
              f"{res.seconds:.2f} s -> {args.dir}/{b.file}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from pynbd.backup.chain import Chain, ChainError
    from pynbd.backup.restore import RestoreError, restore
    from pynbd.protocol.errors import ProtocolError

    if args.list:
        try:
            chain = Chain.open(args.dir)
        except ChainError as exc:
            print(f"pynbd restore: {exc}", file=sys.stderr)
            return 1
        out: dict[str, Any] = {"size": chain.size, "backups": [b.as_dict()
                                                               for b in chain.backups]}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.verify:
        return _verify(args)
    if not args.target:
        print("pynbd restore: give TARGET (a file, block device or NBD URI), --verify or "
              "--list", file=sys.stderr)
        return 2
    show = _show(args)
    bar = _bar(sys.stderr, "restore") if show else None
    res = _attempt("restore", show,
                   lambda: restore(args.dir, args.target, args.at, progress=bar),
                   (RestoreError, ChainError, ProtocolError, OSError, ValueError))
    if res is None:
        return 1
    used = ", ".join(str(b.index) for b in res.backups)
    print(f"restored backup {res.at} (from backups {used}) to {args.target}: "
          f"{_mib(res.data_bytes)} data, {_mib(res.zero_bytes)} zero, every range verified, "
          f"in {res.seconds:.2f} s")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pynbd.backup.chain import ChainError
    from pynbd.backup.restore import RestoreError, verify

    if args.target:
        print("pynbd restore: --verify takes no TARGET", file=sys.stderr)
        return 2
    show = _show(args)
    bar = _bar(sys.stderr, "verify") if show else None
    res = _attempt("restore", show, lambda: verify(args.dir, args.at, progress=bar),
                   (RestoreError, ChainError, OSError))
    if res is None:
        return 1
    used = ", ".join(str(b.index) for b in res.backups)
    print(f"verified backups {used}: {_mib(res.data_bytes)} data match their checksums "
          f"({_mib(res.zero_bytes)} zero) in {res.seconds:.2f} s")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from pynbd.backup.chain import ChainError
    from pynbd.backup.prune import PruneError, prune

    show = _show(args) and not args.dry_run
    bar = _bar(sys.stderr, "rebuild") if show else None
    res = _attempt("prune", show,
                   lambda: prune(args.dir, args.keep, dry_run=args.dry_run, progress=bar),
                   (PruneError, ChainError, OSError))
    if res is None:
        return 1
    if args.json:
        json.dump({"dry_run": args.dry_run, "kept": [b.index for b in res.kept],
                   "removed": [b.index for b in res.removed],
                   "synthesized": None if res.synthesized is None else res.synthesized.index},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    verb = "would remove" if args.dry_run else "removed"
    if not res.removed:
        print(f"nothing to prune: {len(res.kept)} backup(s), --keep {args.keep}")
        return 0
    print(f"{verb} backups {', '.join(str(b.index) for b in res.removed)}; kept "
          f"{', '.join(str(b.index) for b in res.kept)}"
          + (f"; backup {res.synthesized.index} "
             + ("would become" if args.dry_run else "is now")
             + " a full backup (rebuilt and verified)" if res.synthesized else ""))
    return 0


def _progress_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", "-p", action="store_true", default=None,
                   help="draw a progress bar on stderr even if it is not a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pynbd.backup.engine import DEFAULT_CONNECTIONS, DEFAULT_REQUESTS

    p = sub.add_parser(
        "backup", help="back up an NBD export into a chain (full, then incremental)",
        description="Copy the export at URI (best: a point-in-time view NAME@CHECKPOINT, "
                    "see pynbd checkpoint) into the backup chain in DIR: the whole image "
                    "the first time, then only the ranges its qemu:dirty-bitmap context "
                    "marks dirty. Works with any server that serves dirty bitmaps "
                    "(qemu-nbd -B NAME: give --bitmap NAME).")
    p.add_argument("uri", metavar="URI")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--full", action="store_true", help="a full backup even if DIR has some")
    p.add_argument("--bitmap", "-B", metavar="NAME",
                   help="the dirty bitmap holding every change since the last backup "
                        "(default: the one named after the last backup's checkpoint)")
    p.add_argument("--checkpoint", metavar="NAME",
                   help="record this backup as of checkpoint NAME (default: the part of "
                        "the export name after '@')")
    p.add_argument("--connections", "-C", type=int, default=DEFAULT_CONNECTIONS,
                   help=f"connections (default {DEFAULT_CONNECTIONS})")
    p.add_argument("--requests", "-R", type=int, default=DEFAULT_REQUESTS,
                   help=f"reads in flight per connection (default {DEFAULT_REQUESTS})")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"),
                   help="the backup's image: raw (a sparse file) or qcow2 (an incremental "
                        "backup's image has the previous one as its backing file, so qemu "
                        "reads it as the whole disk); default: the chain's last backup's, "
                        "raw for a new chain")
    p.add_argument("--compress", "-c", action=argparse.BooleanOptionalAction, default=None,
                   help="qcow2 only: deflate each 64 KiB cluster (zlib, as qemu-img "
                        "convert -c; qemu reads it as it is); default: as the chain's last "
                        "backup")
    p.add_argument("--json", action="store_true", help="print the backup's record as JSON")
    _progress_args(p)
    p.set_defaults(func=run_backup)

    p = sub.add_parser(
        "restore", help="rebuild an image from a backup chain, verifying checksums",
        description="Rebuild the image as of backup N (default: the last) of the chain in "
                    "DIR into TARGET (a file, created or overwritten; a block device; or an "
                    "NBD URI), checking every range against the sha256 recorded at backup "
                    "time.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("target", nargs="?", metavar="TARGET")
    p.add_argument("--at", type=int, metavar="N",
                   help="the backup to restore (its index; default: the last)")
    p.add_argument("--list", action="store_true", help="print the chain as JSON")
    p.add_argument("--verify", action="store_true",
                   help="write nothing: check every backup's data against its checksums "
                        "(with --at N: the backups that rebuild N)")
    _progress_args(p)
    p.set_defaults(func=run_restore)

    p = sub.add_parser(
        "prune", help="delete the oldest backups of a chain, keeping the newest N",
        description="Keep the newest N backups of the chain in DIR restorable and delete "
                    "the older ones. When the oldest kept backup is incremental, it is "
                    "first rebuilt as a full backup (every range verified) under its own "
                    "index and file names, so later qcow2 backups keep their backing "
                    "file. Each step leaves a usable chain if interrupted.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--keep", type=int, required=True, metavar="N",
                   help="how many of the newest backups to keep (at least 1)")
    p.add_argument("--dry-run", "-n", action="store_true", help="say what would happen")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _progress_args(p)
    p.set_defaults(func=run_prune)
