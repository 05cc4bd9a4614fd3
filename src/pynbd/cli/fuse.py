"""``pynbd fuse URI MOUNTPOINT``: an NBD export as a file (like libnbd's nbdfuse).

The export appears as MOUNTPOINT/nbd (``--filename`` renames it), or as MOUNTPOINT
itself when MOUNTPOINT is a regular file. Runs in the foreground; prints the file's
path on stdout once it is usable (and writes ``--pidfile``); stops and unmounts on
SIGINT/SIGTERM or ``fusermount3 -u MOUNTPOINT``. Exit status 0 after such a stop, 1 when
the mount failed or the server went away (2 for usage errors). See docs/fuse.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pynbd.backends import parse_size
from pynbd.client import URIError, parse_uri


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fuse", help="mount an NBD export as a file (like nbdfuse)",
        description="Mount the NBD export named by URI as one file in MOUNTPOINT "
                    "(MOUNTPOINT/nbd, or MOUNTPOINT itself if it is a regular file). "
                    "Reads and writes go to the server, fsync flushes, fallocate "
                    "punch-hole/zero-range trims and zeroes. Runs in the foreground "
                    "and prints the file's path when it is ready; stop it with "
                    "SIGINT/SIGTERM or fusermount3 -u MOUNTPOINT.")
    p.add_argument("uri", metavar="URI", help="nbd://, nbds://, nbd+unix://, nbds+unix://")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a directory or regular file")
    p.add_argument("--connections", "-C", type=int, default=4, metavar="N",
                   help="connections when the server allows multi-conn (default 4)")
    p.add_argument("--readonly", "--read-only", "-r", action="store_true",
                   help="mount read-only (automatic for a read-only export)")
    p.add_argument("--filename", default="nbd", metavar="NAME",
                   help="name of the file in MOUNTPOINT (default nbd)")
    p.add_argument("-o", dest="fuse_options", action="append", default=[],
                   metavar="FUSE-OPTION",
                   help="mount option for FUSE, e.g. allow_other, kernel_cache, direct_io "
                        "(repeatable, comma-separated)")
    p.add_argument("--pidfile", "-P", metavar="PATH",
                   help="write the process id here once the mount is ready")
    p.add_argument("--single-thread", "-s", action="store_true",
                   help="serve FUSE requests on one thread")
    p.add_argument("--readahead", type=parse_size, default=4 << 20, metavar="SIZE",
                   help="kernel readahead for the file (default 4M; needs root, like "
                        "blockdev --setra; 128K is the kernel's own default)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up on a server that does not answer within SECONDS "
                        "(then readers get EIO and the mount ends; 0 = wait forever; "
                        "default 60)")
    p.add_argument("--reconnect", type=float, default=0.0, metavar="SECONDS",
                   help="when the connections break, keep the mount and try to reconnect "
                        "for up to SECONDS, then send the waiting requests again "
                        "(default 0: the mount ends at once)")
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="log to stderr (-vv: every FUSE request, from libfuse)")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.WARNING,
                        stream=sys.stderr, format="pynbd fuse: %(message)s")
    if args.verbose:
        logging.getLogger("pynbd").setLevel(logging.DEBUG)
    if args.connections < 1:
        print("pynbd fuse: --connections must be at least 1", file=sys.stderr)
        return 2
    if args.reconnect < 0:
        print("pynbd fuse: --reconnect must not be negative", file=sys.stderr)
        return 2
    try:
        uri = parse_uri(args.uri)
    except URIError as exc:
        print(f"pynbd fuse: {exc}", file=sys.stderr)
        return 2

    from pynbd.fuse.export import open_export
    from pynbd.fuse.mount import (
        BindingMissing,
        MountError,
        MountOptions,
        file_mode,
        load_binding,
        serve,
    )

    try:
        load_binding()
        file_mode(args.mountpoint)
    except (BindingMissing, MountError) as exc:
        print(f"pynbd fuse: {exc}", file=sys.stderr)
        return 1
    try:
        export = open_export(uri, connections=args.connections, read_only=args.readonly,
                             timeout=args.timeout or None, reconnect=args.reconnect)
    except Exception as exc:
        print(f"pynbd fuse: cannot connect to {args.uri}: {exc}", file=sys.stderr)
        return 1
    f = export.features
    logging.getLogger("pynbd.fuse").info(
        "export: %d bytes, %s, %d connection(s)%s, flush=%s trim=%s zero=%s",
        f.size, "read-only" if f.read_only else "read-write", f.connections,
        " (multi-conn)" if f.multi_conn else "", f.can_flush, f.can_trim, f.can_zero)

    def ready(path: str) -> None:
        print(path, flush=True)

    opts = MountOptions(args.mountpoint, filename=args.filename,
                        fuse_options=args.fuse_options, single_thread=args.single_thread,
                        debug=args.verbose > 1, pidfile=args.pidfile,
                        readahead=args.readahead)
    try:
        lost = serve(export, opts, ready)
    except MountError as exc:
        export.close()
        print(f"pynbd fuse: {exc}", file=sys.stderr)
        return 1
    results = export.close()
    if lost is not None:
        print(f"pynbd fuse: the NBD server went away ({lost}); unmounted "
              f"{args.mountpoint}", file=sys.stderr)
        return 1
    bad = [r for r in results if not r.flushed and r.error]
    if bad and not f.read_only:
        print(f"pynbd fuse: closing the connection did not flush: {bad[0].error}",
              file=sys.stderr)
        return 1
    return 0
