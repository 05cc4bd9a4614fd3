"""The plugin interface: every storage backend (built-in or yours) implements it.

This is pynbd's public, versioned plugin API (``API_VERSION`` 1), specified in
docs/plugins.md. A backend is a class: the export's size and capabilities are attributes,
the data path is a handful of synchronous methods (``pread_into``, ``pwrite``, ``flush``,
``trim``, ``zero``, ``cache``, ``extents``). Errors are raised as :class:`BackendError`
(or any ``OSError``): the server sends the errno to the client. Any other exception is
a bug in the backend: the client gets EIO, the server logs it and carries on.

How the server calls you is declared, not guessed:

- ``blocking`` (default True): calls may wait (disk, network, sleep), so the server runs
  them on a thread pool. Backends whose calls take microseconds (memory, page cache) set
  it False and are called inline on the worker's event loop (a thread hand-off costs
  30-50x a page-cache read); they must then never wait.
- ``thread_model``: which calls may overlap (nbdkit's four models; the server does the
  locking).
- ``multi_process``: the backend may be opened once per worker process (its state lives
  in the kernel or a service: files, shared memory, a storage cluster). Otherwise the
  server serves it from one process.
"""

from __future__ import annotations

import enum
import errno as _errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

#: the plugin API version this pynbd implements; plugins declare ``api_version``
API_VERSION = 1

AioDone = Callable[[OSError | None], None]


class AioReadDone(Protocol):
    """How an asynchronous read ends: ``done(None)`` once ``buf`` is filled, or
    ``done(None, data)`` with a bytes-like object of exactly ``len(buf)`` bytes that the
    server sends instead (``buf`` stays untouched: no copy when the backend's library
    returns a buffer of its own), or ``done(error)``."""

    def __call__(self, err: OSError | None, data: bytes | None = None, /) -> None: ...

# base:allocation flags, as in the NBD spec.
STATE_HOLE = 1
STATE_ZERO = 2


class BackendError(OSError):
    """A storage failure with an errno the server can report to the client."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class ConfigError(ValueError):
    """A plugin or filter was given bad parameters (shown to the user, exit status 2)."""


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes sharing the same ``base:allocation`` flags."""

    length: int
    flags: int  # STATE_HOLE | STATE_ZERO bits


class ThreadModel(enum.Enum):
    """Which calls may run at the same time (nbdkit's models, least parallel first)."""

    #: one connection at a time: others wait in the handshake until it closes
    SERIALIZE_CONNECTIONS = "serialize_connections"
    #: one request at a time, across all connections
    SERIALIZE_ALL_REQUESTS = "serialize_all_requests"
    #: one request at a time per connection; connections run in parallel
    SERIALIZE_REQUESTS = "serialize_requests"
    #: anything may run in parallel (the backend is thread-safe)
    PARALLEL = "parallel"


_REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """A ``KEY=VALUE`` parameter of a plugin or filter.

    ``type`` converts the text (``int``, ``float``, ``str``, ``parse_size``,
    ``parse_bool`` or your own; it raises ValueError for bad text). Without a
    ``default`` the parameter is required.
    """

    help: str = ""
    type: Callable[[str], Any] = str
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, on/off, 1/0)")


