"""``pynbd mirror``, ``pynbd mirror-speed``, ``pynbd break``: drive a migration through a
source server's control socket (``pynbd serve --control PATH``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from pynbd.cli.control import add_control_argument, call
from pynbd.migration.states import RESULT_EXIT, ExitCode, MirrorResult

EXIT_CODES_HELP = f"""exit codes:
  {ExitCode.COMPLETED:d}   migration completed (with --wait) / started (without)
  {ExitCode.CONTROL_ERROR:d}   the control command was refused (bad arguments, already running)
  {ExitCode.CONTROL_UNREACHABLE:d}   the control socket is unreachable
  {ExitCode.CONNECT_FAILED:d}  cannot connect to the destination
  {ExitCode.REJECTED:d}  the destination rejected the migration (size mismatch, read-only, ...)
  {ExitCode.BROKEN:d}  broken by the operator (pynbd break)
  {ExitCode.FAILED:d}  failed after --max-attempts attempts
  {ExitCode.IN_DOUBT:d}  in doubt: COMMIT sent, outcome unknown; clients stay paused and the
      source keeps asking the destination (see pynbd status)"""


def parse_bps(text: str) -> int:
    from pynbd.util.sizes import parse_size

    return parse_size(text)


def _summary(m: dict[str, Any]) -> str:
    return (f"{m.get('state')}: {m.get('bytes_done', 0)} bytes sent, "
            f"{m.get('bytes_left', 0)} left, {m.get('speed_bytes_per_second', 0)} B/s, "
            f"attempts {m.get('attempts', 0)}, epoch {m.get('epoch', 0)}")


def run_mirror(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "mirror", "to": args.to, "max_speed": args.max_speed,
                           "unlink": args.unlink, "downtime_ms": args.downtime_ms,
                           "max_attempts": args.max_attempts, "secure": args.secure,
                           "insecure": args.insecure, "timeout": args.timeout}
    if args.export is not None:
        req["export"] = args.export
    if args.psk_file:
        req["psk_file"] = os.path.abspath(args.psk_file)
    reply = call(args.control, req, timeout=60.0)
    if reply is None:
        return ExitCode.CONTROL_UNREACHABLE
    if not reply.get("ok"):
        err = str(reply.get("error"))
        print(f"pynbd mirror: {err}", file=sys.stderr)
        for result, code in RESULT_EXIT.items():
            if err.startswith(f"mirror {result}:"):
                return code
        return ExitCode.CONTROL_ERROR
    print(f"pynbd mirror: started to {args.to}", file=sys.stderr)
    if not args.wait:
        return ExitCode.COMPLETED
    return _wait_for_result(args)


def _wait_for_result(args: argparse.Namespace) -> int:
    """``--wait``: poll the status until the migration ends; its result's exit code."""
    status_req: dict[str, Any] = {"cmd": "migration-status"}
    if args.export is not None:
        status_req["export"] = args.export
    last = 0.0
    while True:
        time.sleep(0.2)
        st = call(args.control, status_req)
        if st is None:
            return ExitCode.CONTROL_UNREACHABLE
        if not st.get("ok"):
            print(f"pynbd mirror: {st.get('error')}", file=sys.stderr)
            return ExitCode.CONTROL_ERROR
        m = st["migration"]
        if args.verbose and time.monotonic() - last > 1.0:
            last = time.monotonic()
            print(_summary(m), file=sys.stderr)
        result = m.get("result")
        if result in RESULT_EXIT:
            if args.json:
                json.dump(m, sys.stdout, indent=2, sort_keys=True)
                sys.stdout.write("\n")
            if result == MirrorResult.COMPLETED:
                print(f"pynbd mirror: completed (epoch {m.get('epoch')}, pause "
                      f"{m.get('pause_ms')} ms)", file=sys.stderr)
            else:
                print(f"pynbd mirror: {result}: {m.get('error')}", file=sys.stderr)
            return RESULT_EXIT[result]


def run_speed(args: argparse.Namespace) -> int:
    reply = call(args.control, {"cmd": "mirror-speed", "bps": args.bps})
    if reply is None:
        return ExitCode.CONTROL_UNREACHABLE
    if not reply.get("ok"):
        print(f"pynbd mirror-speed: {reply.get('error')}", file=sys.stderr)
        return ExitCode.CONTROL_ERROR
    return 0


def run_break(args: argparse.Namespace) -> int:
    reply = call(args.control, {"cmd": "break"}, timeout=60.0)
    if reply is None:
        return ExitCode.CONTROL_UNREACHABLE
    if not reply.get("ok"):
        print(f"pynbd break: {reply.get('error')}", file=sys.stderr)
        return ExitCode.CONTROL_ERROR
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "mirror", help="migrate a served image to another host (live)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start copying the image a `pynbd serve --control PATH` server serves to "
                    "a destination while clients keep using it, then hand over: to "
                    "msgr2://HOST:PORT (a `pynbd listen` destination: resumable, verified, "
                    "two-phase commit) or to an NBD URI (any NBD server; final FLUSH, no "
                    "commit record on the far side). See docs/migration.md.",
        epilog=EXIT_CODES_HELP)
    add_control_argument(p)
    p.add_argument("--to", required=True, metavar="URI", help="msgr2://HOST:PORT or nbd://...")
    p.add_argument("--export", default=None, help="export to migrate (default: the default)")
    p.add_argument("--max-speed", type=parse_bps, default=0, metavar="BPS",
                   help="bytes/s limit for the copy (lifted for the final phase); 0 = none")
    p.add_argument("--unlink", action="store_true",
                   help="delete the source image once the destination took over")
    p.add_argument("--wait", action="store_true",
                   help="block until the migration ends; exit 0 only if it completed")
    p.add_argument("--downtime-ms", type=int, default=300, metavar="N",
                   help="pause clients for the final copy when it fits N ms (default 300)")
    p.add_argument("--max-attempts", type=int, default=5, metavar="N",
                   help="connection attempts before giving up (default 5)")
    p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="fail an attempt when the destination leaves a request unanswered "
                        "this long (default 60; the NBD handshake waits at most 15)")
    p.add_argument("--psk-file", metavar="FILE",
                   help="msgr2 pre-shared key (>= 16 bytes; the one `pynbd listen` has): "
                        "both sides prove they hold it")
    p.add_argument("--secure", action="store_true",
                   help="msgr2 secure mode: encrypt and authenticate every frame (needs "
                        "--psk-file)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a destination nobody authenticates: msgr2 without "
                        "--psk-file, or plain NBD over TCP to another host (without it "
                        "these are refused; NBD over a Unix socket or loopback, nbds:// "
                        "with a verified certificate and msgr2 with a key need no flag)")
    p.add_argument("--json", action="store_true", help="with --wait: print the final status")
    p.add_argument("--verbose", "-v", action="store_true", help="with --wait: show progress")
    p.set_defaults(func=run_mirror)

    p = sub.add_parser("mirror-speed", help="change a running migration's bytes/s limit",
                       description="Set the running mirror's bytes/s limit (0 = unlimited).")
    add_control_argument(p)
    p.add_argument("bps", type=parse_bps, metavar="BPS")
    p.set_defaults(func=run_speed)

    p = sub.add_parser("break", help="abandon a running migration (the source keeps serving)",
                       description="Abandon the running mirror; the source stays authoritative "
                                   "and resumes paused clients. Refused while a COMMIT is "
                                   "being decided (state committing/in-doubt).")
    add_control_argument(p)
    p.set_defaults(func=run_break)
