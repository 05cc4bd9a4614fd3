"""``pynbd info URI``: describe an NBD export, following nbdinfo's conventions.

Human ``key: value`` output by default, ``--json`` for scripts (the export size is under
``size``), ``--size`` prints only the size, ``--list`` lists every export, ``--map
[CONTEXT]`` prints block status, ``--can FEATURE`` / ``--is FEATURE`` answer through
the exit code (0 true, 2 false, 1 error).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pynbd.client import NBDURI, Client, parse_uri
from pynbd.client._common import FEATURES
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    QEMU_ALLOCATION_DEPTH,
    QEMU_DIRTY_BITMAP,
    AllocationFlag,
    TransmissionFlag,
)
from pynbd.protocol.errors import OptionError

CAN = {
    "flush": TransmissionFlag.SEND_FLUSH,
    "fua": TransmissionFlag.SEND_FUA,
    "trim": TransmissionFlag.SEND_TRIM,
    "zero": TransmissionFlag.SEND_WRITE_ZEROES,
    "write-zeroes": TransmissionFlag.SEND_WRITE_ZEROES,
    "fast-zero": TransmissionFlag.SEND_FAST_ZERO,
    "df": TransmissionFlag.SEND_DF,
    "multi-conn": TransmissionFlag.CAN_MULTI_CONN,
    "cache": TransmissionFlag.SEND_CACHE,
    "safe-close": TransmissionFlag.X_SEND_CLOSE,
    "block-status-payload": TransmissionFlag.BLOCK_STATUS_PAYLOAD,
}
IS = {
    "read-only": TransmissionFlag.READ_ONLY,
    "readonly": TransmissionFlag.READ_ONLY,
    "rotational": TransmissionFlag.ROTATIONAL,
}

_ALL_FEATURES = sorted(set(FEATURES) | set(CAN) | set(IS) | {"tls", "connect", "write"})


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "info", help="describe an NBD export (like nbdinfo)",
        description="Connect to an NBD server and describe the export named by URI "
                    "(nbd://, nbds://, nbd+unix://, nbds+unix://).")
    p.add_argument("uri", metavar="URI", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--size", action="store_true", help="print only the export size")
    mode.add_argument("--list", "-L", action="store_true", help="list all exports")
    mode.add_argument("--map", nargs="?", const=BASE_ALLOCATION, metavar="CONTEXT",
                      help="print block status (default context base:allocation)")
    mode.add_argument("--can", metavar="FEATURE",
                      help=f"exit 0 if the export supports FEATURE, 2 if not ({', '.join(CAN)})")
    mode.add_argument("--is", dest="is_", metavar="FEATURE",
                      help="exit 0 if the export is FEATURE (read-only, rotational, tls), "
                           "2 if not")
    p.add_argument("--no-extended-headers", dest="extended", action="store_false",
                   help="do not ask for extended headers (compact headers, as older clients)")
    p.add_argument("--timeout", type=float, default=60.0, help=argparse.SUPPRESS)
    p.set_defaults(func=handler)


def _open(uri: NBDURI, timeout: float) -> Client:
    c = Client.dial(uri, timeout=timeout)
    c.handshake()
    return c


def _negotiate(c: Client, contexts: tuple[str, ...], extended: bool = True,
               export: str | None = None) -> tuple[bool, list[str]]:
    """Extended headers (else structured replies) + meta contexts of ``export`` (the
    URI's by default); returns (reply chunks in use, available contexts)."""
    structured = (extended and c.extended_headers()) or c.structured_replies()
    available: list[str] = []
    if structured:
        try:
            available = [m.name for m in c.list_meta_context(export=export)]
        except OptionError:
            available = []
        if contexts:
            try:
                c.set_meta_context(*contexts, export=export)
            except OptionError:
                pass
    c.negotiate_safe_close()
    return structured, available


def _features(c: Client, structured: bool) -> dict[str, bool]:
    f = c.flags
    out = {f"can_{k.replace('-', '_')}": bool(f & v) for k, v in CAN.items()
           if k != "write-zeroes"}
    out["is_read_only"] = bool(f & TransmissionFlag.READ_ONLY)
    out["is_rotational"] = bool(f & TransmissionFlag.ROTATIONAL)
    out["can_block_status"] = bool(c.meta_contexts)
    out["structured_replies"] = structured
    out["extended_headers"] = c.extended
    return out


def _export_info(c: Client, structured: bool, available: list[str]) -> dict[str, Any]:
    ex = c.export
    assert ex is not None
    d: dict[str, Any] = {
        "export-name": ex.name,
        "size": ex.size,
        "export-size": ex.size,
    }
    if ex.canonical_name is not None and ex.canonical_name != ex.name:
        d["canonical-name"] = ex.canonical_name
    if ex.description:
        d["description"] = ex.description
    if c.uri is not None:
        d["uri"] = str(NBDURI(**{**c.uri.__dict__, "export": ex.name}))
    d["contexts"] = available or sorted(set(c.meta_contexts.values()))
    d.update(_features(c, structured))
    if ex.block_size is not None:
        d["block_size_minimum"], d["block_size_preferred"], d["block_size_maximum"] = \
            ex.block_size
    d["transmission_flags"] = ex.flags
    return d


def _protocol(c: Client, structured: bool) -> dict[str, Any]:
    # nbdinfo 1.22's keys ("structured", "extended") and pynbd's older one
    return {"protocol": "newstyle-fixed", "TLS": c.tls_active, "structured": structured,
            "extended": c.extended, "structured_replies": structured}


def _print_human(proto: dict[str, Any], exports: list[dict[str, Any]]) -> None:
    out = sys.stdout
    tls = "with TLS" if proto["TLS"] else "without TLS"
    packets = "extended" if proto.get("extended") else \
        "structured" if proto["structured_replies"] else "simple"
    out.write(f"protocol: {proto['protocol']} {tls}, using {packets} packets\n")
    for d in exports:
        out.write(f"export: {json.dumps(d['export-name'])}\n")
        for k, v in d.items():
            if k in ("export-name", "export-size"):
                continue
            if isinstance(v, bool):
                v = "true" if v else "false"
            elif isinstance(v, list):
                v = " ".join(v) if v else "(none)"
            out.write(f"\t{k}: {v}\n")


def _map(c: Client, context: str, as_json: bool) -> int:
    if context not in c.meta_contexts.values():
        sys.stderr.write(f"pynbd info: server does not support context {context!r}\n")
        return 1
    rows: list[dict[str, Any]] = []
    for e in c.iter_extents(0, c.size, context):
        desc = describe(context, e.flags)
        if rows and rows[-1]["type"] == e.flags and \
                rows[-1]["offset"] + rows[-1]["length"] == e.offset:
            rows[-1]["length"] += e.length
        else:
            rows.append({"offset": e.offset, "length": e.length, "type": e.flags,
                         "description": desc})
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in rows:
            sys.stdout.write(f"{r['offset']:>16} {r['length']:>16} {r['type']:>5}  "
                             f"{r['description']}\n")
    return 0


def describe(context: str, flags: int) -> str:
    """nbdinfo's words for an extent's flags in the contexts it knows ("" otherwise)."""
    if context == BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}[
            flags & (AllocationFlag.HOLE | AllocationFlag.ZERO)]
    if context.startswith(QEMU_DIRTY_BITMAP):
        return "dirty" if flags & 1 else "clean"
    if context == QEMU_ALLOCATION_DEPTH:
        # the whole value is the depth in the backing chain the data comes from
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return ""


