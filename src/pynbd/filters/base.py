"""The filter API: a layer between the server and the next layer (a filter or the
plugin), nbdkit style. A filter subclasses :class:`Filter`, overrides what it changes
and lets everything else through to ``self.next``; specified in docs/plugins.md.

A request travels down: driver -> protocol -> filters (first given, outermost) ->
plugin. Capabilities travel up: each one of a filter is the next layer's unless the
filter overrides it (a read-only filter says ``read_only = True``).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pynbd.backends.base import Backend, ConfigError, Extent, Param, ThreadModel

if TYPE_CHECKING:
    from pynbd.backends.loader import FilterSpec

__all__ = ["Admission", "Filter", "Param"]

_ORDER = list(ThreadModel)


class Verdict(enum.Enum):
    GO = "go"
    WAIT = "wait"  # hold the request; ask again after ``delay`` (None: when woken)
    REFUSE = "refuse"  # reply with ``errno`` without running it


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    delay: float | None = None
    errno: int = 0
    message: str = ""


GO = Admission(Verdict.GO)


def _delegate(name: str) -> property:
    def get(self: Filter) -> Any:
        return getattr(self.next, name)
    return property(get, doc=f"the next layer's ``{name}`` unless the filter overrides it")


class Filter(Backend):
    """Wraps ``next``. Every data-path method defaults to calling the same method of
    ``next``; every capability defaults to the next layer's."""

    #: ``KEY=VALUE`` parameters (passed to ``__init__`` after ``next``)
    params: ClassVar[dict[str, Param]] = {}
    #: filters keep per-process state at most (counters, a rate): one per worker is fine
    multi_process: ClassVar[bool] = True
    #: the filter may hold or refuse requests before they run (see :meth:`admit`)
    admits: ClassVar[bool] = False
    #: the filter's own thread model; the stack's is the most serializing of all layers
    filter_thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL

    name = _delegate("name")
    size = _delegate("size")
    read_only = _delegate("read_only")
    can_multi_conn = _delegate("can_multi_conn")
    can_flush = _delegate("can_flush")
    can_fua = _delegate("can_fua")
    can_trim = _delegate("can_trim")
    can_zero = _delegate("can_zero")
    can_fast_zero = _delegate("can_fast_zero")
    can_cache = _delegate("can_cache")
    can_extents = _delegate("can_extents")
    rotational = _delegate("rotational")
    blocking = _delegate("blocking")
    slow_sync = _delegate("slow_sync")
    block_size = _delegate("block_size")
    #: filters see every request: no zero-copy reads and no aio past them
    aio = False
    sendfile_fd = None

    def __init__(self, next: Backend, **params: Any) -> None:
        self.next = next
        self.spec: FilterSpec | None = None

    @property
    def thread_model(self) -> ThreadModel:  # type: ignore[override]
        """The most serializing of this filter's and the next layer's models."""
        mine = type(self).filter_thread_model
        below = self.next.thread_model
        return min(mine, below, key=_ORDER.index)

    @property
    def layers(self) -> list[Backend]:
        """This filter and every layer below it, top first."""
        out: list[Backend] = [self]
        b: Backend = self.next
        while isinstance(b, Filter):
            out.append(b)
            b = b.next
        out.append(b)
        return out

    @property
    def plugin(self) -> Backend:
        return self.layers[-1]

    # --- admission -----------------------------------------------------------------

    def admit(self, cmd: str, offset: int, length: int, now: float) -> Admission:
        """Before a request runs (only called when some filter sets ``admits``): GO, or
        WAIT (hold it; the server asks again after ``delay`` seconds, or when the filter
        calls its wake-up), or REFUSE with an errno. Runs on the event loop: never wait."""
        nxt = self.next
        if isinstance(nxt, Filter):
            return nxt.admit(cmd, offset, length, now)
        return GO

    # --- the data path: defaults pass through -----------------------------------------

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.next.pread_into(buf, offset)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Read through this filter without waiting, or say no: the server then reads on
        a thread. A filter cannot know what its own read will touch, so it reads only
        when the next layer has the range in memory."""
        if not self.next.resident(offset, len(buf)):
            return False
        self.pread_into(buf, offset)
        return True

    def resident(self, offset: int, length: int) -> bool:
        return self.next.resident(offset, length)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self.next.pwrite(buf, offset, fua)

    def flush(self) -> None:
        self.next.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.next.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self.next.zero(offset, length, may_trim, fast, fua)

    def cache(self, offset: int, length: int) -> None:
        self.next.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.next.extents(offset, length)

    # --- connections and lifetime ---------------------------------------------------------

    def open_connection(self, export: str, read_only: bool) -> Backend:
        below = self.next.open_connection(export, read_only)
        if below is self.next:
            return self
        mine = copy.copy(self)
        mine.next = below
        return mine

    def close_connection(self) -> None:
        self.next.close_connection()

    def worker_spec(self) -> dict[str, object] | None:
        if not self.multi_process or self.spec is None:
            return None
        base = self.next.worker_spec()
        if base is None:
            return None
        if base.get("kind") == "stack":
            inner = base
        else:
            inner = {"kind": "stack", "base": base, "filters": []}
        mine: dict[str, object] = {"name": self.spec.name, "params": self.spec.params}
        fds = list(base.get("fds", []))  # type: ignore[call-overload]
        state = self.worker_state()
        if state is not None:
            mine["state"] = state
            fds += [int(fd) for fd in state.get("fds", [])]  # type: ignore[attr-defined]
        filters = [mine, *inner["filters"]]  # type: ignore[misc]
        return {"kind": "stack", "base": inner["base"], "filters": filters, "fds": fds}

    def worker_state(self) -> dict[str, object] | None:
        """What the instances in worker processes need from this one (the supervisor's)
        besides the parameters, e.g. open files whose contents all workers share: a
        JSON-able dict; file descriptors listed under ``"fds"`` stay open with the same
        numbers in the workers. The worker instances are made by
        :meth:`from_worker_state` with it. Default: None (nothing to pass)."""
        return None

    @classmethod
    def from_worker_state(cls, next: Backend, state: dict[str, Any],
                          **params: Any) -> Filter:
        """Make the instance of a worker process from what :meth:`worker_state` of the
        supervisor's instance returned (default: as from the parameters alone)."""
        return cls(next, **params)

    def configure(self, params: dict[str, str]) -> None:
        """Change parameters at run time (``pynbd filter --control``). Raise ConfigError
        for what cannot change; the default: nothing can."""
        raise ConfigError(f"filter {self.spec.name if self.spec else type(self).__name__} "
                          "cannot be changed at run time")

    def stats(self) -> dict[str, Any] | None:
        """What ``pynbd status`` shows for this filter (None: nothing)."""
        return None

    def close(self) -> None:
        self.next.close()
