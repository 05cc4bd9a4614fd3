"""The backup operations a worker applies (sent by the supervisor's
:class:`~pynbd.backup.manager.BackupManager` over the worker channel, op ``backup``, or
called directly for the in-process worker).

Every operation names an export and changes what this worker does for it:

- ``bitmap-attach``: map a bitmap (descriptor attached); mark it on every change
  (``track``) and/or serve it as a metadata context (``context``);
- ``bitmap-detach``: stop both;
- ``info``: the export's advertised info changed (its metadata contexts);
- ``view-add``: a point-in-time view of ``export`` (map and scratch descriptors
  attached): copy-before-write on the live export, and the view served as a new export;
- ``view-remove``: the view is released.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any

from pynbd.protocol.server import ExportInfo
from pynbd.server.bitmaps import BitmapMap
from pynbd.server.worker import ExportRuntime, Worker

log = logging.getLogger("pynbd.backup")

#: per live export runtime of this process: its open views' states, by view name
_VIEWS: weakref.WeakKeyDictionary[ExportRuntime, dict[str, Any]] = weakref.WeakKeyDictionary()


def info_from_dict(d: dict[str, Any]) -> ExportInfo:
    d = dict(d)
    d["block_size"] = tuple(d["block_size"])
    d["meta_contexts"] = tuple(d["meta_contexts"])
    d["refused_contexts"] = tuple(tuple(x) for x in d.get("refused_contexts", ()))
    return ExportInfo(**d)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def apply(worker: Worker, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Apply one operation; takes ownership of ``fds``. Returns the reply."""
    try:
        return _apply(worker, msg, fds)
    except Exception as exc:
        _close_all(fds)
        log.exception("worker %d: backup operation %r failed", worker.index, msg.get("action"))
        return {"error": f"{type(exc).__name__}: {exc}"}


def _apply(worker: Worker, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    action = msg.get("action")
    export = str(msg.get("export", ""))
    rt = worker.runtimes.get(export)
    if rt is None:
        _close_all(fds)
        return {"error": f"no export {export!r} in worker {worker.index}"}
    if action == "bitmap-attach":
        bm = BitmapMap.attach(dict(msg["meta"]), fds.pop(0))
        _close_all(fds)
        name = str(msg["name"])
        if msg.get("track"):
            rt.trackers["bitmap:" + name] = bm
        ctx = msg.get("context")
        if ctx:
            rt.contexts[str(ctx)] = bm.extents
        rt.rebind()
        return {"ok": True}
    if action == "bitmap-detach":
        _close_all(fds)
        rt.trackers.pop("bitmap:" + str(msg["name"]), None)
        ctx = msg.get("context")
        if ctx:
            rt.contexts.pop(str(ctx), None)
        rt.rebind()
        return {"ok": True}
    if action == "info":
        _close_all(fds)
        worker.set_info(export, info_from_dict(msg["info"]))
        return {"ok": True}
    if action == "view-add":
        from pynbd.backup.view import ViewBackend
        from pynbd.filters.cbw import ViewState

        map_fd, scratch_fd = fds[0], fds[1]
        _close_all(fds[2:])
        view = str(msg["view"])
        state = ViewState.attach(dict(msg["meta"]), map_fd, scratch_fd)
        views = _VIEWS.setdefault(rt, {})
        views[view] = state
        _install_cbw(rt, views)
        info = info_from_dict(msg["info"])
        worker.add_export(view, ViewBackend(rt.base, state, view), info)
        return {"ok": True}
    if action == "view-remove":
        _close_all(fds)
        view = str(msg["view"])
        worker.remove_export(view, f"view {view} has been released: disconnecting")
        views = _VIEWS.get(rt, {})
        state = views.pop(view, None)
        if state is not None:
            state.close()
        _install_cbw(rt, views)
        return {"ok": True}
    _close_all(fds)
    return {"error": f"unknown backup operation {action!r}"}


def _install_cbw(rt: ExportRuntime, views: dict[str, Any]) -> None:
    from pynbd.filters.cbw import CbwFilter

    states = tuple(views.values())
    if states:
        rt.layers["cbw"] = lambda b: CbwFilter(b, states)
    else:
        rt.layers.pop("cbw", None)
    rt.rebind()
