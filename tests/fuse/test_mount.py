"""``pynbd fuse``: exports of pynbd serve, nbdkit and qemu-nbd mounted as a file and used
by ordinary programs (cmp, dd, fallocate, truncate, mkfs.ext4, e2fsck)."""

from __future__ import annotations

import errno
import mmap
import os
import random
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pynbd.client import connect
from tests.fuse.conftest import TIMEOUT, Mounter, is_mounted, mount_options, mount_type
from tests.support.images import make_image
from tests.support.nbd_servers import Server, require, start_nbdkit, start_qemu_nbd
from tests.support.pynbd_server import PynbdServer, free_unix_path, wait_until

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 32 * MiB
KINDS = ["pynbd", "nbdkit", "qemu-nbd"]


def make_source(path: Path, size: int = SIZE, seed: int = 16) -> bytes:
    """A sparse image: random data in a few places, holes elsewhere; its content."""
    extents = {0: 64 * 1024, 3 * MiB + 5: 2 * MiB, size - 3 * MiB: MiB, size - 4096: 4096}
    return make_image(path, size, extents, seed=seed).read_bytes()


@dataclass
class Export:
    kind: str
    uri: str
    image: Path | None  # the backing file, if any
    log: Path | None = None  # nbdkit's log filter output
    stop: Callable[[], None] = lambda: None
    pid: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


class Exports:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.n = 0
        self.stops: list[Callable[[], None]] = []

    def _dir(self, kind: str) -> Path:
        self.n += 1
        d = self.tmp / f"{kind[:5]}{self.n}"
        d.mkdir()
        return d

    def start(self, kind: str, image: Path | None = None, *, size: int = SIZE,
              read_only: bool = False, log: bool = False,
              extra: tuple[str, ...] = (), filters: tuple[str, ...] = (),
              params: tuple[str, ...] = ()) -> Export:
        """``extra``: server options; ``filters``/``params``: nbdkit filters and their
        parameters."""
        d = self._dir(kind)
        if kind == "pynbd":
            args = ["--socket", free_unix_path(d, "p.sock")]
            if read_only:
                args.append("--read-only")
            target = str(image) if image is not None else f"memory:{size}"
            srv = PynbdServer([*args, *extra, target], cwd=d)
            self.stops.append(srv.stop)
            return Export(kind, srv.uri, image, stop=srv.stop, pid=srv.pid)
        if kind == "nbdkit":
            logf = d / "nbdkit-requests.log"
            flt = (*filters, "log") if log else filters
            plugin, args = ("file", [str(image)]) if image is not None else \
                ("memory", [str(size)])
            args += params
            if log:
                args.append(f"logfile={logf}")
            s: Server = start_nbdkit(d, plugin, args, transport="unix", read_only=read_only,
                                     filters=flt, extra=extra)
            self.stops.append(s.stop)
            return Export(kind, s.uri(), image, logf if log else None, s.stop, s.proc.pid)
        if kind == "qemu-nbd":
            if image is None:
                image = make_image(d / "q.img", size)
            s = start_qemu_nbd(d, image, transport="unix", read_only=read_only, extra=extra)
            self.stops.append(s.stop)
            return Export(kind, s.uri(), image, None, s.stop, s.proc.pid)
        raise ValueError(kind)

    def close(self) -> None:
        for stop in self.stops:
            stop()


@pytest.fixture
def exports(tmp_path: Path) -> Iterator[Exports]:
    e = Exports(tmp_path)
    try:
        yield e
    finally:
        e.close()


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def nbd_read(uri: str, offset: int, length: int) -> bytes:
    """Read through a separate NBD connection (not through the mount)."""
    with connect(uri, timeout=TIMEOUT) as c:
        return bytes(c.read(offset, length))


def allocated(path: Path, offset: int, length: int) -> int:
    """Bytes of [offset, offset+length) that the file system has allocated (SEEK_DATA)."""
    total = 0
    end = offset + length
    pos = offset
    with open(path, "rb") as f:
        fd = f.fileno()
        for _ in range(10000):
            if pos >= end:
                break
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if data >= end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            total += min(hole, end) - data
            pos = hole
    return total


