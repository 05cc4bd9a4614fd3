"""The ``pynbd`` command: one subcommand per module in this package.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pynbd import __version__

# Modules under pynbd.cli that provide subcommands, in help order.
SUBCOMMAND_MODULES = [
    "serve",
    "control",
    "info",
    "copy",
    "ceph",
    "mirror",
    "listen",
    "rw",
    "proxy",
    "fuse",
    "filterctl",
    "bitmap",
    "backup",
]

# Which module defines each command, so a command imports only what it needs (start-up
# time matters for tools run in loops, e.g. pynbd info in scripts).
COMMANDS = {
    "serve": "serve", "status": "control", "acl": "control", "info": "info",
    "copy": "copy", "ceph": "ceph", "mirror": "mirror", "mirror-speed": "mirror",
    "break": "mirror", "listen": "listen", "read": "rw", "write": "rw", "proxy": "proxy",
    "proxy-upstream": "proxy", "fuse": "fuse", "filter": "filterctl",
    "bitmap": "bitmap", "checkpoint": "bitmap", "backup": "backup", "restore": "backup",
    "prune": "backup",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pynbd",
        description="Network block device server, client, migration and tools.",
    )
    parser.add_argument("--version", action="version", version=f"pynbd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    only = COMMANDS.get(command or "")
    modules = [only] if only in SUBCOMMAND_MODULES else SUBCOMMAND_MODULES
    for name in modules:
        module = importlib.import_module(f"pynbd.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error worth a traceback
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return rc


if __name__ == "__main__":
    sys.exit(main())
