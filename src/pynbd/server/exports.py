"""Exports: a backend, what the protocol advertises for it, and its counters."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from pynbd.backends.base import Backend, BackendError
from pynbd.protocol.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH
from pynbd.protocol.server import ExportInfo


@dataclass(slots=True)
class Counters:
    """Per-export request counters (merged from connections as they report)."""

    bytes_read: int = 0
    bytes_written: int = 0
    requests: int = 0
    errors: int = 0

    def add(self, other: Counters) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.requests += other.requests
        self.errors += other.errors


class IOGate:
    """Lets migration pause an export's I/O (finishing what is in flight) and step down.

    Connections call :meth:`enter` before each request and :meth:`leave` after it.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._paused = False
        self._active = 0
        self.stepped_down = False
        self.step_down_reason = ""

    def enter(self) -> bool:
        """Wait while paused; False once the export has stepped down."""
        with self._cv:
            while self._paused:
                self._cv.wait()
            if self.stepped_down:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._cv:
            self._active -= 1
            if self._active == 0:
                self._cv.notify_all()

    def pause(self, timeout: float | None = None) -> bool:
        """Stop new requests; wait until in-flight ones finish. False on timeout (the
        gate stays paused; call resume())."""
        with self._cv:
            self._paused = True
            return self._cv.wait_for(lambda: self._active == 0, timeout)

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def step_down(self, reason: str) -> None:
        """Refuse every further request (ESHUTDOWN): another copy is authoritative now."""
        with self._cv:
            self.stepped_down = True
            self.step_down_reason = reason
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def active(self) -> int:
        return self._active


class WriteTracker:
    """Receives the ranges clients changed, after the change is on the backend."""

    def mark(self, offset: int, length: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Export:
    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False
    info: ExportInfo = field(init=False)
    totals: Counters = field(default_factory=Counters)
    _live: list[Counters] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: set by migration: pauses and steps down client I/O
    gate: IOGate | None = None
    #: set by migration: told about every range a client changes (a DirtyMap)
    tracker: WriteTracker | None = None
    #: also serve qemu:allocation-depth (every byte local: no backing chains here)
    allocation_depth: bool = False

    def __post_init__(self) -> None:
        b = self.backend
        ro = self.read_only or b.read_only
        self.read_only = ro
        minimum, preferred, maximum = b.block_size
        self.info = ExportInfo(
            name=self.name,
            size=b.size,
            description=self.description,
            read_only=ro,
            can_flush=b.can_flush,
            can_fua=b.can_fua and not ro,
            can_trim=b.can_trim and not ro,
            can_zero=b.can_zero and not ro,
            can_fast_zero=b.can_fast_zero and not ro,
            can_cache=b.can_cache,
            can_multi_conn=b.can_multi_conn,
            rotational=b.rotational,
            # the server's max_request_size caps the maximum (protocol core)
            block_size=(minimum, preferred, maximum),
            meta_contexts=(BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH) if self.allocation_depth
            else (BASE_ALLOCATION,),
        )

    def attach(self) -> Counters:
        c = Counters()
        with self._lock:
            self._live.append(c)
        return c

    def detach(self, c: Counters) -> None:
        with self._lock:
            try:
                self._live.remove(c)
            except ValueError:
                return
            self.totals.add(c)

    def counters(self) -> Counters:
        with self._lock:
            total = Counters()
            total.add(self.totals)
            for c in self._live:
                total.add(c)
            return total

    @property
    def clients(self) -> int:
        return len(self._live)


class ExportRegistry:
    """Named exports plus the default export (the empty name). An ExportProvider."""

    def __init__(self, exports: Sequence[Export], default: str | None = None) -> None:
        self.exports: dict[str, Export] = {}
        for e in exports:
            if e.name in self.exports:
                raise ValueError(f"export name {e.name!r} is used twice")
            self.exports[e.name] = e
        if default is None and exports:
            default = exports[0].name
        if default is not None and default not in self.exports:
            raise ValueError(f"default export {default!r} is not defined")
        self.default = default

    def get(self, name: str) -> Export | None:
        e = self.exports.get(name)
        if e is None and name == "" and self.default is not None:
            e = self.exports[self.default]
        return e

    def lookup(self, name: str) -> ExportInfo | None:
        e = self.get(name)
        return e.info if e is not None else None

    def list_exports(self) -> list[ExportInfo]:
        return [e.info for e in self.exports.values()]

    def close(self) -> None:
        for e in self.exports.values():
            try:
                e.backend.close()
            except (OSError, BackendError):
                pass