# --- reading: the mounted file is the export ----------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_mounted_file_equals_the_source(kind: str, tmp_path: Path, exports: Exports,
                                        mount: Mounter) -> None:
    src = tmp_path / "source.img"
    make_source(src)
    e = exports.start(kind, src)
    m = mount(e.uri)
    assert m.path == str(m.mountpoint / "nbd")
    assert os.listdir(m.mountpoint) == ["nbd"]
    st = os.stat(m.path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == SIZE
    assert mount_type(m.mountpoint) == "fuse.pynbd"
    run("cmp", m.path, str(src))
    assert m.signal(signal.SIGTERM) == 0
    assert not is_mounted(m.mountpoint)


def test_nbdkit_memory_export_reads_zeroes(exports: Exports,
                                                          mount: Mounter) -> None:
    e = exports.start("nbdkit", size=8 * MiB)
    m = mount(e.uri)
    with open(m.path, "rb") as f:
        assert f.read() == bytes(8 * MiB)


# --- writing: dd conv=fsync reaches the server --------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_dd_fsync_writes_reach_the_server(kind: str, tmp_path: Path, exports: Exports,
                                          mount: Mounter) -> None:
    src = tmp_path / "source.img"
    make_source(src)
    e = exports.start(kind, src)
    m = mount(e.uri)
    payload = tmp_path / "payload"
    data = random.Random(7).randbytes(5 * MiB)
    payload.write_bytes(data)
    # at a 1 MiB boundary plus an odd tail
    run("dd", f"if={payload}", f"of={m.path}", "bs=1M", "seek=7", "conv=notrunc,fsync",
        "status=none")
    assert nbd_read(e.uri, 7 * MiB, len(data)) == data
    with open(src, "rb") as f:  # on the server's backing file too
        f.seek(7 * MiB)
        assert f.read(len(data)) == data
    # an unaligned pwrite from Python, then fsync
    fd = os.open(m.path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"unaligned!", 12345) == 10
        os.fsync(fd)
    finally:
        os.close(fd)
    assert nbd_read(e.uri, 12345, 10) == b"unaligned!"
    # dd without notrunc opens with O_TRUNC: ignored, as for a block device
    run("dd", f"if={payload}", f"of={m.path}", "bs=1M", "count=1", "conv=fsync",
        "status=none")
    assert os.stat(m.path).st_size == SIZE
    assert nbd_read(e.uri, 0, MiB) == data[:MiB]
    assert nbd_read(e.uri, 7 * MiB, MiB) == data[:MiB]
    assert m.signal(signal.SIGTERM) == 0


def test_fsync_is_an_nbd_flush(exports: Exports, mount: Mounter) -> None:
    e = exports.start("nbdkit", log=True)
    m = mount(e.uri)
    fd = os.open(m.path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        flushes = e.log_text().count(" Flush ")
        os.fsync(fd)
        assert e.log_text().count(" Flush ") == flushes + 1
    finally:
        os.close(fd)


# --- fallocate: punch-hole trims, zero-range zeroes ---------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_punch_hole_trims_and_reads_zeroes(kind: str, tmp_path: Path, exports: Exports,
                                           mount: Mounter) -> None:
    src = tmp_path / "source.img"
    make_source(src)
    with open(src, "r+b") as f:  # make 8-16 MiB allocated data
        f.seek(8 * MiB)
        f.write(random.Random(3).randbytes(8 * MiB))
        f.flush()
        os.fsync(f.fileno())
    assert allocated(src, 8 * MiB, 8 * MiB) == 8 * MiB
    extra: tuple[str, ...] = ("--discard=unmap",) if kind == "qemu-nbd" else ()
    e = exports.start(kind, src, extra=extra)
    m = mount(e.uri)
    run("fallocate", "--punch-hole", "--offset", str(10 * MiB), "--length", str(4 * MiB),
        m.path)
    # the range reads as zeroes (through the mount and through another connection) ...
    with open(m.path, "rb") as f:
        f.seek(10 * MiB)
        assert f.read(4 * MiB) == bytes(4 * MiB)
    assert nbd_read(e.uri, 10 * MiB, 4 * MiB) == bytes(4 * MiB)
    # ... its neighbours are untouched, and the server deallocated it
    expect = random.Random(3).randbytes(8 * MiB)
    assert nbd_read(e.uri, 8 * MiB, 2 * MiB) == expect[:2 * MiB]
    assert nbd_read(e.uri, 14 * MiB, 2 * MiB) == expect[6 * MiB:]
    assert allocated(src, 10 * MiB, 4 * MiB) == 0
    assert allocated(src, 8 * MiB, 2 * MiB) == 2 * MiB


