"""librados and librbd through their C API (ctypes): the calls the RBD backend makes.

Why not the Python bindings (python3-rados, python3-rbd): their asynchronous calls end in
a callback that takes the GIL on librbd's own threads. Under load every completion waits
for the server's loop to give the GIL up and hands it back after (measured: 87-112 us of
server CPU per 4 KiB request against 37-45 us for ``rbd bench``, and 4 MiB writes at a
quarter of librbd's rate). The C API can instead queue completions and signal an eventfd
(``rbd_set_image_notification``); the server's loop polls that descriptor and collects
them with ``rbd_poll_io_events``, so librbd's threads never run Python. Reads land in and
writes leave from the server's own buffers, without the bindings' copies. And pynbd no
longer needs Python modules built for one interpreter: only librbd1 and librados2.

Every function here returns what the C call returns or raises :class:`CephCallError`
(an OSError with the call's errno); the backend turns those into messages for users.
"""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_ssize_t,
    c_uint8,
    c_uint64,
    c_void_p,
)
from typing import Any

__all__ = [
    "EVENT_TYPE_EVENTFD",
    "LOAD_ERROR",
    "RBD_FEATURE_FAST_DIFF",
    "RBD_FLAG_FAST_DIFF_INVALID",
    "RBD_WRITE_ZEROES_FLAG_THICK_PROVISION",
    "CephCallError",
    "Cluster",
    "Image",
    "IoCtx",
    "available",
]

RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_FLAG_FAST_DIFF_INVALID = 1 << 1
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0
#: rbd_set_image_notification: librbd writes 1 to an eventfd per completion
EVENT_TYPE_EVENTFD = 2


class CephCallError(OSError):
    """A librados/librbd call returned a negative errno."""

    def __init__(self, err: int, call: str) -> None:
        super().__init__(err, os.strerror(err))
        self.call = call

    def __str__(self) -> str:
        return f"{self.call}: [errno {self.errno}] {self.strerror}"


class _ImageInfo(Structure):  # rbd_image_info_t
    _fields_ = [("size", c_uint64), ("obj_size", c_uint64), ("num_objs", c_uint64),
                ("order", c_int), ("block_name_prefix", c_char * 24),
                ("parent_pool", c_int64), ("parent_name", c_char * 96)]


class _ConfigOption(Structure):  # rbd_config_option_t
    _fields_ = [("name", c_char_p), ("value", c_char_p), ("source", c_int)]


#: int (*)(uint64_t offset, size_t length, int exists, void *arg)
_DIFF_CB = CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)

_P = c_void_p  # rados_t, rados_ioctx_t, rbd_image_t, rbd_completion_t: opaque pointers

