"""``pynbd proxy``: an NBD server whose storage is another NBD server (the upstream)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from pynbd.cli.serve import add_tls_arguments
from pynbd.util.net import is_loopback

log = logging.getLogger("pynbd.proxy")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "proxy", help="serve NBD clients from an upstream NBD server, surviving its failures",
        description="Serve NBD clients (many, many requests in flight) from --upstream. When "
                    "the upstream fails, or answers ESHUTDOWN because it stepped down after a "
                    "migration, requests are replayed on a new connection (bounded retries, "
                    "counted in `pynbd status`). `pynbd proxy-upstream --control PATH URI` "
                    "switches to a new upstream, so a migration's clients only see a pause.")
    p.add_argument("--upstream", required=True, metavar="URI", help="nbd://... or nbd+unix://...")
    p.add_argument("--bind", "-b", default=None, metavar="ADDR",
                   help="TCP address (default 127.0.0.1; another address needs --tls "
                        "require --tls-verify-peer, or --insecure)")
    p.add_argument("--port", "-p", type=int, default=None, help="TCP port (0 = any free one)")
    p.add_argument("--socket", "-U", metavar="PATH", help="listen on a Unix socket")
    g = p.add_argument_group("security")
    g.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without authenticating "
                        "clients (any client that reaches it can read and write the image)")
    g.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="accept TCP clients only from this address or network (repeatable; "
                        "checked before any byte is sent)")
    g.add_argument("--default-deny", action="store_true",
                   help="refuse every TCP client when the allow list is empty")
    add_tls_arguments(p)
    p.add_argument("--control", metavar="PATH", help="control socket (status, upstream)")
    p.add_argument("--max-retries", type=int, default=60, metavar="N",
                   help="attempts per request before the client gets EIO (default 60)")
    p.add_argument("--retry-deadline", type=float, default=120.0, metavar="SECONDS",
                   help="give up on a request after this long (default 120)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="replay an upstream request that takes longer (default 60; 0 = never)")
    p.add_argument("--verbose", "-v", action="count", default=0)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=run)

    p = sub.add_parser("proxy-upstream", help="switch a running proxy to a new upstream",
                       description="Tell `pynbd proxy --control PATH` to use URI from now on.")
    p.add_argument("--control", "-s", required=True, metavar="PATH")
    p.add_argument("uri", metavar="URI")
    p.set_defaults(func=run_switch)


def run_switch(args: argparse.Namespace) -> int:
    from pynbd.cli.control import call

    reply = call(args.control, {"cmd": "upstream", "uri": args.uri})
    if reply is None:
        return 3
    if not reply.get("ok"):
        print(f"pynbd proxy-upstream: {reply.get('error')}", file=sys.stderr)
        return 1
    return 0


def check_security(args: argparse.Namespace) -> str | None:
    """Fill in the TCP defaults; an error message when the proxy would listen on the
    network without authenticating its clients (and --insecure was not given)."""
    args.tcp = not args.socket or args.port is not None or args.bind is not None
    if args.tcp and args.bind is None:
        args.bind = "127.0.0.1"
    try:
        from pynbd.server.acl import parse_networks

        parse_networks(args.allow)
    except ValueError as exc:
        return str(exc)
    if not args.tcp or is_loopback(args.bind) or args.insecure:
        return None
    if args.tls == "require" and args.tls_verify_peer:
        return None
    where = args.bind or "every address"
    if args.tls == "require":
        why = ("--tls require without --tls-verify-peer encrypts but lets any client in; "
               "add --tls-verify-peer (clients need a certificate signed by --tls-ca)")
    else:
        why = ("give --tls require --tls-verify-peer (clients need a certificate signed by "
               "the CA) or listen on a Unix socket (--socket) or loopback")
    return (f"refusing to listen on {where} (not loopback) without authenticating clients: "
            f"{why}; or --insecure to serve anyone who can reach the port")


class _Refused(Exception):
    """Starting failed: the message for stderr and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def run(args: argparse.Namespace) -> int:
    from pynbd.cli.serve import setup_logging
    from pynbd.server.service import sd_notify

    setup_logging(args.verbose, args.quiet)
    try:
        server, pool = _build(args)
    except _Refused as exc:
        print(f"pynbd proxy: {exc}", file=sys.stderr)
        return exc.code
    if args.control:
        _control(args.control, server, pool)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    for uri in server.uris():
        print(uri, flush=True)
    log.info("proxying to %s", args.upstream)
    sd_notify(f"READY=1\nSTATUS=proxying {', '.join(server.uris())} to {args.upstream}")
    while not stop.wait(0.5):
        pass
    sd_notify("STOPPING=1")
    server.shutdown()
    return 0


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The server in front of the upstream pool, listening; raises _Refused."""
    from pynbd.client import ProtocolError
    from pynbd.protocol.server import TLSMode
    from pynbd.proxy.upstream import ProxyBackend, UpstreamPool
    from pynbd.server.exports import Export, ExportRegistry
    from pynbd.server.server import Server, ServerOptions
    from pynbd.server.tls import TLSConfigError, server_tls_context

    # before check_security, which fills in the default --bind
    explicit_listen = bool(args.socket or args.bind is not None or args.port is not None)
    err = check_security(args)
    if err is not None:
        raise _Refused(err, 2)
    tls = TLSMode(args.tls)
    ctx = None
    if tls is not TLSMode.OFF:
        try:
            ctx = server_tls_context(certificates_dir=args.tls_certificates,
                                     cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                                     verify_peer=args.tls_verify_peer)
        except TLSConfigError as exc:
            raise _Refused(str(exc), 2) from exc
    pool = UpstreamPool(args.upstream, max_retries=args.max_retries,
                        retry_deadline=args.retry_deadline,
                        request_timeout=args.request_timeout)
    try:
        backend = ProxyBackend(pool)
    except (OSError, ProtocolError) as exc:
        raise _Refused(f"cannot reach the upstream {args.upstream}: {exc}", 1) from exc
    server = Server(ExportRegistry([Export("", backend)]),
                    ServerOptions(tls=tls, tls_context=ctx))
    if args.allow or args.default_deny:
        server.set_acl(args.allow, default_deny=args.default_deny)
    _listen(args, server, tls, explicit_listen)
    return server, pool


def _listen(args: argparse.Namespace, server: Any, tls: Any, explicit_listen: bool) -> None:
    """Adopt socket-activated listeners, or listen where the options say."""
    from pynbd.cli.serve import check_exposure
    from pynbd.protocol.server import TLSMode
    from pynbd.server.config import ConfigError
    from pynbd.server.service import ActivationError, listen_fds

    try:
        activated = listen_fds()
        if activated and explicit_listen:
            raise ConfigError("socket-activated (LISTEN_FDS): do not give --bind/--port/"
                              "--socket; the .socket unit says where to listen")
        for a in activated:
            if a.kind == "tcp":
                check_exposure(str(a.sock.getsockname()[0]), True, tls,
                               args.tls_verify_peer, args.insecure)
            server.adopt_listener(a.sock)
    except (ActivationError, ConfigError) as exc:
        raise _Refused(str(exc), 2) from exc
    if activated:
        args.tcp = False
        args.socket = None
    try:
        if args.socket:
            server.listen_unix(args.socket)
        if args.tcp:
            server.listen_tcp(args.bind, 10809 if args.port is None else args.port)
    except OSError as exc:
        raise _Refused(f"cannot listen: {exc.strerror or exc}", 1) from exc
    if args.tcp and not is_loopback(args.bind):
        _log_exposure(args, tls is TLSMode.REQUIRE and args.tls_verify_peer)


def _log_exposure(args: argparse.Namespace, verified: bool) -> None:
    """TCP beyond loopback: say who can reach the upstream's image."""
    where = args.bind or "every address"
    if verified:
        log.info("TCP on %s: clients must present a certificate signed by the CA", where)
    else:
        log.warning("UNAUTHENTICATED (--insecure) on %s: ANYONE WHO CAN REACH THIS PORT "
                    "can read and write the upstream's image; use --tls require "
                    "--tls-verify-peer, --allow, or a loopback --bind", where)


def _control(path: str, server: Any, pool: Any) -> None:
    """The control socket: ``status`` (with the upstreams), ``upstream`` (switch)."""
    from pynbd.client import ProtocolError
    from pynbd.server.control import ControlError, ControlServer

    control = ControlServer(path)
    server.attach_control(control)

    def status(req: dict[str, Any]) -> dict[str, Any]:
        st = server.status()
        st["proxy"] = pool.status()
        return {"status": st}

    def upstream(req: dict[str, Any]) -> dict[str, Any]:
        uri = req.get("uri")
        if not isinstance(uri, str) or not uri:
            return {"proxy": pool.status()}
        try:
            pool.switch(uri)
        except (OSError, ProtocolError, ValueError) as exc:
            raise ControlError(f"cannot switch to {uri}: {exc}") from exc
        return {"proxy": pool.status()}

    control.register("status", status)
    control.register("upstream", upstream)
    control.start()
