"""``pynbd status`` and ``pynbd acl``: talk to a running server's control socket."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pynbd.server.control import control_request

EXIT_CONTROL_UNREACHABLE = 3
EXIT_REFUSED = 1


def call(path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any] | None:
    """One control request; prints a clear error and returns None on failure."""
    try:
        reply = control_request(path, request, timeout=timeout)
    except FileNotFoundError:
        print(f"pynbd: no control socket at {path} (is the server running with --control?)",
              file=sys.stderr)
        return None
    except (OSError, ValueError) as exc:
        print(f"pynbd: control socket {path}: {exc}", file=sys.stderr)
        return None
    return reply


def add_control_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", "-s", required=True, metavar="PATH",
                   help="the server's control socket (pynbd serve --control PATH)")


def run_status(args: argparse.Namespace) -> int:
    reply = call(args.control, {"cmd": "status"})
    if reply is None:
        return EXIT_CONTROL_UNREACHABLE
    if not reply.get("ok"):
        print(f"pynbd status: {reply.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    json.dump(reply["status"], sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def run_acl(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"cmd": "acl"}
    if args.entries or args.clear:
        request["entries"] = list(args.entries)
    if args.default_deny is not None:
        request["default_deny"] = args.default_deny
        request.setdefault("entries", list(args.entries))
    reply = call(args.control, request)
    if reply is None:
        return EXIT_CONTROL_UNREACHABLE
    if not reply.get("ok"):
        print(f"pynbd acl: {reply.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    for entry in reply.get("entries", []):
        print(entry)
    if reply.get("disconnected"):
        print(f"disconnected {reply['disconnected']} client(s)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="show a running server's status as JSON",
                       description="Print the status of a running server (JSON: pid, exports, "
                                   "sizes in bytes, clients, counters, uptime in seconds).")
    add_control_argument(p)
    p.set_defaults(func=run_status)

    p = sub.add_parser("acl", help="show or replace a running server's access list",
                       description="With CIDR arguments, replace the access list (clients no "
                                   "longer allowed are disconnected); without, print it.")
    add_control_argument(p)
    p.add_argument("entries", nargs="*", metavar="CIDR")
    p.add_argument("--clear", action="store_true", help="empty the list (allow everyone)")
    dd = p.add_mutually_exclusive_group()
    dd.add_argument("--default-deny", dest="default_deny", action="store_true", default=None,
                    help="an empty list refuses everyone")
    dd.add_argument("--default-allow", dest="default_deny", action="store_false",
                    help="an empty list allows everyone")
    p.set_defaults(func=run_acl)
