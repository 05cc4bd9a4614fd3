"""``pynbd copy SRC DST``: copy between NBD exports, files and streams (like nbdcopy).

SRC and DST are NBD URIs, local files (or block devices), or ``-`` for stdin/stdout.
This module is the command line: arguments, the progress bar, messages and exit codes.
The copy itself -- sparse-aware, several connections, zero-copy forwarding, checksums --
is :mod:`pynbd.copy`. ``--checksum ALG`` prints the digest of the copied data;
``--verify`` re-reads the destination and compares. A progress bar is drawn on stderr
when it is a terminal (or with ``--progress``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pynbd.copy import DEFAULT_REQUEST_SIZE, DEFAULT_REQUESTS, CopyError, Options, copy, digest_of
from pynbd.util.sizes import parse_size


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "copy", help="copy between NBD exports, files and streams (like nbdcopy)",
        description="Copy SRC to DST. Each is an NBD URI, a file or block device, or "
                    "'-' for stdin/stdout. Sparse-aware.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--connections", "-C", type=int, default=4,
                   help="connections per side (used only with CAN_MULTI_CONN; default 4)")
    p.add_argument("--threads", "-T", type=int, default=os.cpu_count() or 1,
                   help="worker threads, each with its own connection pair; caps "
                        "--connections (default: number of CPUs)")
    p.add_argument("--requests", "-R", type=int, default=DEFAULT_REQUESTS,
                   help=f"requests in flight per connection (default {DEFAULT_REQUESTS})")
    p.add_argument("--request-size", type=parse_size, default=DEFAULT_REQUEST_SIZE,
                   help="bytes per read/write request (default 1M)")
    p.add_argument("--allocated", action="store_true",
                   help="fully allocate the destination (zero with NO_HOLE, no holes)")
    p.add_argument("--destination-is-zero", "--target-is-zero", action="store_true",
                   help="the destination already reads as zeroes: skip zero ranges "
                        "(a stream destination still gets every byte)")
    p.add_argument("--checksum", nargs="?", const="sha256", metavar="ALG",
                   help="print the digest (default sha256) of the copied data")
    p.add_argument("--verify", action="store_true",
                   help="re-read the destination and compare its digest (implies --checksum)")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", "-p", action="store_true", default=None,
                      help="draw a progress bar on stderr even if it is not a terminal")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-extended-headers", dest="extended_headers", action="store_false",
                   help="do not ask NBD servers for extended headers (64-bit requests)")
    p.add_argument("--timeout", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=handler)


def _progress_bar(stream: TextIO) -> Callable[[int, int | None], None]:
    start = time.monotonic()

    def draw(done: int, total: int | None) -> None:
        elapsed = max(time.monotonic() - start, 1e-6)
        rate = done / elapsed / (1 << 20)
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * 40)
            stream.write(f"\r[{bar:<40}] {frac * 100:5.1f}% {rate:8.1f} MiB/s")
        else:
            stream.write(f"\r{done / (1 << 20):10.1f} MiB {rate:8.1f} MiB/s")
        stream.flush()
    return draw


def handler(args: argparse.Namespace) -> int:
    if args.connections < 1 or args.requests < 1:
        sys.stderr.write("pynbd copy: --connections and --requests must be >= 1\n")
        return 1
    algorithm = args.checksum or ("sha256" if args.verify else None)
    if algorithm is not None:
        try:
            import hashlib
            hashlib.new(algorithm)
        except ValueError:
            sys.stderr.write(f"pynbd copy: unknown checksum algorithm {algorithm!r}\n")
            return 1
    if args.verify and args.dst == "-":
        sys.stderr.write("pynbd copy: --verify cannot re-read stdout\n")
        return 1
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    opts = Options(connections=args.connections, threads=max(1, args.threads),
                   requests=args.requests,
                   request_size=args.request_size, allocated=args.allocated,
                   destination_is_zero=args.destination_is_zero, checksum=algorithm,
                   extended_headers=args.extended_headers,
                   progress=_progress_bar(sys.stderr) if show else None)
    out = sys.stderr if args.dst == "-" else sys.stdout
    try:
        total, digest = copy(args.src, args.dst, opts, args.timeout)
        if show:
            sys.stderr.write("\n")
        if digest is not None:
            out.write(f"{algorithm}:{digest}\n")
            out.flush()
        if args.verify:
            assert algorithm is not None and digest is not None
            again = digest_of(args.dst, algorithm, total, args.timeout)
            if again != digest:
                sys.stderr.write(f"pynbd copy: verify FAILED: destination {algorithm} is "
                                 f"{again}, copied data was {digest}\n")
                return 1
            out.write("verify: OK\n")
        return 0
    except (OSError, ValueError, RuntimeError, CopyError) as exc:
        sys.stderr.write(f"pynbd copy: {exc}\n")
        return 1
    except Exception as exc:  # protocol errors from a server
        from pynbd.protocol.errors import ProtocolError
        if isinstance(exc, ProtocolError):
            sys.stderr.write(f"pynbd copy: {exc}\n")
            return 1
        raise


def main(argv: list[str] | None = None) -> int:
    """Run ``pynbd copy`` on its own (``python -m pynbd.cli.copy``)."""
    parser = argparse.ArgumentParser(prog="pynbd")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["copy", *(sys.argv[1:] if argv is None else argv)])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