def test_punch_hole_is_trim_then_write_zeroes(exports: Exports, mount: Mounter) -> None:
    e = exports.start("nbdkit", log=True)
    m = mount(e.uri)
    run("fallocate", "--punch-hole", "--offset", "65536", "--length", "131072", m.path)
    log = e.log_text()
    assert " Trim " in log and "offset=0x10000 count=0x20000" in log
    zero = [ln for ln in log.splitlines() if " Zero " in ln and "..." in ln.split()[-1]]
    assert any("offset=0x10000 count=0x20000 trim=1" in ln for ln in zero), log[-2000:]
    assert log.index(" Trim ") < log.index(" Zero ")


def test_zero_range_writes_zeroes_and_keeps_allocation(exports: Exports,
                                                       mount: Mounter) -> None:
    e = exports.start("nbdkit", log=True)
    m = mount(e.uri)
    fd = os.open(m.path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * MiB, 0)
        run("fallocate", "--zero-range", "--offset", "4096", "--length", "8192", m.path)
        assert os.pread(fd, 3 * 4096, 0) == b"\xff" * 4096 + bytes(8192)
    finally:
        os.close(fd)
    log = e.log_text()
    assert any("offset=0x1000 count=0x2000 trim=0" in ln for ln in log.splitlines()
               if " Zero " in ln), log[-2000:]
    assert " Trim " not in log


