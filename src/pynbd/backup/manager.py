"""The supervisor's side of backups: named dirty bitmaps and point-in-time views of its
exports, their control verbs (``bitmap``, ``checkpoint``), persistence and status.

State lives here; every worker (in-process or a worker process) is told about each
change through :meth:`Server.broadcast_backup` (``pynbd.backup.workerops``), and a
worker that starts later (a replaced one) through a worker hook that replays the whole
state. Changes that must be atomic with respect to client writes (adding or clearing a
bitmap, taking a checkpoint) happen while the export's I/O is paused in every worker,
with the same pause live migration's handover uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pynbd.filters.cbw import BLOCK, ViewState
from pynbd.protocol.constants import BASE_ALLOCATION
from pynbd.server.bitmaps import (
    DEFAULT_GRANULARITY,
    Bitmap,
    BitmapError,
    BitmapMap,
    BitmapStore,
    check_granularity,
    check_name,
)
from pynbd.server.control import ControlError, ControlServer
from pynbd.server.exports import Export
from pynbd.server.server import Server, WorkerHandle

log = logging.getLogger("pynbd.backup")

PAUSE_TIMEOUT = 30.0


@dataclass
class BitmapConfig:
    """What an export's config asks for: ``bitmaps = [...]``, ``bitmap_dir``."""

    bitmaps: list[tuple[str, int]] = field(default_factory=list)
    bitmap_dir: str | None = None


@dataclass
class View:
    checkpoint: str
    name: str
    state: ViewState
    map_fd: int
    scratch_fd: int
    scratch_where: str
    bitmap: Bitmap | None
    export: Export
    created: float = field(default_factory=time.time)

    def close(self) -> None:
        self.state.close()
        for fd in (self.map_fd, self.scratch_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class ExportBackup:
    export: Export
    #: where the bitmaps are stored (None: memory only)
    store_dir: str | None
    base_contexts: tuple[str, ...]
    store: BitmapStore | None = None
    bitmaps: dict[str, Bitmap] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)

    def live_bitmaps(self) -> list[Bitmap]:
        """The bitmaps of the export itself (not frozen into a view)."""
        return [b for b in self.bitmaps.values() if not b.frozen_by]

    def chain_head(self) -> Bitmap | None:
        heads = [b for b in self.live_bitmaps() if b.checkpoint]
        return max(heads, key=lambda b: b.created) if heads else None


def _image_path(export: Export) -> str | None:
    from pynbd.filters.base import Filter

    b = export.backend
    plugin = b.layers[-1] if isinstance(b, Filter) else b
    path = getattr(plugin, "path", None)
    if not isinstance(path, str):
        return None
    try:
        import stat

        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    return path


