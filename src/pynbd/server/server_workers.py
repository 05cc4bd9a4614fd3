"""The supervisor's side of its workers: a handle per worker, in-process
(:class:`LocalWorker`, ``workers=1``: the same loop) or a worker process driven over a
channel (:class:`RemoteWorker`, ``server/workerproc.py``); how many the exports allow,
what a process is told to start with, and replacing one that dies (its clients see a
dropped connection; the new one gets every export's pause, step-down and tracker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pynbd.backends.base import ThreadModel
from pynbd.server.channel import Channel, channel_pair
from pynbd.server.server_state import ServerState
from pynbd.server.worker import Worker

if TYPE_CHECKING:
    from pynbd.server.server_admission import ConnRecord

log = logging.getLogger("pynbd.server")


class WorkerHandle:
    """The supervisor's side of one worker. Methods run on the supervisor's loop."""

    index: int
    alive: bool = True

    def __init__(self, server: ServerState, index: int) -> None:
        self.server = server
        self.index = index
        self.conns: set[int] = set()

    def adopt(self, sock: socket.socket, rec: ConnRecord, data: bytes, deadline: float) -> None:
        raise NotImplementedError

    def drop(self, conn_id: int, reason: str) -> None:
        raise NotImplementedError

    def pause(self, name: str, done: Callable[[], None]) -> None:
        raise NotImplementedError

    def resume(self, name: str) -> None:
        raise NotImplementedError

    def step_down(self, name: str, reason: str) -> None:
        raise NotImplementedError

    def set_tracker(self, name: str, tracker: Any,
                    done: Callable[[Any], None] | None = None) -> None:
        """Attach (or with None detach) a write tracker; ``done`` once it is in place."""
        raise NotImplementedError

    def stats(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        raise NotImplementedError

    def configure(self, export: str, name: str, params: dict[str, str],
                  done: Callable[[dict[str, Any] | None], None]) -> None:
        """Run-time filter parameters, in a worker process (in-process: nothing to do,
        the supervisor's stack is the worker's)."""
        done({"configured": 0})

    def backup(self, msg: dict[str, Any], fds: list[int],
               done: Callable[[dict[str, Any] | None], None]) -> None:
        """A backup operation (bitmaps, views: ``pynbd.backup.workerops``); the caller
        keeps ``fds`` (the worker gets its own copies)."""
        raise NotImplementedError

    def stop(self, done: Callable[[], None]) -> None:
        raise NotImplementedError

    def finish(self, timeout: float) -> None:
        """After stop: release what the worker holds (called off the loop)."""


class _NoWorker(WorkerHandle):
    """The handle of a connection the supervisor still holds (before its first bytes)."""

    def __init__(self) -> None:
        self.index = -1
        self.conns = set()
        self.alive = False

    def drop(self, conn_id: int, reason: str) -> None:
        pass


_NO_WORKER = _NoWorker()


class _LocalEvents:
    def __init__(self, server: ServerState, handle: LocalWorker) -> None:
        self.server = server
        self.handle = handle

    def negotiated(self, conn_id: int, export: str) -> None:
        self.server._on_negotiated(conn_id, export)

    def closed(self, conn_id: int) -> None:
        self.server._on_closed(conn_id)

    def reply(self, req_id: int, payload: dict[str, Any]) -> None:  # pragma: no cover
        pass


class LocalWorker(WorkerHandle):
    """A worker in the supervisor's own process, on the same loop."""

    def __init__(self, server: ServerState, index: int) -> None:
        super().__init__(server, index)
        backends = {name: e.backend for name, e in server.registry.exports.items()}
        self.worker = Worker(server.loop, server.registry, backends, server.protocol_config,
                             server.tls_context, server.limits, _LocalEvents(server, self),
                             index)

    def adopt(self, sock: socket.socket, rec: ConnRecord, data: bytes, deadline: float) -> None:
        self.worker.adopt(sock, rec.id, rec.peer, rec.host, data, deadline)

    def drop(self, conn_id: int, reason: str) -> None:
        self.worker.drop(conn_id, reason)

    def pause(self, name: str, done: Callable[[], None]) -> None:
        self.worker.pause(name, done)

    def resume(self, name: str) -> None:
        self.worker.resume(name)

    def step_down(self, name: str, reason: str) -> None:
        self.worker.step_down(name, reason)

    def set_tracker(self, name: str, tracker: Any,
                    done: Callable[[Any], None] | None = None) -> None:
        self.worker.set_tracker(name, tracker,
                                done=None if done is None else (lambda: done(None)))

    def backup(self, msg: dict[str, Any], fds: list[int],
               done: Callable[[dict[str, Any] | None], None]) -> None:
        from pynbd.backup.workerops import apply

        done(apply(self.worker, msg, [os.dup(fd) for fd in fds]))

    def stats(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        done(self.worker.stats())

    def stop(self, done: Callable[[], None]) -> None:
        self.worker.stop(done)

    def finish(self, timeout: float) -> None:
        self.worker.close()


class RemoteWorker(WorkerHandle):
    """A worker process, driven over a channel."""

    def __init__(self, server: ServerState, index: int) -> None:
        super().__init__(server, index)
        mine, theirs = channel_pair()
        spec = server.worker_spec(index)
        fds = [theirs.fileno(), *spec.pop("_fds")]
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pynbd.server.workerproc", str(theirs.fileno())],
            pass_fds=fds, stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self._req = 0
        self._pending: dict[int, Callable[[dict[str, Any] | None], None]] = {}
        self.channel = Channel(server.loop, mine, self._on_message, self._on_close)
        self.channel.send({"op": "config", **spec})
        self.started = time.monotonic()

    def _request(self, msg: dict[str, Any], done: Callable[[dict[str, Any] | None], None],
                 fds: list[int] | None = None) -> None:
        if not self.alive:
            done(None)
            return
        self._req += 1
        self._pending[self._req] = done
        self.channel.send({**msg, "req": self._req}, fds)

    def adopt(self, sock: socket.socket, rec: ConnRecord, data: bytes, deadline: float) -> None:
        self.channel.send({"op": "conn", "id": rec.id, "peer": rec.peer, "host": rec.host,
                           "data": data.hex(), "deadline": deadline},
                          [sock.fileno()], keep=[sock])

    def drop(self, conn_id: int, reason: str) -> None:
        self.channel.send({"op": "drop", "id": conn_id, "reason": reason})

    def pause(self, name: str, done: Callable[[], None]) -> None:
        self._request({"op": "pause", "name": name}, lambda _r: done())

    def resume(self, name: str) -> None:
        self.channel.send({"op": "resume", "name": name})

    def step_down(self, name: str, reason: str) -> None:
        self.channel.send({"op": "step_down", "name": name, "reason": reason})

    def set_tracker(self, name: str, tracker: Any,
                    done: Callable[[Any], None] | None = None) -> None:
        cb = done if done is not None else (lambda _r: None)
        if tracker is None:
            self._request({"op": "track", "name": name}, cb)
            return
        share = getattr(tracker, "share", None)
        if share is None:
            raise RuntimeError(f"tracker {type(tracker).__name__} cannot be shared with "
                               "worker processes")
        meta, fds = share()
        self._request({"op": "track", "name": name, "tracker": meta}, cb, fds)

    def stats(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request({"op": "stats"}, done)

    def backup(self, msg: dict[str, Any], fds: list[int],
               done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request({**msg, "op": "backup"}, done, fds)

    def configure(self, export: str, name: str, params: dict[str, str],
                  done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request({"op": "configure", "export": export, "filter": name,
                       "params": params}, done)

    def stop(self, done: Callable[[], None]) -> None:
        self._request({"op": "stop"}, lambda _r: done())

    def finish(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not exit in time: killing it", self.index)
            self.proc.kill()
            self.proc.wait(5)

    def _on_message(self, msg: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        op = msg.get("op")
        srv = self.server
        if op == "negotiated":
            srv._on_negotiated(int(msg["id"]), str(msg["export"]))
        elif op == "closed":
            srv._on_closed(int(msg["id"]))
        elif op == "reply":
            cb = self._pending.pop(int(msg["req"]), None)
            if cb is not None:
                cb(msg.get("payload") or {})
        elif op == "ready":
            log.debug("worker %d (pid %d) ready", self.index, self.proc.pid)
        elif op == "error":
            log.error("worker %d: %s", self.index, msg.get("message"))

    def _on_close(self) -> None:
        self.alive = False
        pending, self._pending = self._pending, {}
        for cb in pending.values():
            cb(None)
        self.server._worker_died(self)


class WorkersMixin(ServerState):
    """Starting and replacing the workers of :class:`~pynbd.server.server.Server`."""

    def effective_workers(self) -> int:
        """How many worker processes the exports allow (1 = in-process)."""
        n = max(1, self.options.workers)
        if n == 1:
            return 1
        why = self._single_process_reason()
        if why:
            log.info("serving with one worker: %s", why)
            return 1
        return n

    def _single_process_reason(self) -> str:
        if self.tls_context is not None and self.options.tls_files is None:
            return "the TLS context was given without its certificate files"
        for name, e in self.registry.exports.items():
            if getattr(e.backend, "runtime_only", False):
                continue
            model = e.backend.thread_model
            if model in (ThreadModel.SERIALIZE_ALL_REQUESTS, ThreadModel.SERIALIZE_CONNECTIONS):
                return f"export {name!r} serializes {model.value.split('_', 1)[1]}"
            spec = e.backend.worker_spec()
            if spec is None:
                return (f"export {name!r} ({e.backend.name}) keeps its state in one "
                        "process")
        return ""

    def worker_spec(self, index: int) -> dict[str, Any]:
        exports = []
        fds: list[int] = []
        for name, e in self.registry.exports.items():
            if getattr(e.backend, "runtime_only", False):
                continue  # added at run time: a worker hook sends it (see worker_hooks)
            spec = e.backend.worker_spec()
            assert spec is not None
            fds.extend(int(fd) for fd in spec.get("fds", []))  # type: ignore[attr-defined]
            exports.append({"name": name, "info": asdict(e.info), "backend": spec})
        return {
            "index": index,
            "exports": exports,
            "default": self.registry.default,
            "protocol": {"tls": self.options.tls.value, "x_close": self.options.x_close,
                         "extended_headers": self.options.extended_headers,
                         "max_request_size": self.options.max_request_size},
            "tls_files": self.options.tls_files,
            "limits": asdict(self.limits),
            "log_level": self.options.log_level,
            "log_format": self.options.log_format,
            "log_quiet_server": self.options.log_quiet_server,
            "_fds": fds,
        }

    def _spawn(self, index: int) -> WorkerHandle:
        if self._nworkers == 1:
            return LocalWorker(self, index)
        return RemoteWorker(self, index)

    def _worker_died(self, handle: WorkerHandle) -> None:
        gone = [cid for cid in list(handle.conns)]
        for cid in gone:
            self._on_closed(cid)
        if self._stopping.is_set() or handle not in self.workers:
            return
        rc = handle.proc.poll() if isinstance(handle, RemoteWorker) else None
        log.warning("worker %d exited (status %s) with %d connection(s): starting a new one",
                    handle.index, rc, len(gone))
        self.worker_restarts += 1
        idx = self.workers.index(handle)
        delay = 0.1 if time.monotonic() - getattr(handle, "started", 0.0) > 5 else 1.0

        def respawn() -> None:
            if self._stopping.is_set():
                return
            try:
                new = self._spawn(handle.index)
            except OSError as exc:
                log.error("cannot start a worker: %s", exc)
                self.loop.call_later(5.0, respawn)
                return
            self.workers[idx] = new
            self._apply_gate_state(new)
            if isinstance(handle, RemoteWorker):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    handle.proc.wait(1)

        self.loop.call_later(delay, respawn)

    def _apply_gate_state(self, handle: WorkerHandle) -> None:
        """A new worker starts with every export's current pause/step-down/tracker."""
        for name, e in self.registry.exports.items():
            g = e.gate
            if g is not None and g.stepped_down:
                handle.step_down(name, g.step_down_reason)
            elif g is not None and g.paused:
                handle.pause(name, lambda: None)
            if e.tracker is not None:
                handle.set_tracker(name, e.tracker)
        for hook in self.worker_hooks:
            hook(handle)
