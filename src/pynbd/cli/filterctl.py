"""``pynbd filter``: change a running server's filter parameters (every worker process).

    pynbd filter --control /run/pynbd.ctl rate rate=10M connection-rate=1M
    pynbd filter --control /run/pynbd.ctl --export disk2 error rate=0
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pynbd.backends.base import ConfigError
from pynbd.backends.loader import parse_kv
from pynbd.cli.control import EXIT_CONTROL_UNREACHABLE, add_control_argument, call

#: bad parameters (refused here or by the server): the same status as pynbd serve's
EXIT_BAD_PARAMS = 2


def run_filter(args: argparse.Namespace) -> int:
    try:
        params = parse_kv(list(args.params), f"filter {args.filter}")
    except ConfigError as exc:
        print(f"pynbd filter: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    if not params:
        print(f"pynbd filter: no KEY=VALUE given for filter {args.filter!r}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    request: dict[str, Any] = {"cmd": "filter", "export": args.export, "filter": args.filter,
                               "params": params}
    reply = call(args.control, request)
    if reply is None:
        return EXIT_CONTROL_UNREACHABLE
    if not reply.get("ok"):
        print(f"pynbd filter: {reply.get('error')}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    if args.json:
        json.dump(reply, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        changed = ", ".join(f"{k}={v}" for k, v in params.items())
        print(f"{args.filter}: {changed} ({reply.get('layers', 0)} layer(s))")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "filter", help="change a running server's filter parameters",
        description="Change parameters of a filter of a running server at run time (e.g. "
                    "the rate filter's limits), in every worker process. Exit status 2 "
                    "when the server refuses them (unknown filter or parameter, bad value, "
                    "a parameter that cannot change), 3 when the control socket is "
                    "unreachable.")
    add_control_argument(p)
    p.add_argument("--export", default="", metavar="NAME",
                   help="the export whose filter to change (default: the default export)")
    p.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    p.add_argument("filter", metavar="FILTER", help="the filter's name, e.g. rate")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=run_filter)