def test_server_without_write_zeroes(exports: Exports, mount: Mounter) -> None:
    """nozero filter: zero-range is done with zero writes; punch-hole cannot promise
    zeroes, so it is refused (EOPNOTSUPP) and nothing is sent."""
    e = exports.start("nbdkit", log=True, filters=("nozero",))
    m = mount(e.uri)
    fd = os.open(m.path, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xee" * (3 * MiB), 0)
        os.fsync(fd)
        r = run("fallocate", "--punch-hole", "--offset", "0", "--length", str(MiB), m.path,
                check=False)
        assert r.returncode != 0 and "unsupported" in r.stderr, r.stderr
        assert os.pread(fd, 16, 0) == b"\xee" * 16
        run("fallocate", "--zero-range", "--offset", str(MiB), "--length", str(MiB + 7),
            m.path)
        assert os.pread(fd, MiB + 16, MiB) == bytes(MiB + 7) + b"\xee" * 9
    finally:
        os.close(fd)
    log = e.log_text()
    assert " Zero " not in log and " Trim " not in log


# --- a file system on the file --------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_mkfs_ext4_then_e2fsck_through_a_second_mount(kind: str, exports: Exports,
                                                      mount: Mounter) -> None:
    require("mkfs.ext4")
    require("e2fsck")
    e = exports.start(kind, size=128 * MiB)
    first = mount(e.uri)
    run("mkfs.ext4", "-F", "-q", first.path)
    second = mount(e.uri)
    r = run("e2fsck", "-fn", second.path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert first.signal(signal.SIGTERM) == 0
    assert second.signal(signal.SIGINT) == 0
    # and once more after both are gone, through a fresh mount
    third = mount(e.uri, "--readonly")
    r = run("e2fsck", "-fn", third.path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# --- stopping ------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_cleanly_after_flushing(sig: int, exports: Exports,
                                                mount: Mounter) -> None:
    e = exports.start("nbdkit", log=True)
    m = mount(e.uri)
    fd = os.open(m.path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"written before the signal", MiB)
    finally:
        os.close(fd)
    assert m.signal(sig) == 0
    assert not is_mounted(m.mountpoint)
    assert os.listdir(m.mountpoint) == []
    log = e.log_text()
    assert " Flush " in log and " Disconnect " in log
    assert nbd_read(e.uri, MiB, 25) == b"written before the signal"
    assert "Traceback" not in m.stderr


def test_fusermount_unmount_ends_the_process(exports: Exports, mount: Mounter) -> None:
    e = exports.start("pynbd")
    m = mount(e.uri)
    run("fusermount3", "-u", str(m.mountpoint))
    assert m.wait() == 0
    assert not is_mounted(m.mountpoint)


# --- the server goes away --------------------------------------------------------------

def _dd_read(path: str, skip_mib: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M", "count=1",
                             f"skip={skip_mib}", "iflag=direct"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _blocked_in_fuse(pid: int) -> bool:
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return "fuse" in wchan or wchan == "request_wait_answer"


def _assert_lost_and_unmounted(m: object) -> None:
    from tests.fuse.conftest import FuseMount
    assert isinstance(m, FuseMount)
    assert m.wait() == 1
    assert not is_mounted(m.mountpoint)
    assert "NBD server went away" in m.stderr, m.stderr
    assert "Traceback" not in m.stderr, m.stderr


def test_killed_server_gives_eio_to_a_reader_then_unmounts(exports: Exports,
                                                           mount: Mounter) -> None:
    """nbdkit holds every read for a while (delay filter); the server is killed while a
    reader waits: the reader gets EIO, the mount ends, the process says why."""
    e = exports.start("nbdkit", filters=("delay",), params=("delay-read=20",))
    m = mount(e.uri, "--connections", "1")
    reader = _dd_read(m.path, 3)
    assert wait_until(lambda: _blocked_in_fuse(reader.pid), TIMEOUT)
    os.kill(e.pid, signal.SIGKILL)
    _, err = reader.communicate(timeout=TIMEOUT)
    assert reader.returncode != 0
    assert "Input/output error" in err, err
    _assert_lost_and_unmounted(m)


def test_killed_pynbd_server_gives_eio_then_unmounts(exports: Exports,
                                                     mount: Mounter) -> None:
    """pynbd serve frozen (SIGSTOP) with a read in flight, then killed (one process:
    with worker processes, stopping the supervisor would not freeze the workers)."""
    e = exports.start("pynbd", extra=("--workers", "1"))
    m = mount(e.uri)
    # a first read, with O_DIRECT: a buffered one leaves kernel readahead in flight,
    # and the next open waits for it (the frozen server would never answer it)
    first = _dd_read(m.path, 0)
    assert first.wait(TIMEOUT) == 0
    os.kill(e.pid, signal.SIGSTOP)
    try:
        reader = _dd_read(m.path, 5)
        assert wait_until(lambda: _blocked_in_fuse(reader.pid), TIMEOUT)
    finally:
        os.kill(e.pid, signal.SIGKILL)
    _, err = reader.communicate(timeout=TIMEOUT)
    assert reader.returncode != 0 and "Input/output error" in err, err
    _assert_lost_and_unmounted(m)


@pytest.mark.parametrize("kind", ["pynbd", "qemu-nbd"])
def test_server_stopping_while_idle_unmounts(kind: str, exports: Exports,
                                             mount: Mounter) -> None:
    """Nobody is reading: the closed connections are noticed and the mount ends."""
    e = exports.start(kind)
    m = mount(e.uri)
    with open(m.path, "rb") as f:
        f.read(4096)
    e.stop()
    _assert_lost_and_unmounted(m)


def test_unresponsive_server_times_out(exports: Exports, mount: Mounter) -> None:
    """A server that never answers: the reader gets EIO after --timeout, no hang."""
    e = exports.start("nbdkit", filters=("delay",), params=("delay-read=60",))
    m = mount(e.uri, "--timeout", "2", "--connections", "1")
    reader = _dd_read(m.path, 1)
    _, err = reader.communicate(timeout=TIMEOUT)
    assert reader.returncode != 0 and "Input/output error" in err, err
    _assert_lost_and_unmounted(m)
    assert "no reply from the server in time" in m.stderr


# --- multi-conn ------------------------------------------------------------------------

def test_multi_conn_server_gets_several_connections(exports: Exports,
                                                    mount: Mounter) -> None:
    e = exports.start("nbdkit", log=True)
    m = mount(e.uri, "--connections", "3")
    run("dd", f"if={m.path}", "of=/dev/null", "bs=1M", "count=8", "iflag=direct",
        "status=none")
    run("dd", "if=/dev/zero", f"of={m.path}", "bs=1M", "count=8", "oflag=direct",
        "conv=notrunc,fsync", "status=none")
    log = e.log_text().splitlines()
    connects = {ln.split("connection=")[1].split()[0] for ln in log if " Connect " in ln}
    reads = {ln.split("connection=")[1].split()[0] for ln in log if " Read " in ln}
    writes = {ln.split("connection=")[1].split()[0] for ln in log if " Write " in ln}
    assert len(connects) == 3
    assert reads == connects and writes == connects


def test_server_without_multi_conn_gets_one_connection(exports: Exports,
                                                       mount: Mounter) -> None:
    e = exports.start("nbdkit", log=True, filters=("multi-conn",),
                      params=("multi-conn-mode=disable",))
    m = mount(e.uri, "--connections", "4")
    run("dd", f"if={m.path}", "of=/dev/null", "bs=1M", "count=8", "iflag=direct",
        "status=none")
    log = e.log_text().splitlines()
    assert len([ln for ln in log if " Connect " in ln]) == 1
    assert len([ln for ln in log if " Read " in ln]) >= 8


# --- read-only -------------------------------------------------------------------------

def _assert_refuses_writes(path: str) -> None:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    with pytest.raises(OSError) as ei:
        os.open(path, os.O_WRONLY)
    assert ei.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    r = run("dd", "if=/dev/zero", f"of={path}", "bs=4k", "count=1", "conv=notrunc",
            check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    r = run("fallocate", "--punch-hole", "--offset", "0", "--length", "4096", path,
            check=False)
    assert r.returncode != 0


@pytest.mark.parametrize("kind", KINDS)
def test_read_only_export_refuses_writes(kind: str, tmp_path: Path, exports: Exports,
                                         mount: Mounter) -> None:
    src = tmp_path / "source.img"
    make_source(src)
    e = exports.start(kind, src, read_only=True)
    m = mount(e.uri)
    _assert_refuses_writes(m.path)
    run("cmp", m.path, str(src))
    assert "ro" in mount_options(m.mountpoint)


def test_readonly_flag_on_a_writable_export(tmp_path: Path, exports: Exports,
                                            mount: Mounter) -> None:
    src = tmp_path / "source.img"
    data = make_source(src)
    e = exports.start("pynbd", src)
    m = mount(e.uri, "-r")
    _assert_refuses_writes(m.path)
    assert src.read_bytes() == data


# --- file semantics ----------------------------------------------------------------------

def test_block_device_semantics(exports: Exports, mount: Mounter) -> None:
    e = exports.start("pynbd", size=MiB)
    m = mount(e.uri)
    fd = os.open(m.path, os.O_RDWR)
    try:
        # the size is fixed: truncating to it is fine, to anything else EINVAL
        os.ftruncate(fd, MiB)
        for size in (0, MiB - 1, 2 * MiB):
            with pytest.raises(OSError) as ei:
                os.ftruncate(fd, size)
            assert ei.value.errno == errno.EINVAL
        assert os.fstat(fd).st_size == MiB
        # reads stop at the end, writes are cut short at it and fail past it
        assert os.pread(fd, 100, MiB - 10) == bytes(10)
        assert os.pread(fd, 100, MiB) == b""
        assert os.pwrite(fd, b"z" * 100, MiB - 10) == 10
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"z", MiB)
        assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
        assert nbd_read(e.uri, MiB - 10, 10) == b"z" * 10
        # plain allocation is not a thing for a block device (glibc's posix_fallocate
        # would emulate it, the fallocate tool does not)
        r = run("fallocate", "--offset", "0", "--length", "4096", m.path, check=False)
        assert r.returncode != 0 and "not supported" in r.stderr, r.stderr
    finally:
        os.close(fd)
    # nothing else lives in the directory
    assert os.listdir(m.mountpoint) == ["nbd"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.mountpoint / "other")
    with pytest.raises(OSError):
        open(m.mountpoint / "new", "wb").close()


def test_filename_option_and_a_file_as_mountpoint(tmp_path: Path, exports: Exports,
                                                  mount: Mounter) -> None:
    src = tmp_path / "source.img"
    make_source(src)
    e = exports.start("pynbd", src)
    m = mount(e.uri, "--filename", "disk.raw")
    assert m.path == str(m.mountpoint / "disk.raw")
    assert os.listdir(m.mountpoint) == ["disk.raw"]
    run("cmp", m.path, str(src))
    # over a regular file, the file itself becomes the export (as nbdfuse does)
    target = tmp_path / "naked.raw"
    target.write_bytes(b"whatever was here")
    n = mount(e.uri, mountpoint=target)
    assert n.path == str(target)
    assert os.stat(target).st_size == SIZE
    run("cmp", str(target), str(src))
    assert n.signal(signal.SIGTERM) == 0
    assert target.read_bytes() == b"whatever was here"


# --- bad input ---------------------------------------------------------------------------

def test_connection_refused_mounts_nothing(tmp_path: Path, mount: Mounter) -> None:
    sock = free_unix_path(tmp_path, "nobody.sock")
    m = mount(f"nbd+unix:///?socket={sock}", wait=False)
    assert m.wait() == 1
    assert "cannot connect" in m.stderr and "Traceback" not in m.stderr
    assert not is_mounted(m.mountpoint)


@pytest.mark.parametrize("args, rc, message", [
    (("nbd://127.0.0.1:1/x?bogus=1",), 2, "pynbd fuse:"),
    (("--connections", "0"), 2, "at least 1"),
])
def test_bad_arguments(args: tuple[str, ...], rc: int, message: str,
                       mount: Mounter) -> None:
    uri, *rest = args if "://" in args[0] else ("nbd://127.0.0.1:1/", *args)
    m = mount(uri, *rest, wait=False)
    assert m.wait() == rc
    assert message in m.stderr and "Traceback" not in m.stderr


def test_bad_mountpoints(tmp_path: Path, exports: Exports, mount: Mounter) -> None:
    e = exports.start("pynbd", size=MiB)
    m = mount(e.uri, mountpoint=tmp_path / "missing", wait=False)
    assert m.wait() == 1
    assert "mountpoint" in m.stderr and "Traceback" not in m.stderr
    m = mount(e.uri, "--filename", "a/b", wait=False)
    assert m.wait() == 1
    assert "invalid file name" in m.stderr
    device = mount(e.uri, mountpoint=Path("/dev/null"), wait=False)
    assert device.wait() == 1
    assert "neither a directory nor a regular file" in device.stderr


def test_fuse_options_reach_libfuse(tmp_path: Path, exports: Exports,
                                    mount: Mounter) -> None:
    src = tmp_path / "source.img"
    make_source(src)
    e = exports.start("pynbd", src)
    m = mount(e.uri, "-o", "direct_io,kernel_cache", "-o", "allow_other")
    run("cmp", m.path, str(src))
    assert "allow_other" in Path("/proc/self/mountinfo").read_text().split(
        str(m.mountpoint), 1)[1].splitlines()[0]
    bad = mount(e.uri, "-o", "no_such_option", wait=False)
    assert bad.wait() == 1
    assert "could not mount" in bad.stderr and "Traceback" not in bad.stderr
    assert not is_mounted(bad.mountpoint)


def _read_ahead_kb(path: str) -> int:
    dev = os.stat(path).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
               .read_text())


def test_readahead_is_set_on_the_mount(exports: Exports, mount: Mounter) -> None:
    e = exports.start("pynbd", size=8 * MiB)
    assert _read_ahead_kb(mount(e.uri).path) == 4096
    assert _read_ahead_kb(mount(e.uri, "--readahead", "1M").path) == 1024


def test_tls_export_over_tcp(tmp_path: Path, mount: Mounter) -> None:
    """nbds:// to nbdkit --tls=require on loopback TCP, certificates from the URI."""
    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    src = tmp_path / "source.img"
    make_source(src)
    s = start_nbdkit(tmp_path / "tls", "file", [str(src)], transport="tcp", tls_dir=pki)
    try:
        uri = s.uri()
        assert uri.startswith("nbds://127.0.0.1:")
        m = mount(uri)
        run("cmp", m.path, str(src))
        run("dd", "if=/dev/zero", f"of={m.path}", "bs=64k", "count=1", "conv=notrunc,fsync",
            "status=none")
        assert m.signal(signal.SIGTERM) == 0
    finally:
        s.stop()
    with open(src, "rb") as f:
        assert f.read(65536) == bytes(65536)


def test_server_error_replies_reach_the_program_and_the_mount_stays(
        tmp_path: Path, exports: Exports, mount: Mounter) -> None:
    """nbdkit's error filter fails requests while a file exists: the program sees the
    errno (EIO for reads, ENOSPC for writes), the mount keeps working afterwards."""
    inject = tmp_path / "inject"
    e = exports.start("nbdkit", filters=("error",), params=(
        "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={inject}",
        "error-pwrite=ENOSPC", "error-pwrite-rate=100%", f"error-pwrite-file={inject}"))
    m = mount(e.uri)
    fd = os.open(m.path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # O_DIRECT wants aligned memory
    try:
        assert os.preadv(fd, [buf], 0) == 4096
        inject.touch()
        with pytest.raises(OSError) as ei:
            os.preadv(fd, [buf], 4096)
        assert ei.value.errno == errno.EIO
        buf[:4] = b"abcd"
        with pytest.raises(OSError) as ei:
            os.pwritev(fd, [buf], 8192)
        assert ei.value.errno == errno.ENOSPC
        inject.unlink()
        assert os.pwritev(fd, [buf], 8192) == 4096
        assert os.preadv(fd, [buf], 4096) == 4096
    finally:
        os.close(fd)
        buf.close()
    assert is_mounted(m.mountpoint) and m.proc.poll() is None
    assert nbd_read(e.uri, 8192, 4) == b"abcd"
    assert m.signal(signal.SIGTERM) == 0


def test_single_threaded_mode(tmp_path: Path, exports: Exports, mount: Mounter) -> None:
    """-s: libfuse serves on the main thread; stopping still works both ways."""
    src = tmp_path / "source.img"
    make_source(src)
    e = exports.start("pynbd", src)
    m = mount(e.uri, "-s")
    run("cmp", m.path, str(src))
    assert m.signal(signal.SIGTERM) == 0
    assert not is_mounted(m.mountpoint)
    m = mount(e.uri, "-s", "--connections", "1")
    run("cmp", m.path, str(src))
    e.stop()  # idle: noticed by the watch thread, which wakes libfuse's loop
    _assert_lost_and_unmounted(m)


def test_reconnect_keeps_the_mount_across_a_server_restart(tmp_path: Path,
                                                           mount: Mounter) -> None:
    """--reconnect: the server is killed with a reader blocked in the mount; a new
    server on the same socket answers it with the right bytes, the mount stays, and
    writes after it reach the image. Without a server for longer than --reconnect the
    mount ends as usual."""
    image = tmp_path / "disk.img"
    data = make_source(image)
    sock = free_unix_path(tmp_path, "re.sock")

    def start() -> PynbdServer:  # one process: SIGKILL takes every connection down
        return PynbdServer(["--workers", "1", "--socket", sock, str(image)], cwd=tmp_path)

    srv = start()
    try:
        m = mount(srv.uri, "--reconnect", "120", "--connections", "2")
        first = _dd_read(m.path, 0)
        assert first.wait(TIMEOUT) == 0
        os.kill(srv.pid, signal.SIGKILL)
        srv.proc.wait(TIMEOUT)
        reader = subprocess.Popen(["dd", f"if={m.path}", "of=/dev/stdout", "bs=1M",
                                   "count=1", "skip=7", "iflag=direct", "status=none"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert wait_until(lambda: _blocked_in_fuse(reader.pid), TIMEOUT)
    finally:
        srv.stop()
    srv = start()
    try:
        out, err = reader.communicate(timeout=TIMEOUT * 3)
        assert reader.returncode == 0, err
        assert out == data[7 * MiB:8 * MiB]
        assert is_mounted(m.mountpoint)
        with open(m.path, "r+b") as f:
            f.seek(3 * MiB)
            f.write(b"\x42" * 4096)
            f.flush()
            os.fsync(f.fileno())
        assert image.read_bytes()[3 * MiB:3 * MiB + 4096] == b"\x42" * 4096
        assert "reconnected to the NBD server" in m.stderr, m.stderr
    finally:
        srv.stop()
    # gone for good: after --reconnect seconds the mount ends (here: 120 s would be
    # long; a second mount with a short window shows it)
    m.signal(signal.SIGTERM)
    srv = start()
    m2 = mount(srv.uri, "--reconnect", "1")
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(TIMEOUT)
    try:
        _assert_lost_and_unmounted(m2)
        assert "no new connection within 1 s" in m2.stderr, m2.stderr
    finally:
        srv.stop()