def parse_params(owner: str, spec: dict[str, Param], given: dict[str, str]) -> dict[str, Any]:
    """Validate ``KEY=VALUE`` text against ``spec``: unknown keys, missing required ones
    and values that do not convert are :class:`ConfigError` naming the parameter."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        raise ConfigError(f"{owner}: unknown parameter {unknown[0]!r} (known: {known})")
    out: dict[str, Any] = {}
    for key, p in spec.items():
        if key not in given:
            if p.required:
                raise ConfigError(f"{owner}: parameter {key!r} is required"
                                  + (f" ({p.help})" if p.help else ""))
            out[key] = p.default
            continue
        try:
            out[key] = p.type(given[key])
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{owner}: {key}={given[key]!r}: {exc}") from None
    return out


class Backend:
    """Base class with conservative defaults; subclasses override what they can do."""

    #: the plugin API version the class was written for
    api_version: ClassVar[int] = API_VERSION
    #: ``KEY=VALUE`` parameters, passed to ``__init__`` as keyword arguments
    params: ClassVar[dict[str, Param]] = {}
    #: which calls may overlap; the server enforces it
    thread_model: ClassVar[ThreadModel] = ThreadModel.PARALLEL
    #: the backend may be opened in every worker process (see the module docstring)
    multi_process: ClassVar[bool] = False

    #: human name of the target, for logs and status ("file:/srv/disk.img", "memory:1G")
    name: str = "backend"
    size: int = 0
    read_only: bool = False
    #: flushes on one connection are visible to all connections (NBD_FLAG_CAN_MULTI_CONN)
    can_multi_conn: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = True
    can_extents: bool = False
    rotational: bool = False
    #: calls may wait: the server runs them on worker threads (False: called inline on
    #: the event loop, so they must never wait)
    blocking: bool = True
    #: flush() and FUA writes may take long (fdatasync): the server runs them on threads
    slow_sync: bool = False
    #: the backend implements the aio_* methods (with ``blocking``): the server starts
    #: READ, WRITE, FLUSH, TRIM and WRITE_ZEROES with them instead of using a thread
    aio: bool = False
    #: minimum, preferred and maximum block sizes (NBD_INFO_BLOCK_SIZE); a maximum of
    #: 0xFFFFFFFF means no limit of the backend's own (the server option decides)
    block_size: tuple[int, int, int] = (1, 4096, 0xFFFFFFFF)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` with the bytes at ``offset``."""
        raise NotImplementedError

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` if that cannot block (data in memory); False to have the server
        call :meth:`pread_into` on a thread instead. The default just reads."""
        self.pread_into(buf, offset)
        return True

    def resident(self, offset: int, length: int) -> bool:
        """Whether reading the range will not block (e.g. it is in the page cache)."""
        return True

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``; with ``fua`` it is durable on return."""
        raise BackendError(_errno.EPERM, f"{self.name} is read-only")

    def flush(self) -> None:
        """Make every completed write durable."""

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard a range (advisory: reads may return old data or zeros)."""

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        """Make a range read as zeros.

        ``may_trim`` false is NBD_CMD_FLAG_NO_HOLE: space must stay allocated.
        ``fast`` is NBD_CMD_FLAG_FAST_ZERO: raise ENOTSUP unless this is faster than
        writing zeros.
        """
        if fast:
            raise BackendError(_errno.ENOTSUP, f"{self.name}: fast zero not supported")
        chunk = min(length, 1 << 20)
        zeros = bytes(chunk)
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            self.pwrite(memoryview(zeros)[:n], offset)
            offset += n
        if fua:
            self.flush()

    def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch of a range."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` extents covering at least the first byte of the range.

        The extents start at ``offset``; together they may cover less than ``length``
        (never zero bytes) or more (the server trims). The default: all data.
        """
        return [Extent(length, 0)]

    # --- opening ----------------------------------------------------------------------

    @classmethod
    def open_target(cls, target: str, params: dict[str, str], read_only: bool) -> Backend:
        """Make the backend for ``SCHEME:TARGET KEY=VALUE...``. The default validates
        ``params`` against :attr:`params`, calls ``cls(**values)`` and refuses target
        text (override it for backends whose target names something, like a path)."""
        if target:
            raise ConfigError(f"{cls.__name__} takes no target text (got {target!r}); "
                              "give KEY=VALUE parameters instead")
        values = parse_params(cls.__name__, cls.params, params)
        backend = cls(**values)
        if read_only:
            backend.read_only = True
        return backend

    def open_connection(self, export: str, read_only: bool) -> Backend:
        """A client selected the export: the object whose methods serve its requests
        (default: this one). Return a new object to keep per-connection state."""
        return self

    def close_connection(self) -> None:
        """The connection that :meth:`open_connection` returned this for has ended."""

    def worker_spec(self) -> dict[str, object] | None:
        """How a worker process reopens this backend (see ``open_worker_backend``), or
        None when its state lives in this process only: the server then serves every
        connection from one process. Backends opened from a TARGET with
        ``multi_process = True`` are reopened from the same TARGET and parameters."""
        opened = getattr(self, "_opened_as", None)
        if self.multi_process and opened is not None:
            return {"kind": "target", **opened}
        return None

    # --- asynchronous interface (optional; ``aio = True``) ------------------------------
    # Each call starts the operation and returns at once; ``done(None)`` or
    # ``done(OSError)`` is called exactly once, from any thread, when it finishes.

    def aio_completion_fd(self) -> int | None:
        """A descriptor that becomes readable when completions wait for
        :meth:`aio_poll`, or None (the default: ``done`` is called from the backend's own
        threads). With a descriptor, ``done`` is only ever called by :meth:`aio_poll`
        (which the server calls on its loop) or, for a request refused at once, by the
        aio_* call itself: both on the server's loop thread."""
        return None

    def aio_poll(self) -> None:
        """Deliver the completions that are ready (see :meth:`aio_completion_fd`)."""

    def aio_pread(self, buf: memoryview, offset: int, done: AioReadDone) -> None:
        raise NotImplementedError

    def aio_pwrite(self, buf: memoryview, offset: int, fua: bool, done: AioDone) -> None:
        raise NotImplementedError

    def aio_flush(self, done: AioDone) -> None:
        raise NotImplementedError

    def aio_trim(self, offset: int, length: int, fua: bool, done: AioDone) -> None:
        raise NotImplementedError

    def aio_zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool,
                 done: AioDone) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources. Called once when the server stops."""
