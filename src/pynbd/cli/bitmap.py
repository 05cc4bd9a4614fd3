"""``pynbd bitmap`` and ``pynbd checkpoint``: a running server's dirty bitmaps and
point-in-time views, through its control socket (docs/backup.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pynbd.cli.control import EXIT_CONTROL_UNREACHABLE, EXIT_REFUSED, add_control_argument, call
from pynbd.util.sizes import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _request(args: argparse.Namespace, request: dict[str, Any], what: str) -> dict[str, Any] | int:
    reply = call(args.control, request, timeout=120.0)
    if reply is None:
        return EXIT_CONTROL_UNREACHABLE
    if not reply.get("ok"):
        print(f"pynbd {what}: {reply.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    return reply


def _print(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def run_bitmap(args: argparse.Namespace) -> int:
    for k in ("control", "export", "quiet"):  # given before or after the action, or not
        setattr(args, k, getattr(args, k, None))
    if not args.control:
        print("pynbd bitmap: --control PATH is required", file=sys.stderr)
        return 2
    req: dict[str, Any] = {"cmd": "bitmap", "action": args.action}
    if args.export is not None:
        req["export"] = args.export
    if getattr(args, "bitmap", None):
        req["name"] = args.bitmap
    if getattr(args, "granularity", None) is not None:
        req["granularity"] = args.granularity
    reply = _request(args, req, "bitmap")
    if isinstance(reply, int):
        return reply
    if args.action == "list":
        _print(reply["bitmaps"])
    elif not args.quiet:
        _print(reply["bitmap"])
    return 0


def run_checkpoint(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "checkpoint"}
    if args.export is not None:
        req["export"] = args.export
    if args.list:
        req["list"] = True
    elif not args.checkpoint:
        print("pynbd checkpoint: name the checkpoint (or --list)", file=sys.stderr)
        return 2
    else:
        req["name"] = args.checkpoint
    if args.release:
        req["release"] = True
    if args.granularity is not None:
        req["granularity"] = args.granularity
    if args.scratch is not None:
        import os

        req["scratch_dir"] = os.path.abspath(args.scratch)
    reply = _request(args, req, "checkpoint")
    if isinstance(reply, int):
        return reply
    if args.list:
        _print(reply["views"])
    elif args.release:
        if not args.quiet:
            print(f"released {reply['released']}")
    elif not args.quiet:
        _print(reply["view"])
    return 0


def _common(p: argparse.ArgumentParser, default: object) -> None:
    """--control/--export/--quiet, accepted before or after the action."""
    p.add_argument("--control", "-s", metavar="PATH", default=default,
                   help="the server's control socket (required; pynbd serve --control PATH)")
    p.add_argument("--export", "-e", metavar="NAME", default=default,
                   help="the export (default: the default export; list: every export)")
    p.add_argument("--quiet", "-q", action="store_true", default=default,
                   help="print nothing on success")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bitmap", help="add, remove, clear or list a running server's dirty bitmaps",
        description="Named dirty bitmaps of an export: every write, trim and zeroing marks "
                    "them; clients read them as the qemu:dirty-bitmap:NAME metadata "
                    "context. They are kept next to a file image and survive a clean "
                    "restart (docs/backup.md).")
    _common(p, argparse.SUPPRESS)
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True
    for action, text in (("add", "start a new bitmap (empty: it records changes from now)"),
                         ("remove", "drop a bitmap"),
                         ("clear", "empty a bitmap (also makes an inconsistent one usable)"),
                         ("list", "print the bitmaps as JSON")):
        a = acts.add_parser(action, help=text, description=text)
        _common(a, argparse.SUPPRESS)
        if action != "list":
            a.add_argument("bitmap", metavar="BITMAP")
        if action == "add":
            a.add_argument("--granularity", "-g", type=_size, metavar="BYTES",
                           help="bytes per bit: a power of two, 512 to 1G (default 64K)")
        a.set_defaults(func=run_bitmap)

    p = sub.add_parser(
        "checkpoint", help="take or release a point-in-time view of an export",
        description="Take a checkpoint: atomically start a new dirty bitmap named "
                    "CHECKPOINT, freeze the previous checkpoint's bitmap, and publish the "
                    "read-only export NAME@CHECKPOINT showing the image as it was at that "
                    "instant (old data is saved copy-before-write into a sparse scratch "
                    "file). --release drops the view and its scratch space.")
    add_control_argument(p)
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT")
    p.add_argument("--export", "-e", metavar="NAME",
                   help="the export (default: the default export)")
    p.add_argument("--release", action="store_true",
                   help="drop the view NAME@CHECKPOINT, its scratch file and frozen bitmap")
    p.add_argument("--list", action="store_true", help="print the open views as JSON")
    p.add_argument("--granularity", "-g", type=_size, metavar="BYTES",
                   help="granularity of the new bitmap (default 64K)")
    p.add_argument("--scratch", metavar="DIR",
                   help="directory for the scratch file (default: the image's bitmap "
                        "directory, or $TMPDIR for exports without a file)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=run_checkpoint)
