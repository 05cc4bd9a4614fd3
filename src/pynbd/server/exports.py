"""Exports: a backend, what the protocol advertises for it, and the hooks migration uses.

An :class:`Export` is the supervisor's view of one export. The workers that serve it
keep their own runtime state (``server/worker.py``); the :class:`IOGate` and the write
tracker set here reach every worker through the server.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynbd.backends.base import Backend, BackendError
from pynbd.protocol.constants import BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH
from pynbd.protocol.server import ExportInfo


@dataclass(slots=True)
class Counters:
    """Per-export request counters."""

    bytes_read: int = 0
    bytes_written: int = 0
    requests: int = 0
    errors: int = 0

    def add(self, other: Counters) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.requests += other.requests
        self.errors += other.errors


class GateBackend(Protocol):
    """What an :class:`IOGate` drives: the server, which tells every worker."""

    def gate_pause(self, export: str, timeout: float | None) -> bool: ...

    def gate_resume(self, export: str) -> None: ...

    def gate_step_down(self, export: str, reason: str) -> None: ...


class IOGate:
    """Pauses an export's client I/O in every worker (finishing what is running, holding
    what arrives, disconnecting nobody) and steps it down (ESHUTDOWN from then on).

    Until the server binds it (``Server.start``) it only records the state; the server
    applies that state to the workers when it binds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paused = False
        self.stepped_down = False
        self.step_down_reason = ""
        self._export = ""
        self._backend: GateBackend | None = None

    def bind(self, export: str, backend: GateBackend) -> None:
        self._export = export
        self._backend = backend
        if self.stepped_down:
            backend.gate_step_down(export, self.step_down_reason)
        elif self._paused:
            backend.gate_pause(export, 0)

    def pause(self, timeout: float | None = None) -> bool:
        """Stop new requests; wait until running ones finish. False on timeout (the
        gate stays paused; call resume())."""
        with self._lock:
            self._paused = True
            backend = self._backend
        if backend is None:
            return True
        return backend.gate_pause(self._export, timeout)

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            backend = self._backend
        if backend is not None:
            backend.gate_resume(self._export)

    def step_down(self, reason: str) -> None:
        """Refuse every further request (ESHUTDOWN): another copy is authoritative now."""
        with self._lock:
            self.stepped_down = True
            self.step_down_reason = reason
            self._paused = False
            backend = self._backend
        if backend is not None:
            backend.gate_step_down(self._export, reason)

    @property
    def paused(self) -> bool:
        return self._paused


class WriteTracker:
    """Receives the ranges clients changed, after the change was attempted."""

    def mark(self, offset: int, length: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class TrackerBackend(Protocol):
    def set_tracker(self, export: str, tracker: Any) -> None: ...


@dataclass
class Export:
    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False
    info: ExportInfo = field(init=False)
    #: set by migration: pauses and steps down client I/O
    gate: IOGate | None = None
    _tracker: Any = field(default=None, repr=False)
    _tracker_backend: TrackerBackend | None = field(default=None, repr=False)
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

    @property
    def tracker(self) -> Any:
        """Told about every range a client changes (a migration's dirty map)."""
        return self._tracker

    @tracker.setter
    def tracker(self, value: Any) -> None:
        self._tracker = value
        if self._tracker_backend is not None:
            self._tracker_backend.set_tracker(self.name, value)


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
