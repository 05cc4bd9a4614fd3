"""A TCP relay that cuts connections at random points (fault injection)."""

from __future__ import annotations

import contextlib
import random
import socket
import threading


def stop_listener(stop: threading.Event, sock: socket.socket, lock: threading.Lock,
                  conns: list[socket.socket] | set[socket.socket]) -> None:
    """Stop a test's threaded listener: no more accepts, every connection shut down."""
    stop.set()
    with contextlib.suppress(OSError):
        sock.close()
    with lock:
        live = list(conns)
    for s in live:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


class CuttingRelay:
    def __init__(self, target: tuple[str, int], seed: int, max_cuts: int,
                 min_budget: int = 256 * 1024, max_budget: int = 8 * 1024 * 1024,
                 record: bool = False) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.max_cuts = max_cuts
        self.min_budget = min_budget
        self.max_budget = max_budget
        self.cuts = 0
        self.upstream_bytes = 0
        #: with ``record``: every byte each client sent, per connection (what an
        #: eavesdropper captures)
        self.record = record
        self.recorded: list[bytearray] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"msgr2://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.connections += 1
                budget = None
                if self.cuts < self.max_cuts:
                    budget = self.rng.randrange(self.min_budget, self.max_budget)
                self.conns += [c, u]
            rec = bytearray()
            if self.record:
                with self.lock:
                    self.recorded.append(rec)
            pair = {"budget": budget, "dead": False, "rec": rec}
            threading.Thread(target=self._pump, args=(c, u, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, pair, False), daemon=True).start()

    def _cut(self, a: socket.socket, b: socket.socket, pair: dict[str, object]) -> None:
        with self.lock:
            if pair["dead"]:
                return
            pair["dead"] = True
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: dict[str, object],
              upstream: bool) -> None:
        src.settimeout(None)
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._cut(src, dst, pair)
                return
            if upstream:
                with self.lock:
                    budget = pair["budget"]
                    if isinstance(budget, int):
                        if budget <= len(data):
                            data = data[:budget]
                            pair["budget"] = 0
                        else:
                            pair["budget"] = budget - len(data)
                    self.upstream_bytes += len(data)
                    if self.record:
                        rec = pair["rec"]
                        assert isinstance(rec, bytearray)
                        rec += data
            try:
                if data:
                    dst.sendall(data)
            except OSError:
                self._cut(src, dst, pair)
                return
            if upstream and pair["budget"] == 0:
                with self.lock:
                    self.cuts += 1
                self._cut(src, dst, pair)
                return

    def close(self) -> None:
        stop_listener(self.stop, self.sock, self.lock, self.conns)
