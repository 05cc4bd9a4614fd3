"""Migration verbs on a source server's control socket and the crash-recovery check.

Verbs: ``mirror`` (start), ``mirror-speed``, ``break``, ``migration-status``; the
``status`` verb gains a ``migration`` object. :func:`attach_migration` must run before the
server starts serving: it gives every export an I/O gate and, when a durable record says
a handover was in progress (``committing``) or done (``stepped-down``), starts the export
paused-and-in-doubt or stepped down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pynbd.migration.handover import Completed, Handover, Retry
from pynbd.migration.handover_run import do_effect, mark_completed
from pynbd.migration.indoubt import resolve_in_doubt
from pynbd.migration.mirror import Mirror, MirrorOptions, step_down_export
from pynbd.migration.records import read_record, record_path
from pynbd.migration.states import MirrorResult, MirrorState, SourceRecord
from pynbd.migration.transport import NBDTransport, Transport, TransportError
from pynbd.server.control import ControlError, ControlServer
from pynbd.server.exports import Export, IOGate
from pynbd.server.server import Server
from pynbd.util.net import is_loopback

log = logging.getLogger("pynbd.migration")


def read_psk(path: str) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped); ValueError if unusable."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
    if len(key) < 16:
        raise ValueError(f"the key in {path} is {len(key)} bytes: a pre-shared key must be at "
                         "least 16 bytes (make one with: head -c 32 /dev/urandom | base64 > "
                         "FILE)")
    return key


def check_destination(opts: MirrorOptions) -> None:
    """Refuse a destination nobody authenticates unless ``opts.insecure``: the mirror
    hands the whole image to it and steps down (maybe unlinks) on its word."""
    to = opts.to
    if to.startswith("msgr2://"):
        if opts.secure and not opts.psk_file:
            raise ValueError("--secure needs --psk-file (msgr2 secure mode is keyed by the "
                             "pre-shared-key authentication)")
        if not opts.psk_file and not opts.insecure:
            raise ValueError(f"refusing to mirror to {to} without authentication: give "
                             "--psk-file FILE (the key `pynbd listen --psk-file` uses) or, to "
                             "send the image to a destination nobody authenticates, "
                             "--insecure")
        return
    if to.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
        from pynbd.client import parse_uri

        u = parse_uri(to)
        if u.is_unix or opts.insecure:
            return
        if u.tls and u.tls_verify_peer:
            return
        if is_loopback(u.host):
            return
        raise ValueError(f"refusing to mirror to {to} without authentication: plain NBD "
                         f"to {u.host} (not loopback) sends the image in clear to a server "
                         "nobody verified; use nbds://... (TLS, the server certificate is "
                         "verified) or --insecure")


def make_factory(opts: MirrorOptions) -> Callable[[], Transport]:
    to = opts.to
    if not to.startswith(("msgr2://", "nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
        raise ValueError(f"--to must be msgr2://HOST:PORT or an NBD URI, not {to!r}")
    check_destination(opts)
    if to.startswith("msgr2://"):
        from pynbd.migration.msgr2_transport import Lease, Msgr2Transport, parse_msgr2_uri

        host, port = parse_msgr2_uri(to)
        psk = read_psk(opts.psk_file) if opts.psk_file else None
        lease = Lease()

        def m2() -> Transport:
            return Msgr2Transport(host, port, psk=psk, secure=opts.secure,
                                  reply_timeout=opts.timeout or None, lease=lease)

        return m2

    def nbd() -> Transport:
        return NBDTransport(to, reply_timeout=opts.timeout or None)

    return nbd


class _Unusable(Transport):
    def __init__(self, why: str) -> None:
        self.why = why

    def connect(self, size: int) -> None:
        raise TransportError(self.why)


def _unusable(why: str) -> Callable[[], Transport]:
    def make() -> Transport:
        return _Unusable(why)

    return make


def _image_path(export: Export) -> str | None:
    path = getattr(export.backend, "path", None)
    return path if isinstance(path, str) else None


class _Restored:
    """A source restarted with a ``committing`` record: in doubt until resolved."""

    def __init__(self, mgr: MigrationSource, export: Export, rec: dict[str, Any]) -> None:
        self.mgr = mgr
        self.export = export
        self.rec = rec
        # a record written before --insecure existed and without a key was keyless
        insecure = bool(rec.get("insecure", not rec.get("psk_file")))
        opts = MirrorOptions(to=rec.get("to", ""), psk_file=rec.get("psk_file"),
                             secure=bool(rec.get("secure")), insecure=insecure,
                             max_attempts=5)
        try:
            factory = make_factory(opts)
        except (ValueError, OSError) as exc:
            # stay in doubt (clients paused) and say why in the status and the log
            log.error("export %r: cannot ask %s about epoch %s: %s", export.name, opts.to,
                      rec.get("epoch"), exc)
            factory = _unusable(str(exc))
        self.mirror = Mirror(export, opts, factory, mgr.records[export.name],
                             epoch_base=int(rec.get("epoch", 0)), image_path=_image_path(export),
                             on_step_down=mgr._disconnect_later)
        epoch = int(rec.get("epoch", 0))
        self.mirror.epoch = epoch
        self.mirror.state = MirrorState.IN_DOUBT
        self.mirror.authoritative = False
        self.handover = Handover.recovered(opts.to, export.info.size, epoch, transport="")

    def run(self) -> None:
        m = self.mirror
        h = self.handover
        try:
            committed = resolve_in_doubt(m, h.epoch)
            for effect in h.outcome(committed, time.monotonic()):
                if isinstance(effect, Completed):
                    mark_completed(m)
                elif isinstance(effect, Retry):
                    # nothing to copy on with: the migration is over, this copy serves
                    m.state = MirrorState.IDLE
                    m.result = MirrorResult.ABORTED
                    m.authoritative = h.authoritative
                else:
                    do_effect(m, effect)
        finally:
            m.finished = time.monotonic()
            m.done.set()


class MigrationSource:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.mirrors: dict[str, Mirror] = {}
        self.records: dict[str, str | None] = {}
        self.epochs: dict[str, int] = {}
        self.stepped_down: dict[str, dict[str, Any]] = {}

    # --- startup -----------------------------------------------------------------------

    def recover(self) -> None:
        for name, export in self.server.registry.exports.items():
            if export.gate is None:
                export.gate = IOGate()
            path = record_path(_image_path(export))
            self.records[name] = path
            rec = read_record(path)
            if rec is None or rec.get("role") != "source":
                continue
            epoch = int(rec.get("epoch", 0))
            self.epochs[name] = epoch
            state = rec.get("state")
            if state == SourceRecord.STEPPED_DOWN:
                log.warning("export %r: stepped down at epoch %d (migrated to %s): refusing I/O",
                            name, epoch, rec.get("to"))
                step_down_export(export, f"migrated to {rec.get('to')} (epoch {epoch})")
                self.stepped_down[name] = rec
            elif state == SourceRecord.COMMITTING:
                log.warning("export %r: handover of epoch %d to %s in doubt: clients stay "
                            "paused until the destination says what happened",
                            name, epoch, rec.get("to"))
                export.gate.pause(0)
                restored = _Restored(self, export, rec)
                self.mirrors[name] = restored.mirror
                threading.Thread(target=restored.run, daemon=True, name="in-doubt").start()

    # --- verbs -------------------------------------------------------------------------

    def _export(self, req: dict[str, Any]) -> Export:
        name = req.get("export")
        e = self.server.registry.get(name if isinstance(name, str) else "")
        if e is None:
            raise ControlError(f"no export {name!r}")
        return e

    def _disconnect_later(self, m: Mirror) -> None:
        export = m.export

        def later() -> None:
            time.sleep(m.opts.disconnect_delay)
            self.server.disconnect_export(export.name, "the export has moved: disconnecting")

        threading.Thread(target=later, daemon=True, name="step-down-disconnect").start()

    def do_mirror(self, req: dict[str, Any]) -> dict[str, Any]:
        export = self._export(req)
        to = req.get("to")
        if not isinstance(to, str) or not to:
            raise ControlError('"to" (msgr2://HOST:PORT or an NBD URI) is required')
        with self.lock:
            cur = self.mirrors.get(export.name)
            if cur is not None and not cur.done.is_set():
                raise ControlError(f"a migration is already running (state {cur.state})")
            gate = export.gate
            if gate is None or gate.stepped_down:
                raise ControlError("this export has stepped down: it is not authoritative")
            if gate.paused:
                raise ControlError("this export is paused (a handover is in doubt)")
            opts = MirrorOptions(
                to=to, max_speed=int(req.get("max_speed") or 0), unlink=bool(req.get("unlink")),
                downtime_ms=int(req.get("downtime_ms") or 300),
                max_attempts=max(1, int(req.get("max_attempts") or 5)),
                psk_file=req.get("psk_file"), secure=bool(req.get("secure")),
                insecure=bool(req.get("insecure")),
                timeout=max(0.0, float(req.get("timeout") or 0.0)))
            try:
                factory = make_factory(opts)
            except (ValueError, OSError) as exc:
                raise ControlError(str(exc)) from exc
            m = Mirror(export, opts, factory, self.records.get(export.name),
                       epoch_base=self.epochs.get(export.name, 0),
                       image_path=_image_path(export), on_step_down=self._disconnect_later)
            self.mirrors[export.name] = m
            m.start()
        if m.wait_connected(float(req.get("connect_timeout") or 30.0)):
            return {"started": True, "migration": m.status()}
        if not m.done.is_set():
            return {"started": False, "migration": m.status()}
        raise ControlError(f"mirror {m.result}: {m.error}")

    def _mirror(self, req: dict[str, Any]) -> Mirror:
        export = self._export(req)
        m = self.mirrors.get(export.name)
        if m is None:
            raise ControlError("no migration has been started")
        return m

    def do_speed(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self._mirror(req)
        try:
            bps = int(req["bps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ControlError('"bps" (bytes per second, 0 = unlimited) is required') from exc
        if bps < 0:
            raise ControlError("bps must be >= 0")
        m.set_speed(bps)
        return {"speed_limit_bytes_per_second": bps}

    def shutdown(self, timeout: float = 10.0) -> None:
        """The server is stopping: abandon running mirrors (their clients are resumed, not
        left paused behind a destination that may hang), except one whose commit is being
        decided -- its clients stay paused and a restart resolves it from the record."""
        running = [m for m in self.mirrors.values() if not m.done.is_set()]
        for m in running:
            try:
                m.request_break()
            except RuntimeError as exc:
                log.warning("stopping with the handover in doubt: %s", exc)
        deadline = time.monotonic() + timeout
        for m in running:
            m.done.wait(max(0.0, deadline - time.monotonic()))

    def do_break(self, req: dict[str, Any]) -> dict[str, Any]:
        m = self._mirror(req)
        if m.done.is_set():
            raise ControlError(f"no migration running (last one: {m.result})")
        try:
            m.request_break()
        except RuntimeError as exc:
            raise ControlError(str(exc)) from exc
        m.done.wait(float(req.get("timeout") or 30.0))
        return {"migration": m.status()}

    def status(self, export: Export | None = None) -> dict[str, Any]:
        if export is None:
            name = self.server.registry.default or ""
            export = self.server.registry.get(name)
        if export is None:
            return {"role": "none"}
        m = self.mirrors.get(export.name)
        if m is not None:
            return m.status()
        gate = export.gate
        rec = self.stepped_down.get(export.name)
        out = idle_status()
        if rec is not None:
            out.update({"role": "source", "state": MirrorState.STEPPED_DOWN,
                        "result": MirrorResult.COMPLETED,
                        "epoch": int(rec.get("epoch", 0)), "to": rec.get("to"),
                        "authoritative": False})
            return out
        out.update({"epoch": self.epochs.get(export.name, 0),
                    "authoritative": not (gate is not None and gate.stepped_down)})
        return out

    def do_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"migration": self.status(self._export(req))}


def idle_status() -> dict[str, Any]:
    """Every migration status field, for when nothing is running."""
    return {"role": "none", "state": "idle", "result": None, "error": "", "to": None,
            "bytes_done": 0, "bytes_left": 0, "dirty_bytes": 0, "speed_bytes_per_second": 0,
            "elapsed_seconds": 0.0, "eta_seconds": None, "speed_limit_bytes_per_second": 0,
            "attempts": 0, "epoch": 0, "authoritative": True}


def attach_migration(server: Server, control: ControlServer | None) -> MigrationSource:
    """Install gates, recover from records, and register the migration verbs."""
    src = MigrationSource(server)
    src.recover()
    if control is None:
        return src
    control.register("mirror", src.do_mirror)
    control.register("mirror-speed", src.do_speed)
    control.register("break", src.do_break)
    control.register("migration-status", src.do_status)

    def status(req: dict[str, Any]) -> dict[str, Any]:
        st = server.status()
        st["migration"] = src.status()
        return {"status": st}

    control.register("status", status)
    return src
