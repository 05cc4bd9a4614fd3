"""``pynbd listen``: the destination of a live migration (msgr2)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from pynbd.backends import BackendError
from pynbd.util.sizes import parse_size

log = logging.getLogger("pynbd.listen")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "listen", help="receive a live migration (the destination)",
        description="Wait for `pynbd mirror --to msgr2://HOST:PORT` and receive FILE. Prints "
                    "msgr2://HOST:PORT on stdout. FILE becomes authoritative only on a "
                    "verified COMMIT (size, epoch and whole-image digest), recorded durably in "
                    "FILE.pynbd-migration.json; a dropped connection, a stray client or a "
                    "partial copy never counts as completion. After the commit the image is "
                    "served over NBD if --serve-socket/--serve-port is given; the process "
                    "keeps running (answering a source that is in doubt) until SIGTERM, or "
                    "exits 0 right after the commit with --exit-after-commit.")
    p.add_argument("file", metavar="FILE", help="the image to write (must exist, or --size)")
    p.add_argument("--bind", "-b", default="0.0.0.0", metavar="ADDR",
                   help="address for msgr2 (default 0.0.0.0)")
    p.add_argument("--port", "-p", type=int, default=3300, help="msgr2 port (0 = any free one)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="create FILE as a sparse image of this size if it does not exist")
    p.add_argument("--control", metavar="PATH", help="control socket (pynbd status)")
    p.add_argument("--psk-file", metavar="FILE",
                   help="require the pre-shared-key auth with this key (>= 16 bytes)")
    p.add_argument("--serve-socket", metavar="PATH",
                   help="after the commit, serve the image over NBD on this Unix socket")
    p.add_argument("--serve-port", type=int, default=None, metavar="PORT",
                   help="after the commit, serve the image over NBD on this TCP port")
    p.add_argument("--serve-bind", default=None, metavar="ADDR", help="address for --serve-port")
    p.add_argument("--exit-after-commit", action="store_true",
                   help="exit 0 as soon as the commit is acknowledged")
    p.add_argument("--verbose", "-v", action="count", default=0, help="more logging")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pynbd.cli.serve import setup_logging

    setup_logging(args.verbose, args.quiet)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130


async def _main(args: argparse.Namespace) -> int:
    from pynbd.migration.destination import Destination, create_image
    from pynbd.msgr2.aio import Msgr2Server, SessionOptions
    from pynbd.msgr2.auth import AuthNone, PskAuth
    from pynbd.server.control import ControlServer
    from pynbd.server.server import Server

    if args.size is not None:
        create_image(args.file, args.size)
    try:
        dest = Destination(args.file)
    except (BackendError, OSError, ValueError) as exc:
        print(f"pynbd listen: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(dest.executor, dest.scan)
    auth: AuthNone | PskAuth = AuthNone()
    if not args.psk_file and args.bind not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no --psk-file: anyone who can reach %s:%s can write into %s",
                    args.bind, args.port, args.file)
    if args.psk_file:
        with open(args.psk_file, "rb") as f:
            auth = PskAuth(f.read().strip())
    server_box: list[Server] = []
    control = ControlServer(args.control) if args.control else None

    def serve_nbd() -> None:
        if server_box or not (args.serve_socket or args.serve_port is not None):
            return
        from pynbd.backends.file import FileBackend
        from pynbd.server.exports import Export, ExportRegistry

        reg = ExportRegistry([Export("", FileBackend(args.file))])
        srv = Server(reg)
        if args.serve_socket:
            srv.listen_unix(args.serve_socket)
        if args.serve_port is not None:
            srv.listen_tcp(args.serve_bind, args.serve_port)
        if control is not None:
            srv.attach_control(control)
            register_status(srv)
        srv.start()
        server_box.append(srv)
        dest.serving = srv.uris()[0]
        log.info("serving the migrated image on %s", ", ".join(srv.uris()))

    def status_only(req: dict[str, Any]) -> dict[str, Any]:
        import os

        return {"status": {"pid": os.getpid(), "migration": dest.status()}}

    def register_status(srv: Server | None) -> None:
        if control is None:
            return

        def status(req: dict[str, Any]) -> dict[str, Any]:
            st = srv.status() if srv is not None else status_only(req)["status"]
            st["migration"] = dest.status()
            return {"status": st}

        control.register("status", status)
        control.register("migration-status", lambda req: {"migration": dest.status()})

    committed = asyncio.Event()
    dest.committed_event = committed
    dest.on_commit = serve_nbd
    opts = SessionOptions(keepalive_interval=1.0, keepalive_timeout=10.0, session_linger=60.0)
    try:
        m2 = await Msgr2Server.listen(args.bind, args.port, auth=auth, handler=dest.handle,
                                      options=opts)
    except OSError as exc:
        print(f"pynbd listen: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if control is not None:
        register_status(None)
        control.start()
    if dest.authoritative:
        log.info("%s is authoritative (epoch %d)", args.file, dest.epoch)
        serve_nbd()
    host = m2.host if ":" not in m2.host else f"[{m2.host}]"
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    print(f"msgr2://{host}:{m2.port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.ensure_future(stop.wait())]
    if args.exit_after_commit:
        waiters.append(asyncio.ensure_future(committed.wait()))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    if args.exit_after_commit and committed.is_set():
        await asyncio.sleep(0.2)  # let the ACK leave
    await m2.close()
    if control is not None:
        control.stop()
    for srv in server_box:
        await loop.run_in_executor(None, srv.shutdown)
    dest.close()
    return 0
