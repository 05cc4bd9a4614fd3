"""The FUSE side of ``pynbd fuse``: mount an :class:`~pynbd.fuse.export.ExportFile`.

The binding is ``mfusepy`` (ctypes over libfuse 3's high-level API, maintained fork of
fusepy; see docs/fuse.md for why). libfuse runs its multi-threaded loop: every kernel
request is served on one of libfuse's threads, which borrows one NBD connection for
it. Reads are received straight into libfuse's reply buffer and writes are sent
straight from its request buffer (no copy in Python).

Life cycle, run in the foreground:

1. connect (all connections) -- errors are reported before anything is mounted;
2. mount; when the kernel's INIT arrives the mount is usable: the file's path is
   printed on stdout and the pid file written (``ready``);
3. serve until SIGINT/SIGTERM/SIGHUP (libfuse's handlers), ``fusermount3 -u`` /
   ``umount``, or the server goes away: then the failing request gets EIO, the
   process signals itself, libfuse leaves its loop and unmounts (lazily, so a
   program still holding the file open does not keep the mount alive);
4. close the NBD connections (flushing) and return the exit status: 0 after a
   requested stop, 1 when the server was lost.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynbd.fuse.export import ExportFile

log = logging.getLogger("pynbd.fuse")

#: how often idle connections are checked for a server that went away
WATCH_INTERVAL = 0.5
#: idle libfuse threads kept for kernel requests (nbdfuse's choice)
MAX_IDLE_THREADS = 10


class BindingMissing(RuntimeError):
    pass


def load_binding() -> Any:
    """Import mfusepy on libfuse 3 (it would pick libfuse 2 first when both exist:
    libfuse 2 caps writes at 128 KiB)."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except ImportError as exc:
        raise BindingMissing(
            "the FUSE binding is not installed: pip install 'pynbd[fuse]' "
            f"(mfusepy) ({exc})") from exc
    except OSError as exc:  # mfusepy raises OSError when it finds no libfuse
        raise BindingMissing(
            f"libfuse 3 is not installed (Debian: apt-get install fuse3): {exc}") from exc
    return mfusepy


@dataclass
class MountOptions:
    mountpoint: str
    filename: str = "nbd"
    fuse_options: list[str] = field(default_factory=list)
    single_thread: bool = False
    debug: bool = False
    pidfile: str | None = None


