"""The FUSE side of ``pynbd fuse``: mount an :class:`~pynbd.fuse.export.ExportFile`.

The binding is ``mfusepy`` (ctypes over libfuse 3's high-level API, maintained fork of
fusepy; see docs/fuse.md for why). libfuse runs its multi-threaded loop: every kernel
request is served on one of libfuse's threads, which borrows one NBD connection for
it. Reads are received straight into libfuse's reply buffer and writes are sent
straight from its request buffer (no copy in Python).

Life cycle, run in the foreground:

1. connect (all connections) -- errors are reported before anything is mounted;
2. mount; once the kernel has the reply to its INIT the mount is usable: readahead is
   set, the file's path printed on stdout and the pid file written (``ready``), and a
   thread starts watching the idle connections;
3. serve until SIGINT/SIGTERM/SIGHUP (libfuse's handlers), ``fusermount3 -u`` /
   ``umount``, or the server goes away: then the failing request gets EIO, the watch
   thread ends libfuse's loop (fuse_exit, and SIGUSR1 to wake the main thread), and
   libfuse unmounts (lazily, so a program still holding the file open does not keep
   the mount alive);
4. the caller closes the NBD connections (flushing) and exits: 0 after a requested
   stop, 1 when the server was lost.
"""

from __future__ import annotations

import contextlib
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
#: libfuse's default limit of threads serving kernel requests
MAX_THREADS = 10


#: readahead set on the mount's backing device: the kernel's 128 KiB makes sequential
#: reads through the page cache a string of small requests; 4 MiB lets them go out as
#: several 1 MiB requests in parallel (random reads do not ramp readahead up)
DEFAULT_READAHEAD = 4 << 20


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
    #: kernel readahead for the mount in bytes (None: leave the kernel's 128 KiB)
    readahead: int | None = DEFAULT_READAHEAD


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


_thread_local = threading.local()


def _keep_thread_state() -> None:
    """Keep the calling libfuse thread's Python thread state between callbacks.

    A ctypes callback on a thread Python did not start makes a new thread state on
    entry and deletes it on exit (PyGILState_Ensure/Release), which costs about as
    much as a small NBD request. One extra PyGILState_Ensure, never released, keeps
    the state (the GIL is still released after each callback). libfuse's threads live
    until the loop ends (max_idle_threads is set to the thread limit), so this holds at
    most one state per thread.
    """
    if not getattr(_thread_local, "kept", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _thread_local.kept = True


def _fuse_class(mfusepy: Any) -> type:
    class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy's FUSE with copy-free read and write."""

        def read(self, path: bytes | None, buf: Any, size: int, offset: int,
                 fip: Any) -> int:
            _keep_thread_state()
            view = memoryview((ctypes.c_char * size).from_address(
                ctypes.addressof(buf.contents))).cast("B")
            n: int = self.operations.export.read_into(offset, view)
            return n

        def write(self, path: bytes | None, buf: Any, size: int, offset: int,
                  fip: Any) -> int:
            _keep_thread_state()
            view = memoryview((ctypes.c_char * size).from_address(
                ctypes.addressof(buf.contents))).cast("B")
            n: int = self.operations.export.write(offset, view)
            return n

    return _FUSE


def _mount_kwargs(opts: MountOptions, read_only: bool, version: tuple[int, int]
                  ) -> dict[str, Any]:
    kw: dict[str, Any] = {"fsname": "pynbd", "subtype": "pynbd"}
    user: dict[str, Any] = {}
    if read_only:
        kw["ro"] = True
    for group in opts.fuse_options:
        for item in group.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            user[key] = value if eq else True
    if version >= (3, 12) and "max_idle_threads" not in user:
        # fuse_main in libfuse 3.12-3.16 passes its "unset" idle-thread limit on and
        # complains ("Ignoring invalid max threads value"): set one. Equal to the
        # thread limit, so that libfuse never ends a thread (each one keeps a Python
        # thread state, see _keep_thread_state)
        kw["max_idle_threads"] = user.get("max_threads", MAX_THREADS)
    kw.update(user)
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


def _mount_device(mountpoint: str) -> str | None:
    """MAJOR:MINOR of what is mounted at ``mountpoint`` (a canonical path: resolving it
    here could stat the mount itself) from /proc/self/mountinfo."""
    target = mountpoint.encode()
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" - ")[0].split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    found = fields[2].decode()
    except OSError:
        return None
    return found