# name: (restype, argtypes); every one releases the GIL while it runs (ctypes.CDLL)
_RADOS: dict[str, tuple[Any, list[Any]]] = {
    "rados_create2": (c_int, [POINTER(_P), c_char_p, c_char_p, c_uint64]),
    "rados_conf_read_file": (c_int, [_P, c_char_p]),
    "rados_conf_set": (c_int, [_P, c_char_p, c_char_p]),
    "rados_conf_get": (c_int, [_P, c_char_p, c_char_p, c_size_t]),
    "rados_connect": (c_int, [_P]),
    "rados_shutdown": (None, [_P]),
    "rados_ioctx_create": (c_int, [_P, c_char_p, POINTER(_P)]),
    "rados_ioctx_destroy": (None, [_P]),
    "rados_ioctx_set_namespace": (None, [_P, c_char_p]),
}
_RBD: dict[str, tuple[Any, list[Any]]] = {
    "rbd_open": (c_int, [_P, c_char_p, POINTER(_P), c_char_p]),
    "rbd_open_read_only": (c_int, [_P, c_char_p, POINTER(_P), c_char_p]),
    "rbd_close": (c_int, [_P]),
    "rbd_stat": (c_int, [_P, POINTER(_ImageInfo), c_size_t]),
    "rbd_get_features": (c_int, [_P, POINTER(c_uint64)]),
    "rbd_get_flags": (c_int, [_P, POINTER(c_uint64)]),
    "rbd_read": (c_ssize_t, [_P, c_uint64, c_size_t, c_void_p]),
    "rbd_write": (c_ssize_t, [_P, c_uint64, c_size_t, c_void_p]),
    "rbd_flush": (c_int, [_P]),
    "rbd_discard": (c_int, [_P, c_uint64, c_uint64]),
    "rbd_write_zeroes": (c_int, [_P, c_uint64, c_uint64, c_int, c_int]),
    "rbd_diff_iterate2": (c_int, [_P, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8,
                                  _DIFF_CB, c_void_p]),
    "rbd_config_image_list": (c_int, [_P, POINTER(_ConfigOption), POINTER(c_int)]),
    "rbd_config_image_list_cleanup": (None, [POINTER(_ConfigOption), c_int]),
    "rbd_set_image_notification": (c_int, [_P, c_int, c_int]),
    "rbd_aio_read": (c_int, [_P, c_uint64, c_size_t, c_void_p, _P]),
    "rbd_aio_write": (c_int, [_P, c_uint64, c_size_t, c_void_p, _P]),
    "rbd_aio_flush": (c_int, [_P, _P]),
    "rbd_aio_discard": (c_int, [_P, c_uint64, c_uint64, _P]),
    "rbd_aio_write_zeroes": (c_int, [_P, c_uint64, c_size_t, _P, c_int, c_int]),
}
# cheap calls made for every request: keep the GIL (ctypes.PyDLL) instead of giving it
# up and taking it back around a few hundred nanoseconds of work
_RBD_HOT: dict[str, tuple[Any, list[Any]]] = {
    "rbd_aio_create_completion": (c_int, [c_void_p, c_void_p, POINTER(_P)]),
    "rbd_aio_get_return_value": (c_ssize_t, [_P]),
    "rbd_aio_release": (None, [_P]),
    "rbd_poll_io_events": (c_int, [_P, POINTER(_P), c_int]),
}


def _load(names: tuple[str, ...], table: dict[str, tuple[Any, list[Any]]],
          kind: type[ctypes.CDLL] = ctypes.CDLL) -> Any:
    lib: Any = None
    last: OSError | None = None
    for name in names:
        try:
            lib = kind(name)
            break
        except OSError as exc:
            last = exc
    if lib is None:
        raise OSError(errno.ENOENT, f"cannot load {names[0]}: {last}")
    for fn, (restype, argtypes) in table.items():
        f = getattr(lib, fn)  # AttributeError: a librbd too old for pynbd
        f.restype = restype
        f.argtypes = argtypes
    return lib


try:
    _rados: Any = _load(("librados.so.2",), _RADOS)
    _rbd: Any = _load(("librbd.so.1",), _RBD)
    _rbd_hot: Any = _load(("librbd.so.1",), _RBD_HOT, ctypes.PyDLL)
except (OSError, AttributeError) as _exc:  # pragma: no cover - depends on the host
    _rados = _rbd = _rbd_hot = None
    LOAD_ERROR: str | None = str(_exc)
else:
    LOAD_ERROR = None


def available() -> bool:
    return _rbd is not None


def _check(rv: int, call: str) -> int:
    if rv < 0:
        raise CephCallError(-rv, call)
    return rv


def _b(s: str) -> bytes:
    return s.encode()