class Operations:
    """The high-level FUSE operations for one file (``filename`` in the mount's root,
    or the mount's root itself when mounted over a regular file)."""

    use_ns = True  # timestamps in nanoseconds (mfusepy's modern interface)

    def __init__(self, export: ExportFile, filename: str | None,
                 on_init: Callable[[], None] | None = None) -> None:
        self.export = export
        self.filename = filename
        self._file_path = "/" if filename is None else "/" + filename
        self.on_init = on_init
        self._t0 = time.time_ns()
        self._uid = os.geteuid()
        self._gid = os.getegid()

    # --- metadata -----------------------------------------------------------------

    def _check(self, path: str | None) -> None:
        if path is not None and path != self._file_path:
            raise OSError(errno.ENOENT, path)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        t = self._t0
        st = {"st_uid": self._uid, "st_gid": self._gid, "st_atime": t, "st_mtime": t,
              "st_ctime": t}
        if path == self._file_path:
            size = self.export.size
            st.update(st_mode=stat.S_IFREG | (0o444 if self.export.read_only else 0o644),
                      st_nlink=1, st_size=size, st_blocks=(size + 511) // 512)
        elif path == "/":
            st.update(st_mode=stat.S_IFDIR | 0o555, st_nlink=2)
        else:
            raise OSError(errno.ENOENT, path)
        return st

    def readdir(self, path: str, fh: int) -> list[str]:
        if path != "/" or self.filename is None:
            raise OSError(errno.ENOTDIR if self.filename is None else errno.ENOENT, path)
        return [".", "..", self.filename]

    def statfs(self, path: str) -> dict[str, int]:
        bs = 4096
        return {"f_bsize": bs, "f_frsize": bs, "f_blocks": -(-self.export.size // bs),
                "f_bfree": 0, "f_bavail": 0, "f_files": 1, "f_ffree": 0,
                "f_namemax": 255}

    def open(self, path: str, flags: int) -> int:
        self._check(path)
        if self.export.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        # O_TRUNC is ignored, as for a block device (`dd of=`, `>` work); the size
        # itself never changes
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._check(path)
        if self.export.read_only:
            raise OSError(errno.EROFS, "read-only")
        self.export.truncate(length)

    # --- data (read/write go through _FUSE below, without copies) -------------------

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        buf = bytearray(size)
        n = self.export.read_into(offset, memoryview(buf))
        return bytes(buf[:n])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.export.write(offset, memoryview(data))

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self.export.fsync()

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> None:
        self.export.fallocate(mode, offset, length)

    def init(self, path: str) -> None:
        if self.on_init is not None:
            self.on_init()


def _fuse_class(mfusepy: Any) -> type:
    class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy's FUSE with copy-free read and write."""

        def read(self, path: bytes | None, buf: Any, size: int, offset: int,
                 fip: Any) -> int:
            view = memoryview((ctypes.c_char * size).from_address(
                ctypes.addressof(buf.contents))).cast("B")
            n: int = self.operations.export.read_into(offset, view)
            return n

        def write(self, path: bytes | None, buf: Any, size: int, offset: int,
                  fip: Any) -> int:
            view = memoryview((ctypes.c_char * size).from_address(
                ctypes.addressof(buf.contents))).cast("B")
            n: int = self.operations.export.write(offset, view)
            return n

    return _FUSE


def _mount_kwargs(opts: MountOptions, read_only: bool, version: tuple[int, int]
                  ) -> dict[str, Any]:
    kw: dict[str, Any] = {"fsname": "pynbd", "subtype": "pynbd"}
    if version >= (3, 12):
        # fuse_main in libfuse 3.12-3.16 passes an unset idle-thread limit on and
        # complains ("Ignoring invalid max threads value"): set one, as nbdfuse does
        kw["max_idle_threads"] = MAX_IDLE_THREADS
    if read_only:
        kw["ro"] = True
    for group in opts.fuse_options:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            kw[key] = value if eq else True
    kw["foreground"] = True
    if opts.single_thread:
        kw["nothreads"] = True
    if opts.debug:
        kw["debug"] = True
    return kw


class MountError(RuntimeError):
    pass


def file_mode(mountpoint: str) -> bool:
    """True when MOUNTPOINT is a regular file (the export replaces it), False for a
    directory (the export appears inside it); MountError otherwise."""
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return False
    if stat.S_ISREG(st.st_mode):
        return True
    raise MountError(f"mountpoint {mountpoint} is neither a directory nor a regular file")


def serve(export: ExportFile, opts: MountOptions,
          ready: Callable[[str], None] | None = None) -> str | None:
    """Mount ``export`` and serve it until the mount ends. Returns None after a
    requested stop (signal or unmount), or the reason the server was lost. Does not
    close the export."""
    mfusepy = load_binding()
    naked = file_mode(opts.mountpoint)
    path = opts.mountpoint if naked else os.path.join(opts.mountpoint, opts.filename)
    if not naked and ("/" in opts.filename or opts.filename in ("", ".", "..")):
        raise MountError(f"invalid file name {opts.filename!r}")

    stop = threading.Event()
    running = threading.Event()
    pid = os.getpid()

    def leave(reason: str) -> None:
        # called once, from whichever thread saw the loss: have libfuse leave its
        # loop (its SIGTERM handler) -- only once the loop runs (see on_init)
        if running.is_set():
            os.kill(pid, signal.SIGTERM)

    export.on_gone = leave

    def watch() -> None:
        while not stop.wait(WATCH_INTERVAL):
            reason = export.conns.check_idle()
            if reason is not None:
                export._lost(ConnectionError(reason))
                return

    def on_init() -> None:
        running.set()
        threading.Thread(target=watch, name="pynbd-fuse-watch", daemon=True).start()
        if opts.pidfile:
            with open(opts.pidfile, "w") as f:
                f.write(f"{pid}\n")
        if ready is not None:
            ready(path)
        if export.gone is not None:  # lost between connecting and mounting
            os.kill(pid, signal.SIGTERM)

    ops = Operations(export, None if naked else opts.filename, on_init)
    # libfuse installs its SIGINT/SIGTERM/SIGHUP handlers only over the default action
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    fuse_cls = _fuse_class(mfusepy)
    try:
        fuse_cls(ops, opts.mountpoint, **_mount_kwargs(
            opts, export.read_only, (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)))
    except RuntimeError as exc:
        # fuse_main's status: 1-6 before the loop ran (bad option, mount failed: libfuse
        # printed why), 7 when the loop ended on a signal or error
        code = exc.args[0] if exc.args else None
        if not running.is_set():
            raise MountError(f"could not mount {opts.mountpoint} (libfuse status {code}; "
                             "see the message above)") from None
    finally:
        stop.set()
        if opts.pidfile:
            try:
                os.unlink(opts.pidfile)
            except OSError:
                pass
    return export.gone
