"""What the supervisor tells about itself: ``status`` (exports with their counters
summed over every worker, clients, limits, the access list) and the control socket's
verbs (``status``, ``acl``, ``filter``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from pynbd.backends.base import ConfigError
from pynbd.server.control import ControlError, ControlServer
from pynbd.server.server_state import ServerState
from pynbd.server.server_workers import RemoteWorker

STATS_TIMEOUT = 5.0


def _merge_stats(a: Any, b: Any) -> Any:
    """Filter statistics of several workers: numbers add up, tables merge."""
    if a is None:
        return b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge_stats(a.get(k), v)
        return out
    if isinstance(a, int | float) and isinstance(b, int | float) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a + b
    return b


def _stack_names(top: Any) -> list[str]:
    from pynbd.filters.base import Filter

    if not isinstance(top, Filter):
        return [top.name]
    out = []
    for layer in top.layers:
        spec = getattr(layer, "spec", None)
        out.append(spec.describe() if spec is not None else layer.name)
    return out


class StatusMixin(ServerState):
    """Status and control verbs of :class:`~pynbd.server.server.Server`."""

    def status(self) -> dict[str, Any]:
        def collect(done: Callable[[Any], None]) -> None:
            recs = [(r.id, r.peer, r.export, r.negotiated, r.started, r.handle.index)
                    for r in self._records.values() if not r.evicted]
            self._gather(lambda h, cb: h.stats(cb), lambda res: done((recs, res)))

        if self._started:
            recs, stats = self.call(collect, STATS_TIMEOUT)
        else:
            recs, stats = [], []
        per_export: dict[str, dict[str, Any]] = {}
        conn_info: dict[str, dict[str, Any]] = {}
        killed = 0
        for st in stats:
            if not st:
                continue
            killed += int(st.get("killed", 0))
            conn_info.update(st.get("connections", {}))
            for name, c in st.get("exports", {}).items():
                acc = per_export.setdefault(name, {"bytes_read": 0, "bytes_written": 0,
                                                   "requests": 0, "errors": 0, "clients": 0})
                for k in ("bytes_read", "bytes_written", "requests", "errors", "clients"):
                    acc[k] += int(c.get(k, 0))
                if c.get("filters"):
                    acc["filters"] = _merge_stats(acc.get("filters"), c["filters"])
        exports = []
        for name, e in self.registry.exports.items():
            c = per_export.get(name, {})
            exports.append({
                "name": name,
                "default": name == self.registry.default,
                "target": e.backend.name,
                "size_bytes": e.info.size,
                "read_only": e.read_only,
                "multi_conn": e.info.can_multi_conn,
                "clients": c.get("clients", 0),
                "bytes_read": c.get("bytes_read", 0),
                "bytes_written": c.get("bytes_written", 0),
                "requests": c.get("requests", 0),
                "errors": c.get("errors", 0),
                "filters": c.get("filters", {}),
                "stack": [layer for layer in _stack_names(e.backend)],
            })
        now = time.monotonic()
        clients = []
        negotiating = 0
        for cid, peer, export, negotiated, started, widx in recs:
            if not negotiated:
                negotiating += 1
            info = conn_info.get(str(cid), {})
            clients.append({"peer": peer, "export": export, "tls": bool(info.get("tls")),
                            "state": "negotiated" if negotiated else "negotiating",
                            "worker": widx, "connected_seconds": round(now - started, 3)})
        out = {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "uris": self.uris(),
            "tls": self.options.tls.value,
            "workers": len(self.workers),
            "worker_pids": [h.proc.pid if isinstance(h, RemoteWorker) else os.getpid()
                            for h in self.workers],
            "worker_restarts": self.worker_restarts,
            "exports": exports,
            "clients": len(clients),
            "client_list": clients,
            "negotiating": negotiating,
            "connections_total": self.total_connections,
            "connections_rejected": self.rejected_connections,
            "connections_evicted": self.evicted_connections,
            "connections_killed": killed,
            "acl": {"entries": self.acl.entries if self.acl else [],
                    "default_deny": self.acl.default_deny if self.acl else False},
            "limits": {
                "max_connections": self.limits.max_connections,
                "max_connections_per_address": self.limits.max_connections_per_address,
                "max_handshakes": self.limits.max_handshakes,
                "max_handshakes_per_address": self.limits.max_handshakes_per_address,
                "handshake_timeout_seconds": self.limits.handshake_timeout,
                "max_inflight": self.limits.max_inflight,
                "request_timeout_seconds": self.limits.request_timeout,
            },
        }
        for hook in self.status_hooks:
            hook(out)
        return out

    def attach_control(self, control: ControlServer) -> None:
        """Register the server's verbs (status, acl) on a control socket."""

        def do_status(req: dict[str, Any]) -> dict[str, Any]:
            return {"status": self.status()}

        def do_acl(req: dict[str, Any]) -> dict[str, Any]:
            entries = req.get("entries")
            if entries is None:
                return {"entries": self.acl.entries if self.acl else []}
            if not isinstance(entries, list) or not all(isinstance(x, str) for x in entries):
                raise ControlError('"entries" must be a list of CIDR strings')
            try:
                dropped = self.set_acl(entries, req.get("default_deny"))
            except ValueError as exc:
                raise ControlError(str(exc)) from exc
            assert self.acl is not None
            return {"entries": self.acl.entries, "disconnected": dropped}

        def do_filter(req: dict[str, Any]) -> dict[str, Any]:
            name = req.get("filter")
            params = req.get("params")
            export = req.get("export") or ""
            if not isinstance(name, str) or not isinstance(params, dict) \
                    or not isinstance(export, str):
                raise ControlError('"filter" (a name) and "params" (an object) are required')
            try:
                n = self.configure_filter(export, name, {str(k): str(v)
                                                         for k, v in params.items()})
            except ConfigError as exc:
                raise ControlError(str(exc)) from exc
            return {"filter": name, "layers": n, "params": params}

        control.register("status", do_status)
        control.register("acl", do_acl)
        control.register("filter", do_filter)
        self.control = control
