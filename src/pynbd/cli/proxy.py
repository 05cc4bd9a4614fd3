"""``pynbd proxy``: an NBD server whose storage is another NBD server (the upstream)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

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
    p.add_argument("--bind", "-b", default=None, metavar="ADDR")
    p.add_argument("--port", "-p", type=int, default=None, help="TCP port (0 = any free one)")
    p.add_argument("--socket", "-U", metavar="PATH", help="listen on a Unix socket")
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


def run(args: argparse.Namespace) -> int:
    from pynbd.cli.serve import setup_logging
    from pynbd.client import ProtocolError
    from pynbd.proxy.upstream import ProxyBackend, UpstreamPool
    from pynbd.server.control import ControlError, ControlServer
    from pynbd.server.exports import Export, ExportRegistry
    from pynbd.server.server import Server

    setup_logging(args.verbose, args.quiet)
    pool = UpstreamPool(args.upstream, max_retries=args.max_retries,
                        retry_deadline=args.retry_deadline,
                        request_timeout=args.request_timeout)
    try:
        backend = ProxyBackend(pool)
    except (OSError, ProtocolError) as exc:
        print(f"pynbd proxy: cannot reach the upstream {args.upstream}: {exc}", file=sys.stderr)
        return 1
    server = Server(ExportRegistry([Export("", backend)]))
    try:
        if args.socket:
            server.listen_unix(args.socket)
        if not args.socket or args.port is not None or args.bind is not None:
            server.listen_tcp(args.bind, 10809 if args.port is None else args.port)
    except OSError as exc:
        print(f"pynbd proxy: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.control:
        control = ControlServer(args.control)
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
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    for uri in server.uris():
        print(uri, flush=True)
    log.info("proxying to %s", args.upstream)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0
