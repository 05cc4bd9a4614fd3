"""A pool of blocking connections to one export, for use from several threads.

More than one connection is opened only when the server advertises CAN_MULTI_CONN
(then a FLUSH on any connection covers writes completed on all of them, so the pool
flushes once); otherwise the pool degrades to a single shared connection and callers
queue for it. Large reads and writes are split across the connections in parallel::

    with Pool("nbd://127.0.0.1/disk", connections=4) as pool:
        data = pool.read(0, 64 << 20)          # 4 connections, in parallel
        pool.write(0, data); pool.flush()
        with pool.lease() as c:                # a connection for yourself
            c.submit_read(...); c.wait_all()
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from pynbd.client._common import CloseResult, Extent
from pynbd.client.blocking import Client, connect
from pynbd.client.tls import TLSConfig
from pynbd.client.uri import NBDURI
from pynbd.protocol.errors import LocalProtocolError

T = TypeVar("T")

#: how long lease() waits for a free connection before giving up
LEASE_TIMEOUT = 600.0


class Pool:
    def __init__(self, uri: str | NBDURI, connections: int = 4, *,
                 timeout: float | None = None, tls: TLSConfig | None = None,
                 force_multi_conn: bool = False, **connect_kw: Any) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.uri = uri
        first = connect(uri, timeout=timeout, tls=tls, **connect_kw)
        self.clients: list[Client] = [first]
        try:
            n = connections if (first.can_multi_conn() or force_multi_conn) else 1
            for _ in range(n - 1):
                self.clients.append(connect(uri, timeout=timeout, tls=tls, **connect_kw))
        except BaseException:
            for c in self.clients:
                c.hard_close()
            raise
        self._free: queue.LifoQueue[Client] = queue.LifoQueue()
        for c in self.clients:
            self._free.put(c)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.close_results: list[CloseResult] = []

    # --- capabilities (from the first connection; all negotiated the same way) ------
    @property
    def size(self) -> int:
        return self.clients[0].size

    @property
    def extended(self) -> bool:
        """Extended headers were negotiated (64-bit trim/zero/cache/block status)."""
        return self.clients[0].extended

    @property
    def connections(self) -> int:
        return len(self.clients)

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("can_", "is_")):
            return getattr(self.clients[0], name)
        raise AttributeError(name)

    # --- leasing ------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, timeout: float = LEASE_TIMEOUT) -> Iterator[Client]:
        """Borrow a connection for exclusive use by this thread."""
        try:
            c = self._free.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no free connection in the pool") from None
        try:
            yield c
        finally:
            self._free.put(c)

    def _run(self, fn: Callable[[Client], T]) -> T:
        with self.lease() as c:
            return fn(c)

    def _parallel(self, tasks: list[Callable[[Client], Any]]) -> list[Any]:
        if len(tasks) <= 1 or len(self.clients) == 1:
            return [self._run(t) for t in tasks]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(len(self.clients),
                                                    thread_name_prefix="pynbd-pool")
        futs = [self._executor.submit(self._run, t) for t in tasks]
        return [f.result() for f in futs]

    def _split(self, length: int) -> list[tuple[int, int]]:
        n = len(self.clients)
        step = max(1 << 20, -(-length // n))
        return [(pos, min(step, length - pos)) for pos in range(0, length, step)]

    # --- I/O ------------------------------------------------------------------------
    def read(self, offset: int, length: int, flags: int = 0) -> bytearray:
        buf = bytearray(length)
        self.read_into(offset, buf, flags)
        return buf

    def read_into(self, offset: int, buf: bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(buf).cast("B")
        def task(p: int, n: int) -> Callable[[Client], None]:
            return lambda c: c.read_into(offset + p, view[p:p + n], flags)
        self._parallel([task(p, n) for p, n in self._split(len(view))])

    def write(self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        def task(p: int, n: int) -> Callable[[Client], None]:
            return lambda c: c.write(offset + p, view[p:p + n], flags)
        self._parallel([task(p, n) for p, n in self._split(len(view))])

    def flush(self, flags: int = 0) -> None:
        """One FLUSH: with CAN_MULTI_CONN it covers writes completed on every connection."""
        if len(self.clients) > 1 and not self.clients[0].can_multi_conn():
            raise LocalProtocolError("multi-connection flush without CAN_MULTI_CONN")
        self._run(lambda c: c.flush(flags))

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        self._run(lambda c: c.trim(offset, length, flags))

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self._run(lambda c: c.write_zeroes(offset, length, flags))

    def cache(self, offset: int, length: int, flags: int = 0) -> None:
        self._run(lambda c: c.cache(offset, length, flags))

    def block_status(self, offset: int, length: int, flags: int = 0,
                     contexts: Sequence[str] | None = None) -> dict[str, list[Extent]]:
        return self._run(lambda c: c.block_status(offset, length, flags, contexts))

    def map(self, fn: Callable[[Client, T], Any], items: list[T]) -> list[Any]:
        """Call ``fn(client, item)`` for every item, spread over the connections."""
        def task(it: T) -> Callable[[Client], Any]:
            return lambda c: fn(c, it)
        return self._parallel([task(it) for it in items])

    # --- teardown -------------------------------------------------------------------
    def close(self) -> list[CloseResult]:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if not self.close_results:
            self.close_results = [c.close() for c in self.clients]
        return self.close_results

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