def handler(args: argparse.Namespace) -> int:
    if args.uri is None and args.map and "://" in args.map:
        args.uri, args.map = args.map, BASE_ALLOCATION  # "--map URI" (nbdinfo: --map=CTX)
    if args.uri is None:
        sys.stderr.write("pynbd info: URI is required\n")
        return 1
    try:
        uri = parse_uri(args.uri)
    except ValueError as exc:
        sys.stderr.write(f"pynbd info: {exc}\n")
        return 1
    try:
        return _run(args, uri)
    except (OSError, ValueError, RuntimeError) as exc:  # NBD/protocol errors included
        sys.stderr.write(f"pynbd info: {uri}: {exc}\n")
        return 1


def _run(args: argparse.Namespace, uri: NBDURI) -> int:
    from pynbd.protocol.errors import ProtocolError

    try:
        c = _open(uri, args.timeout)
    except ProtocolError as exc:
        raise OSError(str(exc)) from exc
    try:
        if args.list:
            return _list(c, uri, args)
        contexts = (args.map,) if args.map else (BASE_ALLOCATION,)
        structured, available = _negotiate(c, contexts, args.extended)
        c.go()
        if args.size:
            sys.stdout.write(f"{c.size}\n")
            return 0
        if args.can or args.is_:
            return _can(c, args.can, args.is_, structured)
        if args.map:
            return _map(c, args.map, args.json)
        proto = _protocol(c, structured)
        info = _export_info(c, structured, available)
        if args.json:
            json.dump({**proto, "size": info["size"], "exports": [info]}, sys.stdout,
                      indent=2)
            sys.stdout.write("\n")
        else:
            _print_human(proto, [info])
        return 0
    except ProtocolError as exc:
        raise OSError(str(exc)) from exc
    finally:
        c.close()


def _can(c: Client, can: str | None, is_: str | None, structured: bool) -> int:
    if can is not None:
        name = can.lower()
        if name in CAN:
            return 0 if c.flags & CAN[name] else 2
        if name == "write":
            return 2 if c.is_read_only() else 0
        if name in ("block-status", "extents", "meta-context"):
            return 0 if c.meta_contexts else 2
        if name in ("structured-replies", "structured-reply"):
            return 0 if structured else 2
        if name in ("extended-headers", "extended"):
            return 0 if c.extended else 2
        if name == "connect":
            return 0
        sys.stderr.write(f"pynbd info: unknown feature {can!r} (known: "
                         f"{', '.join(_ALL_FEATURES)})\n")
        return 1
    assert is_ is not None
    name = is_.lower()
    if name in IS:
        return 0 if c.flags & IS[name] else 2
    if name == "tls":
        return 0 if c.tls_active else 2
    sys.stderr.write(f"pynbd info: unknown property {is_!r}\n")
    return 1


def _list(c: Client, uri: NBDURI, args: argparse.Namespace) -> int:
    exports = c.list_exports()
    c.close()
    infos = []
    proto: dict[str, Any] | None = None
    for e in exports:
        c2 = _open(uri, args.timeout)
        try:
            # the contexts of this export (not the URI's): SET_META_CONTEXT must name
            # the export GO selects, or block status is not negotiated
            structured, available = _negotiate(c2, (BASE_ALLOCATION,), args.extended,
                                               export=e.name)
            c2.go(e.name)
            proto = proto or _protocol(c2, structured)
            d = _export_info(c2, structured, available)
            if e.description and "description" not in d:
                d["description"] = e.description
            infos.append(d)
        finally:
            c2.close()
    proto = proto or {"protocol": "newstyle-fixed", "TLS": uri.tls, "structured": False,
                      "extended": False, "structured_replies": False}
    if args.json:
        json.dump({**proto, "exports": infos}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_human(proto, infos)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``pynbd info`` on its own (``python -m pynbd.cli.info``)."""
    parser = argparse.ArgumentParser(prog="pynbd")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["info", *(sys.argv[1:] if argv is None else argv)])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
