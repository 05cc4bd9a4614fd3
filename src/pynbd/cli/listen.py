"""``pynbd listen``: the destination of a live migration (msgr2)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from pynbd.backends import BackendError
from pynbd.migration.wire import DEFAULT_TAKEOVER_AFTER
from pynbd.util.net import is_loopback
from pynbd.util.sizes import parse_size

log = logging.getLogger("pynbd.listen")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "listen", help="receive a live migration (the destination)",
        description="Wait for `pynbd mirror --to msgr2://HOST:PORT` and receive FILE. Prints "
                    "msgr2://HOST:PORT on stdout. Sources must prove they hold the key in "
                    "--psk-file (without one it refuses to start, unless --insecure); one "
                    "source owns the copy at a time. FILE becomes authoritative only on a "
                    "verified COMMIT (size, epoch and whole-image digest), recorded durably in "
                    "FILE.pynbd-migration.json; a dropped connection, a stray client or a "
                    "partial copy never counts as completion. After the commit the image is "
                    "served over NBD if --serve-socket/--serve-port is given; the process "
                    "keeps running (answering a source that is in doubt) until SIGTERM, or "
                    "exits 0 right after the commit with --exit-after-commit.")
    p.add_argument("file", metavar="FILE", help="the image to write (must exist, or --size)")
    p.add_argument("--bind", "-b", default=None, metavar="ADDR",
                   help="address for msgr2 (default 0.0.0.0 with --psk-file; 127.0.0.1 with "
                        "--insecure)")
    p.add_argument("--port", "-p", type=int, default=3300, help="msgr2 port (0 = any free one)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="create FILE as a sparse image of this size if it does not exist")
    p.add_argument("--control", metavar="PATH", help="control socket (pynbd status)")
    g = p.add_argument_group("security")
    g.add_argument("--psk-file", metavar="FILE",
                   help="authenticate sources with this pre-shared key (>= 16 bytes; make "
                        "one with: head -c 32 /dev/urandom | base64 > FILE); required "
                        "unless --insecure")
    g.add_argument("--secure", action="store_true",
                   help="accept only msgr2 secure mode (every frame encrypted and "
                        "authenticated); needs --psk-file")
    g.add_argument("--insecure", action="store_true",
                   help="allow listening without authentication: msgr2 without --psk-file "
                        "(then on 127.0.0.1 unless --bind is given) and --serve-bind on a "
                        "non-loopback address")
    g.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="accept connections only from this address or network (repeatable; "
                        "checked before any byte is sent)")
    g.add_argument("--default-deny", action="store_true",
                   help="refuse every connection when the allow list is empty")
    g.add_argument("--takeover-after", type=float, default=DEFAULT_TAKEOVER_AFTER,
                   metavar="SECONDS",
                   help="a source whose connection has been gone this long (without "
                        "releasing the copy) may be replaced by another source (default "
                        f"{DEFAULT_TAKEOVER_AFTER:g})")
    p.add_argument("--serve-socket", metavar="PATH",
                   help="after the commit, serve the image over NBD on this Unix socket")
    p.add_argument("--serve-port", type=int, default=None, metavar="PORT",
                   help="after the commit, serve the image over NBD on this TCP port")
    p.add_argument("--serve-bind", default=None, metavar="ADDR",
                   help="address for --serve-port (default 127.0.0.1; another address "
                        "needs --insecure: this NBD server does not authenticate clients)")
    p.add_argument("--exit-after-commit", action="store_true",
                   help="exit 0 as soon as the commit is acknowledged")
    p.add_argument("--verbose", "-v", action="count", default=0, help="more logging")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    p.set_defaults(func=run)


def check_security(args: argparse.Namespace) -> str | None:
    """Fill in the defaults the key decides; an error message for a combination that
    would listen without authentication (or makes no sense), else None."""
    if args.takeover_after < 0:
        return "--takeover-after must be >= 0"
    if args.secure and not args.psk_file:
        return "--secure needs --psk-file (msgr2 secure mode is keyed by the pre-shared key)"
    if not args.psk_file and not args.insecure:
        where = f" on {args.bind}" if args.bind else ""
        return (f"refusing to listen{where} without authentication: anyone who reaches the "
                "port could overwrite the image and make it authoritative. Give --psk-file "
                "FILE (a random key of at least 16 bytes, e.g. `head -c 32 /dev/urandom | "
                "base64 > FILE`; the source's `pynbd mirror --psk-file` uses the same file), "
                "or --insecure to accept unauthenticated sources (then only on 127.0.0.1 "
                "unless --bind says otherwise)")
    if args.bind is None:
        args.bind = "0.0.0.0" if args.psk_file else "127.0.0.1"
    if args.serve_port is not None:
        if args.serve_bind is None:
            args.serve_bind = "127.0.0.1"
        if not is_loopback(args.serve_bind) and not args.insecure:
            return (f"refusing to serve the image over NBD on {args.serve_bind} (not "
                    "loopback): that NBD server does not authenticate clients; use "
                    "--serve-socket or a loopback --serve-bind, or --insecure")
    try:
        from pynbd.server.acl import parse_networks

        parse_networks(args.allow)
    except ValueError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    from pynbd.cli.serve import setup_logging

    setup_logging(args.verbose, args.quiet)
    err = check_security(args)
    if err is not None:
        print(f"pynbd listen: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130


def _auth(args: argparse.Namespace) -> Any:
    """The msgr2 authentication ``args`` ask for (ValueError: an unusable key)."""
    from pynbd.migration.control import read_psk
    from pynbd.msgr2.auth import AuthNone, PskAuth
    from pynbd.msgr2.constants import ConMode

    if not args.psk_file:
        return AuthNone()
    key = read_psk(args.psk_file)
    modes = (ConMode.SECURE,) if args.secure else (ConMode.SECURE, ConMode.CRC)
    import os

    with contextlib.suppress(OSError):
        if os.stat(args.psk_file).st_mode & 0o077:
            log.warning("the key file %s is readable by other users (chmod 600 it)",
                        args.psk_file)
    return PskAuth(key, modes=modes)


class _Destination:
    """What ``pynbd listen`` runs around the migration destination: the NBD server it
    starts after the commit, and the control socket's verbs."""

    def __init__(self, args: argparse.Namespace, dest: Any, guard: Any) -> None:
        from pynbd.server.control import ControlServer
        from pynbd.server.server import Server

        self.args = args
        self.dest = dest
        self.guard = guard
        self.servers: list[Server] = []
        self.control = ControlServer(args.control) if args.control else None

    def serve_nbd(self) -> None:
        """After the commit (or at start, when already authoritative), if asked for."""
        args = self.args
        if self.servers or not (args.serve_socket or args.serve_port is not None):
            return
        from pynbd.backends.file import FileBackend
        from pynbd.server.exports import Export, ExportRegistry
        from pynbd.server.server import Server

        srv = Server(ExportRegistry([Export("", FileBackend(args.file))]))
        if args.allow or args.default_deny:
            srv.set_acl(args.allow, default_deny=args.default_deny)
        if args.serve_socket:
            srv.listen_unix(args.serve_socket)
        if args.serve_port is not None:
            srv.listen_tcp(args.serve_bind, args.serve_port)
        if self.control is not None:
            srv.attach_control(self.control)
            self.register_status(srv)
        srv.start()
        self.servers.append(srv)
        self.dest.serving = srv.uris()[0]
        log.info("serving the migrated image on %s", ", ".join(srv.uris()))

    def listen_status(self) -> dict[str, Any]:
        args = self.args
        return dict(self.guard.status(), authentication="psk" if args.psk_file else "none",
                    secure_only=bool(args.secure), bind=args.bind)

    def register_status(self, srv: Any) -> None:
        control = self.control
        if control is None:
            return
        dest = self.dest

        def status(req: dict[str, Any]) -> dict[str, Any]:
            import os

            st = srv.status() if srv is not None else {"pid": os.getpid()}
            st["migration"] = dest.status()
            st["listen"] = self.listen_status()
            return {"status": st}

        control.register("status", status)
        control.register("migration-status", lambda req: {"migration": dest.status()})

    async def close(self) -> None:
        if self.control is not None:
            self.control.stop()
        loop = asyncio.get_running_loop()
        for srv in self.servers:
            await loop.run_in_executor(None, srv.shutdown)


