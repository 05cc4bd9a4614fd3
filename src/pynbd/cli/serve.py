"""``pynbd serve``: serve files, block devices, memory or RBD images over NBD."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from pynbd.backends import BackendError, CephOptions, open_backend, parse_filter, parse_kv
from pynbd.protocol.constants import DEFAULT_MAX_REQUEST
from pynbd.protocol.server import TLSMode
from pynbd.server.config import ConfigError, ExportConfig, ServeConfig, load_config
from pynbd.server.exports import Export, ExportRegistry
from pynbd.server.server import Limits, Server, ServerOptions
from pynbd.server.service import ActivationError, PidFile, listen_fds, sd_notify
from pynbd.server.tls import TLSConfigError, server_tls_context
from pynbd.util.net import is_loopback

if TYPE_CHECKING:
    from pynbd.backup.manager import BackupManager
    from pynbd.migration.control import MigrationSource

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
    g.add_argument("--max-handshakes", type=int, default=d.max_handshakes, metavar="N",
                   help="connections still negotiating, in their own pool: when it is full "
                        "the silent, then the oldest, is dropped (default "
                        f"{d.max_handshakes})")
    g.add_argument("--max-handshakes-per-address", type=int,
                   default=d.max_handshakes_per_address, metavar="N",
                   help="negotiating connections from one address (default "
                        f"{d.max_handshakes_per_address})")
    g.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout,
                   metavar="SECONDS",
                   help="drop clients that do not finish negotiation in time "
                        f"(default {d.handshake_timeout:g})")
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
                   help="file or block device, memory:SIZE, rbd:POOL/IMAGE[@SNAP], "
                        "python:PLUGIN.py[:CLASS] or python:module[:CLASS], or a scheme an "
                        "installed package registers")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE",
                   help="the plugin's parameters (docs/plugins.md)")
    p.add_argument("--filter", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   dest="filters",
                   help="put a filter in front of the plugin (repeatable; the first is "
                        "outermost): cow, rate, delay, error, log, stats, blocksize, "
                        "readonly, or one a package registers")
    p.add_argument("--bind", "-b", metavar="ADDR", default=None,
                   help="address to listen on (default: loopback, 127.0.0.1 and ::1); a "
                        "non-loopback address needs --tls=require --tls-verify-peer (client "
                        "certificates) or --insecure")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without authenticating "
                        "clients (any host that can reach the port can read and write)")
    p.add_argument("--workers", default="auto", metavar="N|auto",
                   help="worker processes serving connections (default auto: one per CPU, "
                        "at most 8; 1 serves in one process)")
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
    add_service_arguments(p)
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="more logging (-v per-connection detail, -vv every request)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    p.set_defaults(func=run)


def parse_workers(text: str) -> int:
    if text == "auto":
        return max(1, min(os.cpu_count() or 1, 8))
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--workers {text!r}: expected a number or auto") from None
    if not 1 <= n <= 256:
        raise ConfigError(f"--workers {n}: expected 1 to 256")
    return n


def check_exposure(bind: str | None, tcp: bool, tls: TLSMode, verify_peer: bool,
                   insecure: bool) -> None:
    """A listener off this machine must authenticate clients, or be asked for by name."""
    if not tcp or bind is None or is_loopback(bind):
        return
    if tls is TLSMode.REQUIRE and verify_peer:
        return
    if insecure:
        log.warning("listening on %s WITHOUT authenticating clients (--insecure): any host "
                    "that reaches the port can read and write the exports", bind or "*")
        return
    raise ConfigError(
        f"refusing to listen on {bind or 'every address'} without authenticating clients: "
        "use --tls=require --tls-verify-peer with client certificates, a Unix socket "
        "(--socket), a loopback address, or --insecure to serve anyone who can reach it")


def setup_logging(verbose: int, quiet: bool, fmt: str = "text") -> None:
    """-q warnings, default info (with one access line per client), -v per-connection
    detail, -vv every request (debug)."""
    from pynbd.util.logs import configure

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    configure(level, fmt, quiet_server=verbose < 1)


def add_service_arguments(p: argparse.ArgumentParser, run: bool = True) -> None:
    g = p.add_argument_group("running as a service")
    g.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines as text (default) or one JSON object per line")
    g.add_argument("--pidfile", metavar="PATH", help="write the process id here once serving")
    g.add_argument("--exit-with-parent", action="store_true",
                   help="exit when the parent process exits (Linux)")
    g.add_argument("--exit-when-idle", type=float, metavar="SECONDS", default=0.0,
                   help="exit once no client has been connected for SECONDS")
    if run:
        g.add_argument("--run", metavar="CMD",
                       help="captive mode: serve (on a private Unix socket unless an address "
                            "is given), run CMD with $uri $nbd $port $unixsocket $exportname "
                            "$tls set, exit with its status when it exits")


def build_config(args: argparse.Namespace) -> ServeConfig:
    if args.config:
        cfg = load_config(args.config)
        if args.target or args.params or args.filters:
            raise ConfigError("give either TARGET (with KEY=VALUE and --filter) or --config, "
                              "not both")
    else:
        if not args.target:
            raise ConfigError("no TARGET given (a file, block device, memory:SIZE or rbd:...)")
        cfg = ServeConfig(exports=[ExportConfig(
            args.export_name, args.target, args.description, args.read_only,
            params=parse_kv(args.params, args.target),
            filters=[parse_filter(f) for f in args.filters])])
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


def open_exports(cfg: ServeConfig, args: argparse.Namespace) -> ExportRegistry:
    """Every export that opens (one unreachable target does not take the others down)."""
    ceph = CephOptions(conf=args.ceph_conf, name=args.ceph_name, keyring=args.ceph_keyring)
    exports = []
    failed = []
    for e in cfg.exports:
        try:
            backend = open_backend(e.target, read_only=e.read_only, ceph=ceph,
                                   params=e.params, filters=e.filters)
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
    return ExportRegistry(exports, default=default)


def build_server(args: argparse.Namespace) -> Server:
    cfg = build_config(args)
    registry = open_exports(cfg, args)
    args._serve_config = cfg  # bitmaps, for attach_backup
    tls = TLSMode(args.tls)
    ctx = None
    if tls is not TLSMode.OFF:
        ctx = server_tls_context(certificates_dir=args.tls_certificates, cert=args.tls_cert,
                                 key=args.tls_key, ca=args.tls_ca,
                                 verify_peer=args.tls_verify_peer)
    tls_files = None
    if ctx is not None:
        tls_files = {"certificates_dir": args.tls_certificates, "cert": args.tls_cert,
                     "key": args.tls_key, "ca": args.tls_ca,
                     "verify_peer": args.tls_verify_peer}
    limits = Limits(max_connections=args.max_connections,
                    max_connections_per_address=args.max_connections_per_address,
                    max_handshakes=args.max_handshakes,
                    max_handshakes_per_address=args.max_handshakes_per_address,
                    handshake_timeout=args.handshake_timeout, max_inflight=args.max_inflight,
                    request_timeout=args.request_timeout)
    activated = listen_fds()
    if activated and (args.bind is not None or args.port is not None or args.socket):
        raise ConfigError("socket-activated (LISTEN_FDS): do not give --bind/--port/--socket; "
                          "the .socket unit says where to listen")
    if getattr(args, "run", None) and not activated and cfg.socket is None \
            and args.bind is None and args.port is None:
        # captive mode: a private Unix socket only the command can reach
        import tempfile

        private = tempfile.mkdtemp(prefix="pynbd-run-")
        args._private_dir = private
        cfg.socket = os.path.join(private, "nbd.sock")
    tcp = not activated and (not cfg.socket or cfg.bind is not None or cfg.port is not None)
    check_exposure(cfg.bind if cfg.bind is not None else None, tcp, tls,
                   args.tls_verify_peer, args.insecure)
    for a in activated:
        if a.kind == "tcp":
            check_exposure(str(a.sock.getsockname()[0]), True, tls, args.tls_verify_peer,
                           args.insecure)
    server = Server(registry, ServerOptions(
        tls=tls, tls_context=ctx, tls_files=tls_files, limits=limits,
        x_close=not args.no_safe_close, workers=parse_workers(args.workers),
        log_level=logging.getLogger().getEffectiveLevel(),
        log_quiet_server=args.verbose < 1, log_format=args.log_format,
        extended_headers=not args.no_extended_headers, max_request_size=args.max_request_size))
    for a in activated:
        server.adopt_listener(a.sock)
        log.info("socket-activated listener %s (%s)", a.name,
                 a.sock.getsockname() or "unix")
    if args.allow or args.default_deny:
        server.set_acl(args.allow, default_deny=args.default_deny)
    if cfg.socket and not activated:
        server.listen_unix(cfg.socket)
    if tcp:
        port = 10809 if cfg.port is None else cfg.port
        if cfg.bind is None:
            listen_loopback(server, port)
        else:
            server.listen_tcp(cfg.bind, port)
    return server


def listen_loopback(server: Server, port: int) -> None:
    """The default: 127.0.0.1 and, where the host has it, ::1 on the same port."""
    first = server.listen_tcp("127.0.0.1", port)
    try:
        server.listen_tcp("::1", first[0].port)
    except OSError as exc:
        log.debug("no IPv6 loopback listener: %s", exc)


def run(args: argparse.Namespace) -> int:
    try:
        setup_logging(args.verbose, args.quiet, args.log_format)
    except ValueError as exc:
        print(f"pynbd serve: {exc}", file=sys.stderr)
        return 2
    if args.exit_with_parent:
        from pynbd.server.service import exit_with_parent

        exit_with_parent()
    try:
        server = build_server(args)
    except (ConfigError, TLSConfigError, ActivationError, ValueError) as exc:
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
    try:
        migration, backup = _start(args, server)
    except ConfigError as exc:
        print(f"pynbd serve: {exc}", file=sys.stderr)
        server.shutdown()
        return 2
    if not args.run:
        for uri in server.uris():
            print(uri, flush=True)
    if args.metrics and not _start_metrics(server, args.metrics, args.insecure):
        server.shutdown()
        return 2
    for name, export in server.registry.exports.items():
        log.info("serving export %r: %s (%d bytes%s)", name, export.backend.name,
                 export.info.size, ", read-only" if export.read_only else "")
    pidfile = PidFile(args.pidfile) if args.pidfile else None
    if pidfile is not None:
        pidfile.write()
    sd_notify(f"READY=1\nSTATUS=serving {', '.join(server.uris())}\nMAINPID={os.getpid()}")
    status = 0
    child = start_captive(args, server) if args.run else None
    try:
        status = _serve_until_stopped(args, server, stop, child)
    finally:
        sd_notify("STOPPING=1")
        if _stop_captive(child):
            status = status or 1
        migration.shutdown()
        server.shutdown()
        backup.shutdown()  # after the last write: bitmaps saved, marked not in use
        if pidfile is not None:
            pidfile.remove()
        private = getattr(args, "_private_dir", None)
        if private:
            import shutil

            shutil.rmtree(private, ignore_errors=True)
    log.info("stopped")
    return status


def _start(args: argparse.Namespace,
           server: Server) -> tuple[MigrationSource, BackupManager]:
    """The control socket, the migration verbs and the bitmaps, then the server itself."""
    from pynbd.backup.manager import BitmapConfig, attach_backup
    from pynbd.migration.control import attach_migration
    from pynbd.server.bitmaps import BitmapError

    control = None
    if args.control:
        from pynbd.server.control import ControlServer

        control = ControlServer(args.control)
        server.attach_control(control)
    migration = attach_migration(server, control)  # gates, crash recovery, mirror verbs
    try:  # bitmaps loaded (and marked in use) before the first write
        backup = attach_backup(server, control, {
            e.name: BitmapConfig(e.bitmaps, e.bitmap_dir)
            for e in args._serve_config.exports})
    except (BitmapError, OSError) as exc:
        migration.shutdown()
        raise ConfigError(f"bitmaps: {exc}") from exc
    server.start()  # the workers start here, before any other thread
    if control is not None:
        control.start()
    return migration, backup


def _start_metrics(server: Server, where: str, insecure: bool) -> bool:
    """The Prometheus endpoint; False (said on stderr) when it cannot start. It has no
    authentication: beyond loopback only with --insecure."""
    from pynbd.server.metrics import parse_listen, start_metrics

    try:
        host = parse_listen(where)[0]
        if not is_loopback(host) and not insecure:
            print(f"pynbd serve: metrics: refusing to serve metrics on {host} (not "
                  "loopback) without authentication; bind them to loopback and put an "
                  "authenticating proxy in front, or pass --insecure", file=sys.stderr)
            return False
        host, port = start_metrics(server, where)
    except (OSError, ValueError) as exc:
        print(f"pynbd serve: metrics: {exc}", file=sys.stderr)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True


def _stop_captive(child: subprocess.Popen[bytes] | None) -> bool:
    """Stop the --run command if it still runs; whether it had to be stopped."""
    if child is None or child.poll() is not None:
        return False
    child.terminate()
    try:
        child.wait(10)
    except Exception:
        child.kill()
    return True


def _serve_until_stopped(args: argparse.Namespace, server: Server, stop: threading.Event,
                         child: subprocess.Popen[bytes] | None) -> int:
    """Until a signal, the end of the --run command, or --exit-when-idle; the exit
    status (the command's)."""
    while not stop.wait(0.2):
        if child is not None and child.poll() is not None:
            status = child.returncode if child.returncode >= 0 else 128 - child.returncode
            log.info("--run command exited with status %d: stopping", status)
            return status
        if args.exit_when_idle and server.idle_seconds() >= args.exit_when_idle:
            log.info("no client for %.0f s (--exit-when-idle): stopping",
                     args.exit_when_idle)
            return 0
    return 0


def start_captive(args: argparse.Namespace, server: Server) -> subprocess.Popen[bytes]:
    """``--run CMD``: nbdkit's captive mode variables, CMD run by the shell."""
    from urllib.parse import parse_qs, urlsplit

    uris = server.uris()
    uri = uris[0]
    env = dict(os.environ)
    parts = urlsplit(uri)
    unix = parse_qs(parts.query).get("socket", [""])[0] if "+unix" in parts.scheme else ""
    env.update({"uri": uri, "nbd": uri, "port": str(parts.port or "") if not unix else "",
                "unixsocket": unix, "exportname": server.registry.default or "",
                "tls": {"off": "0", "on": "1", "require": "2"}[server.options.tls.value]})
    log.info("--run: %s", args.run)
    return subprocess.Popen(["/bin/sh", "-c", args.run], env=env)
