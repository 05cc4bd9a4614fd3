"""``pynbd read`` / ``pynbd write``: one-off ranges, to stdout / from stdin.

Exit status is non-zero on any failure (connection, NBD error, short input)."""

from __future__ import annotations

import argparse
import sys

from pynbd.cli.control import call
from pynbd.util.sizes import parse_size

EXIT_FAILED = 1
EXIT_USAGE = 2
MAX_REQ = 4 * 1024 * 1024


def _uri(args: argparse.Namespace) -> str | None:
    if args.uri:
        return str(args.uri)
    if not args.control:
        print(f"pynbd {args.command}: give a URI or --control PATH", file=sys.stderr)
        return None
    reply = call(args.control, {"cmd": "status"})
    if reply is None or not reply.get("ok") or not reply["status"].get("uris"):
        print(f"pynbd {args.command}: cannot learn the server's URI from {args.control}",
              file=sys.stderr)
        return None
    return str(reply["status"]["uris"][0])


def run_read(args: argparse.Namespace) -> int:
    from pynbd.client import ProtocolError, connect

    uri = _uri(args)
    if uri is None:
        return EXIT_USAGE
    try:
        with connect(uri, timeout=30.0) as c:
            size = args.size if args.size is not None else c.size - args.offset
            if args.offset < 0 or size < 0 or args.offset + size > c.size:
                print(f"pynbd read: range [{args.offset}, {args.offset + size}) is outside the "
                      f"export (size {c.size})", file=sys.stderr)
                return EXIT_USAGE
            out = sys.stdout.buffer
            pos, end = args.offset, args.offset + size
            while pos < end:
                n = min(MAX_REQ, end - pos)
                out.write(c.read(pos, n))
                pos += n
            out.flush()
    except (OSError, ProtocolError) as exc:
        print(f"pynbd read: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def run_write(args: argparse.Namespace) -> int:
    from pynbd.client import ProtocolError, connect

    uri = _uri(args)
    if uri is None:
        return EXIT_USAGE
    data = sys.stdin.buffer.read() if args.size is None else sys.stdin.buffer.read(args.size)
    if args.size is not None and len(data) != args.size:
        print(f"pynbd write: stdin ended after {len(data)} of {args.size} bytes",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        with connect(uri, timeout=30.0) as c:
            if args.offset < 0 or args.offset + len(data) > c.size:
                print(f"pynbd write: range [{args.offset}, {args.offset + len(data)}) is outside "
                      f"the export (size {c.size})", file=sys.stderr)
                return EXIT_USAGE
            mv = memoryview(data)
            pos = 0
            while pos < len(mv):
                n = min(MAX_REQ, len(mv) - pos)
                c.write(args.offset + pos, mv[pos:pos + n])
                pos += n
            if c.can_flush():
                c.flush()
            res = c.close()
            if res.error:
                print(f"pynbd write: {res.error}", file=sys.stderr)
                return EXIT_FAILED
    except (OSError, ProtocolError) as exc:
        print(f"pynbd write: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, func, helptext in (
            ("read", run_read, "read a range of an NBD export to stdout"),
            ("write", run_write, "write stdin to a range of an NBD export (then FLUSH)")):
        p = sub.add_parser(name, help=helptext,
                           description=helptext + ". Exit status 0 only if every byte was "
                                                  "transferred (1 failure, 2 usage).")
        p.add_argument("uri", nargs="?", metavar="URI", help="nbd://... or nbd+unix://...")
        p.add_argument("--control", "-s", metavar="PATH",
                       help="instead of URI: the server's control socket")
        p.add_argument("--from", dest="offset", type=parse_size, default=0, metavar="OFFSET",
                       help="byte offset (default 0)")
        p.add_argument("--size", type=parse_size, default=None, metavar="N",
                       help="bytes (read: default to the end; write: default all of stdin)")
        p.set_defaults(func=func)
