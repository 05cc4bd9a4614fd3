"""A worker process: ``python -m pynbd.server.workerproc FD``.

Started by the supervisor (``server/server.py``) with one end of a channel as FD. The
first message is the configuration: the exports (their advertised info and how to
reopen each backend in this process), protocol and TLS settings, limits. The worker
then serves the client sockets the supervisor sends it until told to stop, or until
the supervisor goes away (the channel closes): then it finishes what its connections
received, flushes and exits.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import Any

from pynbd.backends import open_worker_backend
from pynbd.backends.base import Backend
from pynbd.protocol.server import ExportInfo, ServerConfig, TLSMode
from pynbd.server.channel import Channel, recv_message
from pynbd.server.limits import Limits
from pynbd.server.loop import Loop
from pynbd.server.worker import Worker

log = logging.getLogger("pynbd.server")


class StaticProvider:
    """The supervisor's export table, as a pure lookup."""

    def __init__(self, infos: list[ExportInfo], default: str | None) -> None:
        self.infos = {i.name: i for i in infos}
        self.order = infos
        self.default = default

    def lookup(self, name: str) -> ExportInfo | None:
        info = self.infos.get(name)
        if info is None and name == "" and self.default is not None:
            info = self.infos.get(self.default)
        return info

    def list_exports(self) -> list[ExportInfo]:
        return list(self.order)

    def add_export(self, info: ExportInfo) -> None:
        """A new export, or new info for one (e.g. its metadata contexts changed)."""
        if info.name in self.infos:
            self.order = [info if i.name == info.name else i for i in self.order]
        else:
            self.order.append(info)
        self.infos[info.name] = info

    def remove_export(self, name: str) -> None:
        if self.infos.pop(name, None) is not None:
            self.order = [i for i in self.order if i.name != name]


def _info(d: dict[str, Any]) -> ExportInfo:
    d = dict(d)
    d["block_size"] = tuple(d["block_size"])
    d["meta_contexts"] = tuple(d["meta_contexts"])
    d["refused_contexts"] = tuple(tuple(x) for x in d.get("refused_contexts", ()))
    return ExportInfo(**d)


class ChannelEvents:
    def __init__(self) -> None:
        self.channel: Channel | None = None

    def _send(self, msg: dict[str, Any]) -> None:
        if self.channel is not None:
            self.channel.send(msg)

    def negotiated(self, conn_id: int, export: str) -> None:
        self._send({"op": "negotiated", "id": conn_id, "export": export})

    def closed(self, conn_id: int) -> None:
        self._send({"op": "closed", "id": conn_id})

    def reply(self, req_id: int, payload: dict[str, Any]) -> None:
        self._send({"op": "reply", "req": req_id, "payload": payload})


def main(argv: list[str]) -> int:  # noqa: C901 - a worker process: one dispatch table of supervisor messages
    # the supervisor decides when workers stop (a terminal's ^C reaches the whole group)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    got = recv_message(sock)
    if got is None:
        return 1
    cfg, _fds = got
    from pynbd.util.logs import configure

    configure(int(cfg.get("log_level", logging.INFO)), str(cfg.get("log_format", "text")),
              quiet_server=bool(cfg.get("log_quiet_server", True)))
    index = int(cfg["index"])
    infos = [_info(e["info"]) for e in cfg["exports"]]
    provider = StaticProvider(infos, cfg.get("default"))
    backends: dict[str, Backend] = {}
    events = ChannelEvents()
    for e in cfg["exports"]:
        backends[e["name"]] = open_worker_backend(e["backend"])
    proto = cfg["protocol"]
    pconf = ServerConfig(tls=TLSMode(proto["tls"]), x_close=bool(proto["x_close"]),
                         extended_headers=bool(proto.get("extended_headers", True)),
                         max_request_size=int(proto["max_request_size"]))
    tls_ctx = None
    if cfg.get("tls_files"):
        from pynbd.server.tls import server_tls_context

        tls_ctx = server_tls_context(**cfg["tls_files"])
    limits = Limits(**cfg["limits"])
    loop = Loop()
    worker = Worker(loop, provider, backends, pconf, tls_ctx, limits, events, index)
    stopping = [False]

    def finish() -> None:
        for b in backends.values():
            try:
                b.flush()
            except OSError:
                pass
            try:
                b.close()
            except OSError:
                pass
        loop.stop()

    def track(msg: dict[str, Any], fds: list[int], req: int) -> list[int]:
        """Install (or remove) a write tracker; the descriptors it did not take."""
        meta = msg.get("tracker")

        def tracked() -> None:
            if req:
                events.reply(req, {"tracking": meta is not None})

        if meta is None:
            worker.set_tracker(str(msg["name"]), None, done=tracked)
            return fds
        from pynbd.server.sharedmap import attach_tracker

        worker.set_tracker(str(msg["name"]), attach_tracker(meta, fds), done=tracked)
        return []

    def configure_filter(msg: dict[str, Any], req: int) -> None:
        try:
            n = worker.configure_filter(str(msg["export"]), str(msg["filter"]),
                                        dict(msg["params"]))
            events.reply(req, {"configured": n})
        except Exception as exc:  # a filter's own message for the CLI
            events.reply(req, {"error": str(exc)})

    def on_message(msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        req = int(msg.get("req") or 0)
        if op == "conn":
            s = socket.socket(fileno=fds[0])
            worker.adopt(s, int(msg["id"]), str(msg["peer"]), str(msg["host"]),
                         bytes.fromhex(str(msg.get("data") or "")),
                         float(msg.get("deadline") or limits.handshake_timeout))
        elif op == "drop":
            worker.drop(int(msg["id"]), str(msg.get("reason") or ""))
        elif op == "pause":
            worker.pause(str(msg["name"]), lambda: events.reply(req, {"paused": True}))
        elif op == "resume":
            worker.resume(str(msg["name"]))
        elif op == "step_down":
            worker.step_down(str(msg["name"]), str(msg.get("reason") or ""))
        elif op == "track":
            fds = track(msg, fds, req)
        elif op == "backup":
            from pynbd.backup.workerops import apply

            events.reply(req, apply(worker, msg, fds))  # takes the descriptors
            fds = []
        elif op == "stats":
            events.reply(req, worker.stats())
        elif op == "configure":
            configure_filter(msg, req)
        elif op == "stop":
            stopping[0] = True

            def stopped() -> None:
                events.reply(req, {"stopped": True})
                loop.call_soon(finish)

            worker.stop(stopped)
        for fd in fds if op not in ("conn",) else fds[1:]:
            try:
                socket.close(fd)
            except OSError:
                pass

    def on_close() -> None:
        # the supervisor is gone: finish what we have and exit
        if not stopping[0]:
            log.warning("worker %d: supervisor went away; finishing and exiting", index)
            stopping[0] = True
            worker.stop(finish)

    events.channel = Channel(loop, sock, on_message, on_close)
    events._send({"op": "ready"})
    loop.run()
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