def _announce(args: argparse.Namespace, m2: Any) -> None:
    """Log who may write into the image."""
    if not args.psk_file:
        if is_loopback(args.bind):
            log.warning("no authentication (--insecure): any local process that reaches "
                        "%s:%s can write into %s and make it authoritative",
                        args.bind, m2.port, args.file)
        else:
            log.warning("UNAUTHENTICATED (--insecure) on %s:%s: ANYONE WHO CAN REACH THIS "
                        "PORT can overwrite %s, make it authoritative and read its size, "
                        "state and digests; use --psk-file", args.bind, m2.port, args.file)
    else:
        log.info("msgr2 on %s:%s: sources must prove the pre-shared key in %s%s",
                 args.bind, m2.port, args.psk_file,
                 " (secure mode only)" if args.secure else "")


def _print_uri(m2: Any) -> None:
    """The URI sources use, on stdout."""
    host = m2.host if ":" not in m2.host else f"[{m2.host}]"
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    print(f"msgr2://{host}:{m2.port}", flush=True)
    from pynbd.server.service import sd_notify

    sd_notify(f"READY=1\nSTATUS=waiting for a source on msgr2://{host}:{m2.port}")


async def _until_stopped(args: argparse.Namespace, committed: asyncio.Event) -> None:
    """Until SIGINT/SIGTERM, or the commit with --exit-after-commit."""
    loop = asyncio.get_running_loop()
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