def _unescape(field: bytes) -> bytes:
    # mountinfo writes space, tab, newline and backslash as \ooo
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def set_readahead(mountpoint: str, nbytes: int) -> bool:
    """Set the kernel readahead of the FUSE mount at ``mountpoint`` (canonical path) on
    its BDI in sysfs, as ``blockdev --setra`` does for a block device. Needs root;
    False if not done."""
    dev = _mount_device(mountpoint)
    if dev is None:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(nbytes // 1024))
    except OSError as exc:
        log.debug("cannot set readahead of %s (bdi %s): %s", mountpoint, dev, exc)
        return False
    log.debug("readahead of %s (bdi %s): %d KiB", mountpoint, dev, nbytes // 1024)
    return True


_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def serve(export: ExportFile, opts: MountOptions,
          ready: Callable[[str], None] | None = None) -> str | None:
    """Mount ``export`` and serve it until the mount ends. Returns None after a
    requested stop (signal or unmount), or the reason the server was lost. Does not
    close the export."""
    if threading.current_thread() is not threading.main_thread():
        raise MountError("pynbd fuse must run in the main thread (signals)")
    mfusepy = load_binding()
    naked = file_mode(opts.mountpoint)
    if not naked and ("/" in opts.filename or opts.filename in ("", ".", "..")):
        raise MountError(f"invalid file name {opts.filename!r}")
    run = _MountRun(export, opts, ready, naked, mfusepy._libfuse)
    ops = Operations(export, None if naked else opts.filename, run.on_init)
    # libfuse installs its SIGINT/SIGTERM/SIGHUP handlers only over the default action
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    old_usr1 = signal.signal(signal.SIGUSR1, _ignore_signal)
    fuse_cls = _fuse_class(mfusepy)
    try:
        fuse_cls(ops, opts.mountpoint, **_mount_kwargs(
            opts, export.read_only, (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)))
    except RuntimeError as exc:
        # fuse_main's status: 1-6 before the loop ran (bad option, mount failed: libfuse
        # printed why), 7 when the loop ended on a signal or error
        code = exc.args[0] if exc.args else None
        if not run.running.is_set():
            raise MountError(f"could not mount {opts.mountpoint} (libfuse status {code}; "
                             "see the message above)") from None
    finally:
        run.stop.set()
        signal.signal(signal.SIGUSR1, old_usr1)
        if opts.pidfile:
            with contextlib.suppress(OSError):
                os.unlink(opts.pidfile)
    return export.gone


class _MountRun:
    """One run of libfuse's loop for :func:`serve`: the callbacks it makes, and the
    watch thread that ends it when the export is gone."""

    def __init__(self, export: ExportFile, opts: MountOptions,
                 ready: Callable[[str], None] | None, naked: bool, libfuse: Any) -> None:
        self.export = export
        self.opts = opts
        self.ready = ready
        self.path = opts.mountpoint if naked else os.path.join(opts.mountpoint,
                                                               opts.filename)
        # resolved now: in on_init (before libfuse answers the kernel's INIT) anything
        # that looks at the mount itself would wait for INIT, i.e. for itself
        self.real_mountpoint = os.path.realpath(opts.mountpoint)
        self.stop = threading.Event()  # the loop has ended
        self.running = threading.Event()  # the loop runs (INIT arrived)
        self.wake = threading.Event()  # for the watch thread: the export is gone
        self.pid = os.getpid()
        self.main_thread = threading.main_thread().ident or 0
        self.libfuse = libfuse
        libfuse.fuse_exit.argtypes = [ctypes.c_void_p]
        libfuse.fuse_exit.restype = None
        self.fuse_ptr: list[int] = []
        export.on_gone = lambda reason: self.wake.set()

    def end_loop(self) -> None:
        # fuse_exit() marks the session as ended; libfuse's main thread notices when a
        # signal interrupts its wait: SIGUSR1, whose Python handler does nothing (a
        # SIGTERM would kill the process if it came after libfuse removed its handlers).
        # Repeated, in case the first one came just before the main thread waited.
        self.libfuse.fuse_exit(ctypes.c_void_p(self.fuse_ptr[0]))
        for _ in range(3000):
            if self.stop.is_set():
                return
            signal.pthread_kill(self.main_thread, signal.SIGUSR1)
            self.stop.wait(0.2)

    def on_init(self) -> None:
        # runs on a libfuse thread before the kernel has INIT's reply: nothing here may
        # touch the mount (it would wait for this very callback)
        self.fuse_ptr.append(self.libfuse.fuse_get_context().contents.fuse)
        self.running.set()
        threading.Thread(target=self.after_init, name="pynbd-fuse-watch",
                         daemon=True).start()

    def after_init(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # they are the main thread's
        # the kernel holds every request until INIT's reply: once this stat returns,
        # the mount is usable (and the kernel has set its defaults, readahead too)
        try:
            os.stat(self.path)
        except OSError as exc:
            log.debug("stat %s after mounting: %s", self.path, exc)
        if self.stop.is_set():
            return
        opts = self.opts
        if opts.readahead is not None:
            set_readahead(self.real_mountpoint, opts.readahead)
        if opts.pidfile:
            with open(opts.pidfile, "w") as f:
                f.write(f"{self.pid}\n")
        if self.ready is not None:
            self.ready(self.path)
        self.watch()

    def watch(self) -> None:
        """Until the loop ends: end it once the export is gone, drop idle connections."""
        export = self.export
        while not self.stop.is_set():
            if export.gone is not None:
                self.end_loop()
                return
            conns = export.conns
            reason = conns.check_idle()
            if reason is not None:
                export.idle_lost(reason, conns)
                continue
            self.wake.wait(WATCH_INTERVAL)
