"""The control socket: a Unix socket (mode 0600) speaking JSON lines.

Request: one JSON object per line, ``{"cmd": "status"}`` or ``{"cmd": "acl", "entries":
[...]}``. Reply: one JSON object per line, ``{"ok": true, ...}`` or ``{"ok": false,
"error": "..."}``. Every client gets its own thread and a read timeout, so a silent
client never blocks another. Features register their own verbs with :meth:`register`
(migration adds ``mirror``, ``mirror-speed``, ``break``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pynbd.control")

Handler = Callable[[dict[str, Any]], dict[str, Any]]

MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """A verb failed; the message goes back to the control client."""


class ControlServer:
    def __init__(self, path: str, timeout: float = 10.0, max_clients: int = 16) -> None:
        self.path = path
        self.timeout = timeout
        self.max_clients = max_clients
        self._handlers: dict[str, Handler] = {}
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._clients = threading.BoundedSemaphore(max_clients)
        self._thread: threading.Thread | None = None

    def register(self, verb: str, handler: Handler) -> None:
        self._handlers[verb] = handler

    @property
    def verbs(self) -> list[str]:
        return sorted(self._handlers)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(64)
        s.settimeout(0.5)
        self._sock = s
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="control")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not self._clients.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(b'{"ok": false, "error": "too many control clients"}\n')
                conn.close()
                continue
            threading.Thread(target=self._serve_client, args=(conn,), daemon=True,
                             name="control-client").start()

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.timeout)
            buf = b""
            while not self._stop.is_set():
                while b"\n" not in buf:
                    if len(buf) > MAX_REQUEST:
                        self._send(conn, {"ok": False, "error": "request too long"})
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                self._send(conn, self.handle_line(line))
        except (TimeoutError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._clients.release()

    @staticmethod
    def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
        conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"invalid JSON: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'expected an object with a "cmd" string'}
        verb = request["cmd"]
        handler = self._handlers.get(verb)
        if handler is None:
            known = ", ".join(self.verbs)
            return {"ok": False, "error": f"unknown command {verb!r}; known: {known}"}
        try:
            result = handler(request)
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %s failed", verb)
            return {"ok": False, "error": f"{verb} failed: {exc}"}
        return {"ok": True, **result}


def control_request(path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to a control socket and return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"control socket {path} closed without a reply")
            buf += chunk
            if len(buf) > 16 * 1024 * 1024:
                raise ConnectionError(f"control socket {path}: reply too long")
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(reply, dict):
        raise ConnectionError(f"control socket {path}: reply is not an object")
    return reply