async def _summarize(guard: Any) -> None:
    from pynbd.migration.listener import REFUSAL_LOG_INTERVAL

    while True:
        await asyncio.sleep(REFUSAL_LOG_INTERVAL)
        guard.summarize()


async def _main(args: argparse.Namespace) -> int:
    from pynbd.migration.destination import Destination, create_image
    from pynbd.migration.listener import PeerGuard, listen_guarded
    from pynbd.msgr2.aio import SessionOptions
    from pynbd.server.acl import AccessList
    from pynbd.server.service import ActivationError, listen_fds, sd_notify

    try:
        auth = _auth(args)
    except ValueError as exc:
        print(f"pynbd listen: {exc}", file=sys.stderr)
        return 2
    if args.size is not None:
        create_image(args.file, args.size)
    try:
        dest = Destination(args.file, takeover_after=args.takeover_after)
    except (BackendError, OSError, ValueError) as exc:
        print(f"pynbd listen: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(dest.executor, dest.scan)
    acl = AccessList(args.allow, default_deny=args.default_deny) \
        if args.allow or args.default_deny else None
    guard = PeerGuard(acl)
    around = _Destination(args, dest, guard)
    committed = asyncio.Event()
    dest.committed_event = committed
    dest.on_commit = around.serve_nbd
    opts = SessionOptions(keepalive_interval=1.0, keepalive_timeout=10.0, session_linger=60.0)
    try:
        activated = listen_fds()
        if len(activated) > 1 or any(a.kind != "tcp" for a in activated):
            raise ActivationError("pynbd listen takes exactly one TCP socket (msgr2)")
    except ActivationError as exc:
        print(f"pynbd listen: {exc}", file=sys.stderr)
        return 2
    try:
        if activated:
            args.bind = str(activated[0].sock.getsockname()[0])
            log.info("socket-activated msgr2 listener (%s)", activated[0].name)
        m2 = await listen_guarded(args.bind, args.port, auth=auth, handler=dest.handle,
                                  options=opts, guard=guard,
                                  sock=activated[0].sock if activated else None)
    except OSError as exc:
        print(f"pynbd listen: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    _announce(args, m2)
    summarizer = asyncio.ensure_future(_summarize(guard))
    if around.control is not None:
        around.register_status(None)
        around.control.start()
    if dest.authoritative:
        log.info("%s is authoritative (epoch %d)", args.file, dest.epoch)
        around.serve_nbd()
    _print_uri(m2)
    await _until_stopped(args, committed)
    sd_notify("STOPPING=1")
    summarizer.cancel()
    guard.summarize()
    await m2.close()
    await around.close()
    dest.close()
    return 0
