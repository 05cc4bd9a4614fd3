"""``pynbd serve``: serve files, block devices, memory or RBD images over NBD."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from pynbd.backends import BackendError, CephOptions, open_backend
from pynbd.protocol.constants import DEFAULT_MAX_REQUEST
from pynbd.protocol.server import TLSMode
from pynbd.server.config import ConfigError, ExportConfig, ServeConfig, load_config
from pynbd.server.exports import Export, ExportRegistry
from pynbd.server.server import Limits, Server, ServerOptions
from pynbd.server.tls import TLSConfigError, server_tls_context

log = logging.getLogger("pynbd.serve")


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS")
    g.add_argument("--tls", choices=["off", "on", "require"], default="off",
                   help="offer TLS (on) or insist on it (require); default off")
    g.add_argument("--tls-certificates", metavar="DIR",
                   help="directory with ca-cert.pem, server-cert.pem, server-key.pem")
    g.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    g.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) for client verification")
    g.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by the CA")


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    d = Limits()
    g = p.add_argument_group("limits")
    g.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                   help=f"connections in total (default {d.max_connections})")
    g.add_argument("--max-connections-per-address", type=int,
                   default=d.max_connections_per_address, metavar="N",
                   help=f"connections from one address (default {d.max_connections_per_address})")
    g.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout, metavar="SECONDS",
                   help=f"drop clients that do not finish negotiation in time (default {d.handshake_timeout:g})")
    g.add_argument("--max-inflight", type=int, default=d.max_inflight, metavar="N",
                   help=f"requests in flight per connection (default {d.max_inflight})")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, metavar="SECONDS",
                   help="drop a client whose request takes longer (0 = never, the default)")


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``32M``, ``1G`` (binary units) for --max-request-size."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1:] if t[-1:] in units and t[-1:] else ""
    try:
        value = int(t[:-1] if suffix else t) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not 4096 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is outside 4K .. 4G-1")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve", help="serve a disk image over NBD",
        description="Serve TARGET (a file or block device, memory:SIZE, or "
                    "rbd:POOL/IMAGE[@SNAP]) over NBD. Runs in the foreground, logs to stderr, "
                    "prints the NBD URI it serves on stdout.")
    p.add_argument("target", nargs="?", metavar="TARGET",
                   help="file or block device, memory:SIZE, rbd:POOL/IMAGE[@SNAP]")
    p.add_argument("--bind", "-b", metavar="ADDR", default=None,
                   help="address to listen on (default: every address, IPv6 and IPv4)")
    p.add_argument("--port", "-p", type=int, default=None,
                   help="TCP port (default 10809; 0 picks a free one)")
    p.add_argument("--socket", "-U", metavar="PATH", help="listen on a Unix socket instead of TCP")
    p.add_argument("--export-name", "-e", default="", metavar="NAME",
                   help="export name (the empty name always reaches the default export)")
    p.add_argument("--description", default="", metavar="TEXT", help="export description")
    p.add_argument("--read-only", "-r", action="store_true", help="refuse writes")
    p.add_argument("--config", "-c", metavar="FILE", help="TOML file defining several exports")
    p.add_argument("--ceph-conf", metavar="CONF", help="Ceph config for rbd: targets")
    p.add_argument("--ceph-name", metavar="NAME", help="Ceph client name (default client.admin)")
    p.add_argument("--ceph-keyring", metavar="PATH", help="Ceph keyring")
    p.add_argument("--no-safe-close", action="store_true",
                   help="do not offer the safe-close extension (NBD_OPT_X_CLOSE)")
    p.add_argument("--no-extended-headers", action="store_true",
                   help="do not offer NBD_OPT_EXTENDED_HEADERS (compact 28/16/20-byte "
                        "headers only)")
    p.add_argument("--max-request-size", type=parse_size, default=DEFAULT_MAX_REQUEST,
                   metavar="SIZE",
                   help="largest read/write request accepted, e.g. 32M (default 64M)")
    p.add_argument("--allocation-depth", action="store_true",
                   help="also serve the qemu:allocation-depth metadata context (as "
                        "qemu-nbd -A; every byte is local: pynbd has no backing chains)")
    p.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="allow clients from this address or network (repeatable)")
    p.add_argument("--default-deny", action="store_true",
                   help="refuse every client when the allow list is empty")
    add_tls_arguments(p)
    add_limit_arguments(p)
    p.add_argument("--control", metavar="PATH",
                   help="control socket (Unix, mode 0600) for pynbd status/acl/mirror")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics over HTTP here (off by default)")
    p.add_argument("--verbose", "-v", action="count", default=0, help="more logging")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    p.set_defaults(func=run)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose == 0 and not quiet:
        level = logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s pynbd[%(process)d] %(levelname)s %(message)s")
    if verbose < 1:
        # per-connection chatter only with -v
        logging.getLogger("pynbd.server").setLevel(max(level, logging.WARNING))


def build_config(args: argparse.Namespace) -> ServeConfig:
    if args.config:
        cfg = load_config(args.config)
        if args.target:
            raise ConfigError("give either TARGET or --config, not both")
    else:
        if not args.target:
            raise ConfigError("no TARGET given (a file, block device, memory:SIZE or rbd:...)")
        cfg = ServeConfig(exports=[ExportConfig(args.export_name, args.target, args.description,
                                                args.read_only)])
    if args.bind is not None:
        cfg.bind = args.bind
    if args.port is not None:
        cfg.port = args.port
    if args.socket is not None:
        cfg.socket = args.socket
    if args.read_only:
        for e in cfg.exports:
            e.read_only = True
    return cfg


def build_server(args: argparse.Namespace) -> Server:
    cfg = build_config(args)
    ceph = CephOptions(conf=args.ceph_conf, name=args.ceph_name, keyring=args.ceph_keyring)
    exports = []
    failed = []
    for e in cfg.exports:
        try:
            backend = open_backend(e.target, read_only=e.read_only, ceph=ceph)
        except BackendError as exc:
            # one unreachable target must not take the other exports down
            log.error("export %r: cannot open %s: %s", e.name, e.target, exc.strerror)
            failed.append(f"{e.name or '(default)'}: {exc.strerror}")
            continue
        exports.append(Export(e.name, backend, e.description, e.read_only,
                              allocation_depth=args.allocation_depth))
    if not exports:
        raise ConfigError("cannot open any export: " + "; ".join(failed))
    default = cfg.default_export
    if default is not None and default not in {x.name for x in exports}:
        log.error("default export %r is unavailable; using %r", default, exports[0].name)
        default = exports[0].name
    registry = ExportRegistry(exports, default=default)
    tls = TLSMode(args.tls)
    ctx = None
    if tls is not TLSMode.OFF:
        ctx = server_tls_context(certificates_dir=args.tls_certificates, cert=args.tls_cert,
                                 key=args.tls_key, ca=args.tls_ca,
                                 verify_peer=args.tls_verify_peer)
    limits = Limits(max_connections=args.max_connections,
                    max_connections_per_address=args.max_connections_per_address,
                    handshake_timeout=args.handshake_timeout, max_inflight=args.max_inflight,
                    request_timeout=args.request_timeout)
    server = Server(registry, ServerOptions(tls=tls, tls_context=ctx, limits=limits,
                                            x_close=not args.no_safe_close,
                                            extended_headers=not args.no_extended_headers,
                                            max_request_size=args.max_request_size))
    if args.allow or args.default_deny:
        server.set_acl(args.allow, default_deny=args.default_deny)
    if cfg.socket:
        server.listen_unix(cfg.socket)
    if not cfg.socket or cfg.bind is not None or cfg.port is not None:
        server.listen_tcp(cfg.bind, 10809 if cfg.port is None else cfg.port)
    return server


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, args.quiet)
    try:
        server = build_server(args)
    except (ConfigError, TLSConfigError, ValueError) as exc:
        print(f"pynbd serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"pynbd serve: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: finishing in-flight requests", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    from pynbd.migration.control import attach_migration

    control = None
    if args.control:
        from pynbd.server.control import ControlServer

        control = ControlServer(args.control)
        server.attach_control(control)
    migration = attach_migration(server, control)  # gates, crash recovery, mirror verbs
    if control is not None:
        control.start()
    server.start()
    for uri in server.uris():
        print(uri, flush=True)
    if args.metrics:
        from pynbd.server.metrics import start_metrics

        try:
            host, port = start_metrics(server, args.metrics)
        except (OSError, ValueError) as exc:
            print(f"pynbd serve: metrics: {exc}", file=sys.stderr)
            server.shutdown()
            return 2
        log.info("metrics on http://%s:%d/metrics", host, port)
    for name, export in server.registry.exports.items():
        log.info("serving export %r: %s (%d bytes%s)", name, export.backend.name,
                 export.info.size, ", read-only" if export.read_only else "")
    while not stop.wait(0.5):
        pass
    migration.shutdown()
    server.shutdown()
    log.info("stopped")
    return 0
