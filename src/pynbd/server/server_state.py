"""What every part of the NBD server's supervisor shares: the attributes set in
``Server.__init__`` and, for the type checker only, the methods one part calls in
another.

The supervisor (:class:`~pynbd.server.server.Server`) is one object built from parts,
one module each: listening sockets (:mod:`.server_listeners`), admission of new
connections (:mod:`.server_admission`), the worker handles and their replacement
(:mod:`.server_workers`), status and control verbs (:mod:`.server_status`). They are
mixins over :class:`ServerState`, so the attribute names stay those of one object.
"""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pynbd.protocol.server import ServerConfig
    from pynbd.server.acl import AccessList
    from pynbd.server.control import ControlServer
    from pynbd.server.exports import ExportRegistry
    from pynbd.server.limits import Limits
    from pynbd.server.logsafe import RefusalLog
    from pynbd.server.loop import Loop
    from pynbd.server.server import ServerOptions
    from pynbd.server.server_admission import ConnRecord, _Pool
    from pynbd.server.server_listeners import Listener
    from pynbd.server.server_workers import WorkerHandle


class ServerState:
    """The attributes of the supervisor (see ``Server.__init__``)."""

    registry: ExportRegistry
    options: ServerOptions
    limits: Limits
    tls_context: ssl.SSLContext | None
    protocol_config: ServerConfig
    loop: Loop
    _greeting: bytes
    listeners: list[Listener]
    workers: list[WorkerHandle]
    _nworkers: int
    _records: dict[int, ConnRecord]
    _next_id: int
    _silent: _Pool
    _progressing: _Pool
    _est_by_host: Counter[str]
    _established: int
    _stopping: threading.Event
    _loop_thread: threading.Thread | None
    _started: bool
    started: float
    _idle_since: float | None
    total_connections: int
    rejected_connections: int
    evicted_connections: int
    worker_restarts: int
    acl: AccessList | None
    control: ControlServer | None
    refusals: RefusalLog
    accept_filter: Callable[[str], bool] | None
    worker_hooks: list[Callable[[WorkerHandle], None]]
    status_hooks: list[Callable[[dict[str, Any]], None]]

    if TYPE_CHECKING:
        # defined in one part, called from another
        def call(self, fn: Callable[[Callable[[Any], None]], None], timeout: float) -> Any: ...
        def _gather(self, each: Callable[[WorkerHandle, Callable[[Any], None]], None],
                    done: Callable[[list[Any]], None]) -> None: ...
        def uris(self) -> list[str]: ...
        def set_acl(self, entries: list[str], default_deny: bool | None = None) -> int: ...
        def configure_filter(self, export: str, name: str, params: dict[str, str]) -> int: ...
        def worker_spec(self, index: int) -> dict[str, Any]: ...
        def _worker_died(self, handle: WorkerHandle) -> None: ...
        def _on_negotiated(self, conn_id: int, export: str) -> None: ...
        def _on_closed(self, conn_id: int) -> None: ...
