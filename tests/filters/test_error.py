"""The error filter: qemu-io and libnbd see the chosen errno on the chosen operation
only; a rate with a seed; a trigger file; the failing flush of a safe close (the
failing-flush backend of tests/security/test_limits.py, now a filter); bad
parameters."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import nbd
import pytest

from pynbd.backends.base import BackendError, ConfigError
from pynbd.backends.loader import FilterSpec, open_filter
from pynbd.backends.memory import MemoryBackend
from pynbd.filters.error import ErrorFilter, parse_errno, parse_probability
from pynbd.filters.opsfilter import parse_ops
from tests.filters.ops_support import (
    connect,
    errno_of,
    need,
    no_traceback,
    ops_serve,
    qemu_io,
    serve_refused,
)
from tests.security.test_limits import x_close_session

__all__ = ["ops_serve"]

MiB = 1024 * 1024


def error_filter(**params: str) -> ErrorFilter:
    f = open_filter(FilterSpec("error", dict(params)), MemoryBackend(4 * MiB))
    assert isinstance(f, ErrorFilter)
    return f


def calls(f: ErrorFilter) -> dict[str, object]:
    """Every operation once, through the filter; op -> None or the errno raised."""
    buf = memoryview(bytearray(4096))
    ops = {
        "read": lambda: f.pread_into(buf, 0),
        "write": lambda: f.pwrite(b"x" * 512, 0),
        "trim": lambda: f.trim(0, 4096),
        "zero": lambda: f.zero(0, 4096),
        "flush": f.flush,
        "cache": lambda: f.cache(0, 4096),
        "extents": lambda: f.extents(0, 4096),
    }
    out: dict[str, object] = {}
    for op, call in ops.items():
        try:
            call()
            out[op] = None
        except BackendError as exc:
            out[op] = exc.errno
    return out


# --- in the filter ----------------------------------------------------------------------

@pytest.mark.parametrize("ops", ["read", "write", "trim", "zero", "flush", "cache", "extents",
                                 "read,flush", "read+flush", "pwrite+zero", "all"])
def test_only_chosen_operations_fail(ops: str) -> None:
    f = error_filter(ops=ops, error="ENOSPC")
    chosen = parse_ops(ops)
    got = calls(f)
    assert {op for op, e in got.items() if e is not None} == chosen
    assert all(e == errno.ENOSPC for e in got.values() if e is not None)
    assert {op for op, n in f.stats()["injected"].items() if n} == chosen


def test_seeded_rate_is_reproducible() -> None:
    runs = []
    for _ in range(2):
        f = error_filter(ops="read", rate="0.25", seed="7")
        seq = []
        for _ in range(400):
            try:
                f.pread_into(memoryview(bytearray(512)), 0)
                seq.append(0)
            except BackendError:
                seq.append(1)
        runs.append(seq)
    assert runs[0] == runs[1]
    assert 40 < sum(runs[0]) < 160  # about a quarter (fixed by the seed)


def test_rate_zero_never_fails_and_percent_form() -> None:
    f = error_filter(rate="0")
    assert all(e is None for e in calls(f).values())
    assert parse_probability("10%") == pytest.approx(0.1)
    assert parse_probability("1") == 1.0


def test_trigger_file(tmp_path: Path) -> None:
    trigger = tmp_path / "inject"
    f = error_filter(ops="write", file=str(trigger))
    f.pwrite(b"a", 0)
    trigger.touch()
    with pytest.raises(BackendError) as exc:
        f.pwrite(b"a", 0)
    assert exc.value.errno == errno.EIO
    trigger.unlink()
    f.pwrite(b"a", 0)


def test_run_time_change() -> None:
    f = error_filter(ops="write")
    f.configure({"ops": "flush", "error": "EPERM"})
    got = calls(f)
    assert got["flush"] == errno.EPERM and got["write"] is None
    with pytest.raises(ConfigError):
        f.configure({"ops": "flush", "error": "EWHAT"})
    assert calls(f)["flush"] == errno.EPERM  # unchanged


@pytest.mark.parametrize("name", ["EIO", "eperm", "ENOSPC", "EINVAL", "ENOTSUP", "ESHUTDOWN",
                                  "ENOMEM", "EOVERFLOW", "EROFS"])
def test_parse_errno(name: str) -> None:
    assert parse_errno(name) == getattr(errno, name.upper())


@pytest.mark.parametrize("name", ["ENOENT", "EAGAIN", "5", "", "EIOX"])
def test_parse_errno_refuses_what_nbd_cannot_carry(name: str) -> None:
    with pytest.raises(ValueError, match="not an errno NBD can carry"):
        parse_errno(name)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "x", "150%", ""])
def test_parse_probability_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_probability(text)


# --- real clients: the chosen errno on the chosen operation only ------------------------------

def libnbd_ops(h: nbd.NBD) -> dict[str, str | None]:
    """Each operation once with libnbd; op -> None or the errno name it failed with."""
    buf = bytearray(4096)
    ops = {
        "read": lambda: h.pread(4096, 0),
        "write": lambda: h.pwrite(bytes(buf), 0),
        "trim": lambda: h.trim(4096, 8192),
        "zero": lambda: h.zero(4096, 16384),
        "flush": h.flush,
        "cache": lambda: h.cache(4096, 0),
        "extents": lambda: h.block_status(65536, 0, lambda *a: 0),
    }
    out: dict[str, str | None] = {}
    for op, call in ops.items():
        try:
            call()
            out[op] = None
        except nbd.Error as exc:
            out[op] = errno_of(exc)
    return out


@pytest.mark.parametrize(("err", "op", "workers"), [
    ("ENOSPC", "write", "1"), ("EPERM", "flush", "2"), ("EIO", "read", "1"),
    ("EINVAL", "trim", "2"), ("ENOSPC", "zero", "1"), ("EIO", "cache", "1"),
    ("EOVERFLOW", "extents", "2")])
def test_libnbd_sees_the_errno_on_the_chosen_operation_only(ops_serve, err: str, op: str,
                                                          workers: str) -> None:
    s = ops_serve("--workers", workers, "memory:4M", "--filter", f"error:error={err},ops={op}")
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(s.uri)
    got = libnbd_ops(h)
    assert got == {o: (err if o == op else None) for o in got}, got
    # (before the disconnect: the server's own flush at disconnect would count too)
    assert s.filter_stats("error")["injected"][op] == 1
    h.shutdown()
    assert no_traceback(s.log())


QEMU_CASES = {
    # op: (qemu-io commands that use it, what qemu-io says when it fails); qemu skips a
    # flush when nothing was written since the last one
    "write": (["write -P 0x11 0 4k"], "write failed"),
    "read": (["read 0 4k"], "read failed"),
    "flush": (["write -P 0x22 4k 4k", "flush"], "flush failed"),
    "trim": (["discard 0 64k"], "discard failed"),
    "zero": (["write -z 0 64k"], "write failed"),
}


@pytest.mark.parametrize(("err", "text", "op"), [
    ("ENOSPC", "No space left on device", "write"),
    ("EIO", "Input/output error", "read"),
    ("EPERM", "Operation not permitted", "flush"),
    ("EINVAL", "Invalid argument", "trim"),
    ("ENOSPC", "No space left on device", "zero"),
])
def test_qemu_io_sees_the_errno_on_the_chosen_operation_only(ops_serve, err: str, text: str,
                                                             op: str) -> None:
    s = ops_serve("--workers", "2", "memory:4M", "--filter", f"error:error={err},ops={op}")
    cmds, failed = QEMU_CASES[op]
    q = qemu_io(s.uri, *cmds)
    out = q.stdout + q.stderr
    if op == "flush":
        # qemu-io's flush command prints nothing when it fails: only its exit status
        # says so (the write before it succeeded)
        assert q.returncode != 0 and "wrote 4096/4096" in out, out
        assert s.filter_stats("error")["injected"]["flush"] >= 1
    else:
        assert failed in out and text in out, out
    for other, (ocmd, ofailed) in QEMU_CASES.items():
        if other == op:
            continue
        if {other, op} == {"write", "flush"}:
            continue  # qemu-io writes before it flushes, flushes what it wrote on close
        q = qemu_io(s.uri, *ocmd)
        out = q.stdout + q.stderr
        assert q.returncode == 0 and ofailed not in out and "error" not in out.lower(), \
            f"{other}: {out}"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_trigger_file_end_to_end(ops_serve, tmp_path: Path, workers: str) -> None:
    trigger = tmp_path / "inject-now"
    s = ops_serve("--workers", workers, "memory:4M", "--filter",
                  f"error:ops=read,error=EIO,file={trigger}")
    h = connect(s.uri)
    assert h.pread(4096, 0) == bytes(4096)
    trigger.touch()
    with pytest.raises(nbd.Error) as exc:
        h.pread(4096, 0)
    assert errno_of(exc.value) == "EIO"
    h.pwrite(b"y" * 4096, 0)  # writes are not chosen
    trigger.unlink()
    assert h.pread(4096, 0) == b"y" * 4096
    h.shutdown()


def test_seeded_rate_end_to_end(ops_serve) -> None:
    s = ops_serve("--workers", "2", "memory:4M", "--filter",
                  "error:ops=read,rate=50%,seed=3")
    h = connect(s.uri)
    failed = 0
    for i in range(60):
        try:
            h.pread(512, i * 512)
        except nbd.Error as exc:
            assert errno_of(exc) == "EIO"
            failed += 1
    h.pwrite(b"w" * 512, 0)  # never fails
    h.flush()
    assert 0 < failed < 60
    assert s.filter_stats("error")["injected"]["read"] == failed
    h.shutdown()


def test_nbdcopy_reports_injected_write_error(ops_serve, tmp_path: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(b"\x01" * 4 * MiB)
    s = ops_serve("--workers", "2", "memory:4M", "--filter", "error:ops=write,error=ENOSPC")
    p = subprocess.run(["nbdcopy", str(src), s.uri], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "No space left on device" in p.stderr, p.stderr
    # the server still serves everyone
    h = connect(s.uri)
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


# --- the failing flush (tests/security/test_limits.py's FailingFlushBackend) -------------------

@pytest.mark.parametrize(("workers", "err", "wire"), [("1", "EIO", 5), ("2", "EIO", 5),
                                                      ("2", "ENOSPC", 28)])
def test_safe_close_reports_failed_flush(ops_serve, workers: str, err: str, wire: int) -> None:
    s = ops_serve("--workers", workers, "memory:1M", "--filter",
                  f"error:ops=flush,error={err}")
    got, rest = x_close_session(s.srv.port)
    assert got == wire and rest == b""  # the close was not safe, and says why
    # a failed disconnect flush leaves the server serving
    h = connect(s.uri)
    h.pwrite(b"q" * 512, 0)
    assert h.pread(512, 0) == b"q" * 512
    h.shutdown()
    assert s.srv.alive()


def test_safe_close_without_injected_error_still_clean(ops_serve) -> None:
    s = ops_serve("--workers", "1", "memory:1M", "--filter", "error:ops=write,rate=0")
    got, rest = x_close_session(s.srv.port)
    assert got == 0 and rest == b""


# --- bad parameters ------------------------------------------------------------------------

@pytest.mark.parametrize(("flt", "message"), [
    ("error:error=ENOENT", "not an errno NBD can carry"),
    ("error:rate=1.5", "expected a probability"),
    ("error:ops=write+frob", "unknown operation 'frob'"),
    ("error:seed=x", "seed='x'"),
    ("error:errno=EIO", "unknown parameter 'errno'"),
])
def test_serve_refuses_bad_error_parameters(flt: str, message: str) -> None:
    p = serve_refused("memory:1M", "--filter", flt)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "filter error" in p.stderr, p.stderr
    assert no_traceback(p.stderr), p.stderr


def test_unknown_filter_refused() -> None:
    p = serve_refused("memory:1M", "--filter", "eror:ops=write")
    assert p.returncode == 2
    assert "unknown filter 'eror'" in p.stderr and "error" in p.stderr
    assert no_traceback(p.stderr), p.stderr


def test_toml_config_lists_operations_with_commas(ops_serve, tmp_path: Path) -> None:
    """In --filter, commas separate parameters (ops=read+write); a TOML table takes the
    list as written. Two exports, one filtered, over one server."""
    cfg = tmp_path / "pynbd.toml"
    cfg.write_text(
        '[[export]]\nname = "bad"\ntarget = "memory:1M"\n'
        'filters = [{name = "error", ops = "read,write", error = "EPERM"}, "stats"]\n'
        '[[export]]\nname = "good"\ntarget = "memory:1M"\n')
    s = ops_serve("--workers", "2", "--config", str(cfg))
    base = s.uri.rsplit("/", 1)[0]
    bad = connect(base + "/bad")
    good = connect(base + "/good")
    for h, fails in ((bad, True), (good, False)):
        for call in (lambda h=h: h.pread(512, 0), lambda h=h: h.pwrite(b"g" * 512, 0)):
            if fails:
                with pytest.raises(nbd.Error) as exc:
                    call()
                assert errno_of(exc.value) == "EPERM"
            else:
                call()
    bad.flush()  # not chosen
    assert s.export("bad")["stack"][:2] == ["error:ops=read,write,error=EPERM", "stats"]
    assert s.export("bad")["filters"]["stats"]["ops"]["read"]["requests"] == 0  # below error
    bad.shutdown()
    good.shutdown()


def test_run_time_change_reaches_every_worker(ops_serve) -> None:
    s = ops_serve("--workers", "2", "memory:1M", "--filter", "error:ops=write,error=ENOSPC")
    hs = [connect(s.uri), connect(s.uri)]
    assert {c["worker"] for c in s.status()["client_list"]} == {0, 1}
    for h in hs:
        with pytest.raises(nbd.Error):
            h.pwrite(b"e" * 512, 0)
    r = s.configure("error", "ops=read+flush", "error=EPERM")
    assert r.returncode == 0, r.stderr
    for h in hs:
        h.pwrite(b"e" * 512, 0)
        with pytest.raises(nbd.Error) as exc:
            h.pread(512, 0)
        assert errno_of(exc.value) == "EPERM"
    r = s.configure("error", "error=EBADF")
    assert r.returncode == 2 and "not an errno NBD can carry" in r.stderr
    assert s.filter_stats("error")["error"] == "EPERM"
    r = s.configure("error", "rate=0")
    assert r.returncode == 0
    for h in hs:
        assert h.pread(512, 0) == b"e" * 512
        h.shutdown()