class Cluster:
    """A librados client (``rados_t``): configure, connect, shut down."""

    def __init__(self, name: str) -> None:
        handle = _P()
        _check(_rados.rados_create2(byref(handle), b"ceph", _b(name), 0), "rados_create2")
        self.handle: int | None = handle.value

    def read_conf(self, path: str) -> None:
        _check(_rados.rados_conf_read_file(self.handle, _b(path)), "rados_conf_read_file")

    def conf_set(self, key: str, value: str) -> None:
        _check(_rados.rados_conf_set(self.handle, _b(key), _b(value)),
               f"rados_conf_set({key})")

    def conf_get(self, key: str) -> str:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            rv = _rados.rados_conf_get(self.handle, _b(key), buf, size)
            if rv == -errno.ENAMETOOLONG and size < 1 << 20:
                size *= 4
                continue
            _check(rv, f"rados_conf_get({key})")
            return buf.value.decode(errors="replace")

    def connect(self) -> None:
        _check(_rados.rados_connect(self.handle), "rados_connect")

    def open_ioctx(self, pool: str) -> IoCtx:
        io = _P()
        _check(_rados.rados_ioctx_create(self.handle, _b(pool), byref(io)),
               "rados_ioctx_create")
        return IoCtx(io.value)

    def shutdown(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            _rados.rados_shutdown(handle)


class IoCtx:
    """A pool (and namespace) I/O context (``rados_ioctx_t``)."""

    def __init__(self, handle: int | None) -> None:
        self.handle = handle

    def set_namespace(self, namespace: str) -> None:
        _rados.rados_ioctx_set_namespace(self.handle, _b(namespace))

    def open_image(self, name: str, snapshot: str | None, read_only: bool) -> Image:
        img = _P()
        fn = _rbd.rbd_open_read_only if read_only else _rbd.rbd_open
        snap = _b(snapshot) if snapshot is not None else None
        _check(fn(self.handle, _b(name), byref(img), snap), "rbd_open")
        return Image(img.value)

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            _rados.rados_ioctx_destroy(handle)


class Image:
    """An open image (``rbd_image_t``): its synchronous calls (on the server's threads:
    they release the GIL) and the asynchronous ones, whose completions are collected with
    :meth:`poll` after librbd signals the eventfd given to :meth:`notify_eventfd`."""

    def __init__(self, handle: int | None) -> None:
        self.handle = handle

    # --- properties -----------------------------------------------------------------
    def stat(self) -> tuple[int, int]:
        """(size, object size) in bytes."""
        info = _ImageInfo()
        _check(_rbd.rbd_stat(self.handle, byref(info), ctypes.sizeof(info)), "rbd_stat")
        return int(info.size), int(info.obj_size)

    def features(self) -> int:
        v = c_uint64()
        _check(_rbd.rbd_get_features(self.handle, byref(v)), "rbd_get_features")
        return int(v.value)

    def flags(self) -> int:
        v = c_uint64()
        _check(_rbd.rbd_get_flags(self.handle, byref(v)), "rbd_get_flags")
        return int(v.value)

    def config(self) -> dict[str, str]:
        """librbd's options as this image sees them (pool and image overrides included)."""
        n = c_int(256)
        while True:
            opts = (_ConfigOption * n.value)()
            rv = _rbd.rbd_config_image_list(self.handle, opts, byref(n))
            if rv == -errno.ERANGE and n.value > len(opts):
                continue
            _check(rv, "rbd_config_image_list")
            try:
                return {(o.name or b"").decode(): (o.value or b"").decode(errors="replace")
                        for o in opts[:n.value]}
            finally:
                _rbd.rbd_config_image_list_cleanup(opts, n.value)

    # --- synchronous I/O ----------------------------------------------------------------
    def read_into(self, offset: int, length: int, buf: Any) -> int:
        """Read ``length`` bytes into the writable buffer ``buf``; the count read."""
        arr = (c_char * length).from_buffer(buf)
        try:
            return _check(_rbd.rbd_read(self.handle, offset, length, arr), "rbd_read")
        finally:
            del arr

    def write(self, offset: int, data: Any) -> int:
        keep, ptr = pointer_to(data)
        return _check(_rbd.rbd_write(self.handle, offset, len(keep), ptr), "rbd_write")

    def flush(self) -> None:
        _check(_rbd.rbd_flush(self.handle), "rbd_flush")

    def discard(self, offset: int, length: int) -> None:
        _check(_rbd.rbd_discard(self.handle, offset, length), "rbd_discard")

    def write_zeroes(self, offset: int, length: int, zero_flags: int) -> None:
        _check(_rbd.rbd_write_zeroes(self.handle, offset, length, zero_flags, 0),
               "rbd_write_zeroes")

    def diff_iterate(self, offset: int, length: int, whole_object: bool,
                     found: list[tuple[int, int]]) -> None:
        """Append (offset, length) of every allocated extent in the range to ``found``."""

        def cb(off: int, n: int, exists: int, _arg: object) -> int:
            if exists:
                found.append((off, n))
            return 0

        _check(_rbd.rbd_diff_iterate2(self.handle, None, offset, length, 1,
                                      1 if whole_object else 0, _DIFF_CB(cb), None),
               "rbd_diff_iterate2")

    # --- asynchronous I/O -------------------------------------------------------------
    def notify_eventfd(self, fd: int) -> None:
        """Queue completions for :meth:`poll` and signal ``fd`` (an eventfd) for each."""
        _check(_rbd.rbd_set_image_notification(self.handle, fd, EVENT_TYPE_EVENTFD),
               "rbd_set_image_notification")

    @staticmethod
    def completion() -> int:
        """A completion without a callback (delivered through :meth:`poll` only)."""
        c = _P()
        _check(_rbd_hot.rbd_aio_create_completion(None, None, byref(c)),
               "rbd_aio_create_completion")
        assert c.value is not None
        return c.value

    @staticmethod
    def release(comp: int) -> None:
        _rbd_hot.rbd_aio_release(comp)

    @staticmethod
    def return_value(comp: int) -> int:
        return int(_rbd_hot.rbd_aio_get_return_value(comp))

    def aio_read(self, offset: int, length: int, ptr: Any, comp: int) -> None:
        _check(_rbd.rbd_aio_read(self.handle, offset, length, ptr, comp), "rbd_aio_read")

    def aio_write(self, offset: int, length: int, ptr: Any, comp: int) -> None:
        _check(_rbd.rbd_aio_write(self.handle, offset, length, ptr, comp), "rbd_aio_write")

    def aio_flush(self, comp: int) -> None:
        _check(_rbd.rbd_aio_flush(self.handle, comp), "rbd_aio_flush")

    def aio_discard(self, offset: int, length: int, comp: int) -> None:
        _check(_rbd.rbd_aio_discard(self.handle, offset, length, comp), "rbd_aio_discard")

    def aio_write_zeroes(self, offset: int, length: int, zero_flags: int, comp: int) -> None:
        _check(_rbd.rbd_aio_write_zeroes(self.handle, offset, length, comp, zero_flags, 0),
               "rbd_aio_write_zeroes")

    def poll(self, into: Any) -> int:
        """Move up to ``len(into)`` finished completions into ``into`` (a ctypes array of
        pointers); how many."""
        return int(_rbd_hot.rbd_poll_io_events(self.handle, into, len(into)))

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            _check(_rbd.rbd_close(handle), "rbd_close")


def completion_array(n: int) -> Any:
    """A ctypes array for :meth:`Image.poll`."""
    return (_P * n)()


def pointer_to(data: Any) -> tuple[Any, Any]:
    """(an object to keep alive while librbd uses the memory, the pointer to pass) for a
    buffer: writable buffers are passed in place, bytes objects too; anything else is
    copied once."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if not mv.readonly and mv.contiguous:
        arr = (c_char * mv.nbytes).from_buffer(mv)
        return arr, arr
    obj = mv.obj
    if type(obj) is bytes and len(obj) == mv.nbytes and mv.c_contiguous and mv.ndim == 1:
        return obj, obj  # all of a bytes object, in order
    copy = bytes(mv)
    return copy, copy