class BackupManager:
    def __init__(self, server: Server, configs: dict[str, BitmapConfig] | None = None) -> None:
        self.server = server
        self.lock = threading.RLock()
        self.exports: dict[str, ExportBackup] = {}
        configs = configs or {}
        for name, e in list(server.registry.exports.items()):
            cfg = configs.get(name, BitmapConfig())
            path = _image_path(e)
            store_dir = cfg.bitmap_dir or (BitmapStore.for_image(path) if path else None)
            self.exports[name] = ExportBackup(e, store_dir, e.info.meta_contexts)
        for name, eb in self.exports.items():
            self._load(eb, configs.get(name, BitmapConfig()))
        server.worker_hooks.append(self._sync_worker)
        server.status_hooks.append(self._status)

    # --- start-up ------------------------------------------------------------------------

    def _open_store(self, eb: ExportBackup) -> BitmapStore | None:
        if eb.store is None and eb.store_dir is not None:
            store = BitmapStore(eb.store_dir, eb.export.info.size)
            store.open()
            eb.store = store
        return eb.store

    def _load(self, eb: ExportBackup, cfg: BitmapConfig) -> None:
        size = eb.export.info.size
        if eb.store_dir is not None and os.path.isdir(eb.store_dir):
            store = self._open_store(eb)
            assert store is not None
            for sb in store.load():
                bm = Bitmap(sb.name, BitmapMap(size, sb.granularity), sb.checkpoint,
                            sb.consistent, sb.reason, created=sb.created)
                if sb.data is not None:
                    bm.map.load(sb.data)
                eb.bitmaps[sb.name] = bm
                if not bm.consistent:
                    log.warning("export %r: bitmap %r is inconsistent: %s", eb.export.name,
                                sb.name, sb.reason)
        for name, gran in cfg.bitmaps:
            if name not in eb.bitmaps:
                eb.bitmaps[name] = Bitmap(name, BitmapMap(size, gran))
                log.info("export %r: new bitmap %r (granularity %d)", eb.export.name, name,
                         gran)
        if eb.bitmaps and eb.store_dir is None:
            self._memory_only_warning(eb)
        self._persist(eb)
        self._refresh_info(eb, broadcast=False)

    @staticmethod
    def _memory_only_warning(eb: ExportBackup) -> None:
        log.warning("export %r (%s) has no image file: its bitmaps live in memory only "
                    "and are lost when the server stops", eb.export.name,
                    eb.export.backend.name)

    def _persist(self, eb: ExportBackup, *, in_use: bool = True,
                 with_data: bool = False) -> None:
        if not eb.bitmaps and eb.store is None:
            return
        store = self._open_store(eb)
        if store is not None:
            store.write([b for b in eb.live_bitmaps()], in_use=in_use, with_data=with_data)

    def shutdown(self) -> None:
        """The server has stopped (no more writes): save every bitmap, drop the views."""
        with self.lock:
            for eb in self.exports.values():
                for v in list(eb.views.values()):
                    v.close()
                eb.views.clear()
                try:
                    self._persist(eb, in_use=False, with_data=True)
                except (OSError, BitmapError) as exc:
                    log.error("export %r: cannot save its bitmaps: %s (they will be "
                              "inconsistent at the next start)", eb.export.name, exc)
                if eb.store is not None:
                    eb.store.close()
                    eb.store = None
                    log.info("export %r: bitmaps saved", eb.export.name)

    # --- telling the workers -------------------------------------------------------------

    def _broadcast(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        replies = self.server.broadcast_backup(msg, fds)
        errors = [r["error"] for r in replies if r and r.get("error")]
        if errors:
            raise ControlError(f"a worker refused {msg.get('action')}: {errors[0]}")

    @staticmethod
    def _attach_msg(export: str, bm: Bitmap, track: bool) -> dict[str, Any]:
        meta, _ = bm.map.share()
        return {"action": "bitmap-attach", "export": export, "name": bm.name, "meta": meta,
                "track": track, "context": bm.context}

    def _view_add_msg(self, eb: ExportBackup, v: View) -> dict[str, Any]:
        return {"action": "view-add", "export": eb.export.name, "view": v.name,
                "meta": v.state.share_meta(), "info": dataclasses.asdict(v.export.info)}

    def _sync_worker(self, handle: WorkerHandle) -> None:
        """A new worker: bring it up to date (runs on the server loop: no waiting)."""
        def ignore(_reply: Any) -> None:
            pass

        for eb in list(self.exports.values()):
            name = eb.export.name
            for bm in eb.live_bitmaps():
                if bm.consistent:
                    handle.backup(self._attach_msg(name, bm, True), [bm.map.fd], ignore)
            for v in list(eb.views.values()):
                handle.backup(self._view_add_msg(eb, v), [v.map_fd, v.scratch_fd], ignore)
                if v.bitmap is not None and v.bitmap.consistent:
                    handle.backup(self._attach_msg(v.name, v.bitmap, False),
                                  [v.bitmap.map.fd], ignore)

    def _refresh_info(self, eb: ExportBackup, broadcast: bool = True) -> None:
        live = eb.live_bitmaps()
        contexts = eb.base_contexts + tuple(b.context for b in live if b.consistent)
        refused = tuple((b.context, f"bitmap {b.name} is inconsistent: {b.reason}")
                        for b in live if not b.consistent)
        e = eb.export
        e.info = dataclasses.replace(e.info, meta_contexts=contexts, refused_contexts=refused)
        if broadcast:
            self._broadcast({"action": "info", "export": e.name,
                             "info": dataclasses.asdict(e.info)})

    def _paused(self, eb: ExportBackup) -> contextlib.AbstractContextManager[None]:
        """Client I/O of the export paused in every worker (if it is being served)."""
        gate = eb.export.gate

        @contextlib.contextmanager
        def run() -> Any:
            if gate is None or not self.server._started:
                yield
                return
            if gate.stepped_down:
                raise ControlError(f"export {eb.export.name!r} has stepped down (migrated)")
            if gate.paused:
                raise ControlError(f"export {eb.export.name!r} is paused (a migration "
                                   "handover is in progress); try again later")
            if not gate.pause(PAUSE_TIMEOUT):
                gate.resume()
                raise ControlError(f"export {eb.export.name!r}: requests did not finish "
                                   f"within {PAUSE_TIMEOUT:.0f} s; nothing changed")
            try:
                yield
            finally:
                gate.resume()

        return run()

    # --- bitmaps ---------------------------------------------------------------------------

    def _eb(self, export: object) -> ExportBackup:
        if export is not None and not isinstance(export, str):
            raise ControlError('"export" must be a string')
        e = self.server.registry.get(export or "")
        if e is None:
            raise ControlError(f"no export {export!r}")
        eb = self.exports.get(e.name)
        if eb is None:
            raise ControlError(f"export {e.name!r} is a point-in-time view: it has no "
                               "bitmaps or checkpoints of its own")
        return eb

    def add(self, export: str | None, name: str, granularity: int) -> Bitmap:
        with self.lock:
            eb = self._eb(export)
            check_name(name)
            if name in eb.bitmaps:
                raise BitmapError(f"export {eb.export.name!r} already has a bitmap {name!r}")
            bm = Bitmap(name, BitmapMap(eb.export.info.size, check_granularity(granularity)))
            with self._paused(eb):
                eb.bitmaps[name] = bm
                try:
                    self._broadcast(self._attach_msg(eb.export.name, bm, True), [bm.map.fd])
                    self._refresh_info(eb)
                except Exception:
                    del eb.bitmaps[name]
                    self._detach(eb.export.name, bm)
                    self._refresh_info(eb)
                    raise
            self._persist(eb)
            log.info("export %r: bitmap %r added (granularity %d)", eb.export.name, name,
                     bm.granularity)
            if eb.store_dir is None:
                self._memory_only_warning(eb)
            return bm

    def _detach(self, export: str, bm: Bitmap) -> None:
        self._broadcast({"action": "bitmap-detach", "export": export, "name": bm.name,
                         "context": bm.context})

    def _get(self, eb: ExportBackup, name: object) -> Bitmap:
        if not isinstance(name, str) or name not in eb.bitmaps:
            raise BitmapError(f"export {eb.export.name!r} has no bitmap {name!r}")
        bm = eb.bitmaps[name]
        if bm.frozen_by:
            raise BitmapError(f"bitmap {name!r} is frozen in view {bm.frozen_by}: release "
                              f"it (pynbd checkpoint --release) to drop it")
        return bm

    def remove(self, export: str | None, name: str) -> dict[str, Any]:
        with self.lock:
            eb = self._eb(export)
            bm = self._get(eb, name)
            del eb.bitmaps[name]
            self._detach(eb.export.name, bm)
            self._refresh_info(eb)
            self._persist(eb)
            if eb.store is not None:
                eb.store.remove_data(name)
            desc = bm.describe(eb.export.name, eb.store_dir is not None)
            bm.map.close()
            log.info("export %r: bitmap %r removed", eb.export.name, name)
            return desc

    def clear(self, export: str | None, name: str) -> Bitmap:
        with self.lock:
            eb = self._eb(export)
            bm = self._get(eb, name)
            if bm.checkpoint:
                # its name says "every change since checkpoint NAME": emptied, it would
                # make the next incremental backup silently incomplete
                raise BitmapError(
                    f"bitmap {name!r} belongs to checkpoint {name!r} and cannot be cleared "
                    "(an incremental backup from it would miss changes); take a new "
                    "checkpoint and a full backup of it, or remove the bitmap")
            with self._paused(eb):
                bm.map.clear()
                if not bm.consistent:
                    bm.consistent, bm.reason = True, ""
                    self._broadcast(self._attach_msg(eb.export.name, bm, True), [bm.map.fd])
                    self._refresh_info(eb)
            self._persist(eb)
            log.info("export %r: bitmap %r cleared", eb.export.name, name)
            return bm

    def describe_bitmaps(self, export: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            ebs = [self._eb(export)] if export is not None else list(self.exports.values())
            out = []
            for eb in ebs:
                for bm in eb.bitmaps.values():
                    out.append(bm.describe(eb.export.name, eb.store_dir is not None))
            return out

    # --- checkpoints and views --------------------------------------------------------------

    def checkpoint(self, export: str | None, name: str, granularity: int = DEFAULT_GRANULARITY,
                   scratch_dir: str | None = None) -> View:
        with self.lock:
            eb = self._eb(export)
            e = eb.export
            check_name(name, "checkpoint")
            if name in eb.bitmaps:
                raise BitmapError(f"export {e.name!r} already has a bitmap {name!r}")
            view_name = f"{e.name}@{name}"
            if view_name in self.server.registry.exports:
                raise BitmapError(f"an export named {view_name!r} exists already")
            gran = check_granularity(granularity)
            if scratch_dir is None:
                self._open_store(eb)
                scratch_dir = eb.store_dir or tempfile.gettempdir()
            size = e.info.size
            prev = eb.chain_head()
            new_bm = Bitmap(name, BitmapMap(size, gran), checkpoint=True)
            try:
                state, map_fd, scratch_fd, where = ViewState.create(view_name, size, scratch_dir)
            except OSError as exc:
                new_bm.map.close()
                raise BitmapError(f"cannot create the scratch file in {scratch_dir}: "
                                  f"{exc.strerror or exc}") from exc
            from pynbd.backup.view import ViewBackend

            vexp = Export(view_name, ViewBackend(e.backend, state, view_name),
                          description=f"{e.name} at checkpoint {name}", read_only=True)
            contexts: tuple[str, ...] = (BASE_ALLOCATION,)
            refused: tuple[tuple[str, str], ...] = ()
            if prev is not None and prev.consistent:
                contexts += (prev.context,)
            elif prev is not None:
                refused = ((prev.context, f"bitmap {prev.name} is inconsistent: "
                                          f"{prev.reason}"),)
            vexp.info = dataclasses.replace(vexp.info, meta_contexts=contexts,
                                            refused_contexts=refused)
            view = View(name, view_name, state, map_fd, scratch_fd, where, prev, vexp)
            try:
                with self._paused(eb):
                    # the instant: nothing runs; every change below is in place in every
                    # worker before the first request after it
                    if prev is not None:
                        prev.frozen_by = view_name
                        self._detach(e.name, prev)
                    eb.bitmaps[name] = new_bm
                    self._broadcast(self._attach_msg(e.name, new_bm, True), [new_bm.map.fd])
                    eb.views[name] = view
                    self._broadcast(self._view_add_msg(eb, view), [map_fd, scratch_fd])
                    if prev is not None and prev.consistent:
                        self._broadcast(self._attach_msg(view_name, prev, False),
                                        [prev.map.fd])
                    self._refresh_info(eb)
                    self.server.registry.exports[view_name] = vexp
            except Exception:
                log.exception("export %r: checkpoint %r failed; undoing it", e.name, name)
                self._undo_checkpoint(eb, view, new_bm)
                raise
            self._persist(eb)
            log.info("export %r: checkpoint %r: view %s (scratch in %s), bitmap %r%s",
                     e.name, name, view_name, where, name,
                     f", previous bitmap {prev.name!r} frozen" if prev else "")
            return view

    def _undo_checkpoint(self, eb: ExportBackup, view: View, new_bm: Bitmap) -> None:
        e = eb.export
        self.server.registry.exports.pop(view.name, None)
        with contextlib.suppress(Exception):
            self._broadcast({"action": "view-remove", "export": e.name, "view": view.name})
        eb.views.pop(view.checkpoint, None)
        if eb.bitmaps.get(new_bm.name) is new_bm:
            del eb.bitmaps[new_bm.name]
            with contextlib.suppress(Exception):
                self._detach(e.name, new_bm)
        prev = view.bitmap
        if prev is not None and prev.frozen_by == view.name:
            prev.frozen_by = None
            if prev.consistent:
                with contextlib.suppress(Exception):
                    self._broadcast(self._attach_msg(e.name, prev, True), [prev.map.fd])
        with contextlib.suppress(Exception):
            self._refresh_info(eb)
        view.close()

    def release(self, export: str | None, name: str) -> View:
        with self.lock:
            eb = self._eb(export)
            view = eb.views.get(name) if isinstance(name, str) else None
            if view is None:
                raise BitmapError(f"export {eb.export.name!r} has no checkpoint view {name!r}"
                                  + (f" (open: {', '.join(sorted(eb.views))})"
                                     if eb.views else ""))
            self.server.registry.exports.pop(view.name, None)
            del eb.views[name]
            try:
                self._broadcast({"action": "view-remove", "export": eb.export.name,
                                 "view": view.name})
            finally:
                bm = view.bitmap
                if bm is not None and eb.bitmaps.get(bm.name) is bm:
                    del eb.bitmaps[bm.name]
                view.close()
            log.info("export %r: view %s released", eb.export.name, view.name)
            return view

    # --- status and verbs ---------------------------------------------------------------------

    def _uris(self, export: str) -> list[str]:
        out = []
        for u in self.server.uris():
            p = urlsplit(u)
            out.append(urlunsplit((p.scheme, p.netloc, "/" + quote(export, safe="@"), p.query,
                                  "")))
        return out

    def describe_view(self, eb: ExportBackup, v: View) -> dict[str, Any]:
        scratch_blocks, zero_blocks = v.state.counts()
        try:
            scratch_bytes = os.fstat(v.scratch_fd).st_blocks * 512
        except OSError:
            scratch_bytes = 0
        return {
            "name": v.name, "export": eb.export.name, "checkpoint": v.checkpoint,
            "bitmap": v.bitmap.name if v.bitmap else None,
            "bitmap_context": v.bitmap.context if v.bitmap else None,
            "bitmap_state": v.bitmap.state if v.bitmap else None,
            "state": "failed" if v.state.failed else "ok", "error": v.state.error,
            "scratch": v.scratch_where, "scratch_bytes": scratch_bytes,
            "saved_bytes": scratch_blocks * BLOCK, "saved_zero_bytes": zero_blocks * BLOCK,
            "block": BLOCK, "size_bytes": v.state.size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created)),
            "uris": self._uris(v.name),
        }

    def _status(self, status: dict[str, Any]) -> None:
        with self.lock:
            by_name = {x["name"]: x for x in status.get("exports", [])}
            for name, eb in self.exports.items():
                entry = by_name.get(name)
                if entry is None:
                    continue
                entry["bitmaps"] = [b.describe(name, eb.store_dir is not None)
                                    for b in eb.bitmaps.values()]
                entry["bitmap_dir"] = eb.store_dir
                views = [self.describe_view(eb, v) for v in eb.views.values()]
                entry["views"] = views
                for vd in views:
                    ventry = by_name.get(vd["name"])
                    if ventry is not None:
                        ventry["view"] = vd

    def do_bitmap(self, req: dict[str, Any]) -> dict[str, Any]:
        action = req.get("action")
        export = req.get("export")
        name = req.get("name")
        try:
            if action == "list":
                return {"bitmaps": self.describe_bitmaps(export)}
            if not isinstance(name, str):
                raise ControlError('"name" (the bitmap) is required')
            if action == "add":
                bm = self.add(export, name, req.get("granularity") or DEFAULT_GRANULARITY)
            elif action == "remove":
                return {"bitmap": self.remove(export, name)}
            elif action == "clear":
                bm = self.clear(export, name)
            else:
                raise ControlError('"action" must be add, remove, clear or list')
            eb = self._eb(export)
            return {"bitmap": bm.describe(eb.export.name, eb.store_dir is not None)}
        except (ValueError, OSError) as exc:  # BitmapError is a ValueError
            raise ControlError(str(exc)) from exc

    def do_checkpoint(self, req: dict[str, Any]) -> dict[str, Any]:
        export = req.get("export")
        name = req.get("name")
        try:
            if req.get("list"):
                with self.lock:
                    ebs = [self._eb(export)] if export is not None else \
                        list(self.exports.values())
                    return {"views": [self.describe_view(eb, v) for eb in ebs
                                      for v in eb.views.values()]}
            if not isinstance(name, str):
                raise ControlError('"name" (the checkpoint) is required')
            if req.get("release"):
                v = self.release(export, name)
                return {"released": v.name}
            scratch = req.get("scratch_dir")
            if scratch is not None and not isinstance(scratch, str):
                raise ControlError('"scratch_dir" must be a path')
            v = self.checkpoint(export, name, req.get("granularity") or DEFAULT_GRANULARITY,
                                scratch)
            eb = self._eb(export)
            return {"view": self.describe_view(eb, v)}
        except (ValueError, OSError) as exc:  # BitmapError is a ValueError
            raise ControlError(str(exc)) from exc

    def register(self, control: ControlServer) -> None:
        control.register("bitmap", self.do_bitmap)
        control.register("checkpoint", self.do_checkpoint)


def attach_backup(server: Server, control: ControlServer | None,
                  configs: dict[str, BitmapConfig] | None = None) -> BackupManager:
    """Load every export's bitmaps, hook the manager into the server (before it
    starts) and register its verbs."""
    mgr = BackupManager(server, configs)
    if control is not None:
        mgr.register(control)
    return mgr
