"""Bad plugins and bad parameters (tests/plugins/testplugins/broken.py).

At startup (a plugin that cannot be loaded or opened, a missing, unknown or bad
parameter, an API version from the future): a clear message on stderr, exit status 2,
no Python traceback. While serving (a method raising something other than OSError, a
wrong return type): EIO for that request only; the connection and the server keep
working, and the server log says what happened in one line.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import nbd
import pytest

from tests.plugins.conftest import EXAMPLES, TESTPLUGINS, serve_fails
from tests.plugins.testplugins.broken import BAD
from tests.server.rawnbd import (
    CMD_BS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZERO,
    Raw,
    healthy,
)
from tests.support.pynbd_server import PynbdServer, ServerFactory, wait_until

BROKEN = f"python:{TESTPLUGINS / 'broken.py'}"
RECORDER = f"python:{TESTPLUGINS / 'recorder.py'}"
NBD_EIO = 5


def startup_error(p_stderr: str, returncode: int, *expected: str) -> None:
    assert returncode == 2, p_stderr
    for e in expected:
        assert e in p_stderr, p_stderr
    assert "Traceback" not in p_stderr, p_stderr
    assert len(p_stderr.strip().splitlines()) <= 3, p_stderr


# --- at startup ---------------------------------------------------------------------------


@pytest.mark.parametrize("args,expected", [
    ([f"{BROKEN}:InitRaises"], ["python plugin InitRaises failed to open",
                                "RuntimeError: the disk is on fire"]),
    ([f"{BROKEN}:TooNew"], ["written for plugin API version 99",
                            "implements version 1"]),
    ([f"{BROKEN}:Raises"], ["Raises: parameter 'method' is required", "which method fails"]),
    ([f"{BROKEN}:Raises", "method=pwrite", "colour=red"],
     ["Raises: unknown parameter 'colour' (known: blocking, exc, method)"]),
    ([f"{RECORDER}:Recorder", "record=/dev/null", "sleep=slow"],
     ["Recorder: sleep='slow': could not convert string to float"]),
    ([f"{RECORDER}:Recorder", "record=/dev/null", "size=12Q"], ["size='12Q': invalid size"]),
    ([f"{RECORDER}:Recorder", "record"], ["expected KEY=VALUE, got 'record'"]),
    ([f"{BROKEN}:NotAnInt"], ["NotAnInt", "size"]),
    ([f"{BROKEN}:NegativeSize"], ["NegativeSize", "size"]),
    ([BROKEN], ["defines several backends", "name one, e.g. python:"]),
    ([f"{BROKEN}:Nope"], ["Nope is not a pynbd.backends.Backend subclass"]),
    ([f"{BROKEN}:BAD"], ["BAD is not a pynbd.backends.Backend subclass"]),
    (["python:/nonexistent/plugin.py"], ["python plugin /nonexistent/plugin.py: no such file"]),
    (["python:no_such_module_here"], ["no module named 'no_such_module_here'"]),
    (["python:"], ["python: needs a plugin"]),
])
def test_startup_errors(args: list[str], expected: list[str]) -> None:
    p = serve_fails(*args)
    startup_error(p.stderr, p.returncode, *expected)


@pytest.mark.parametrize("body,expected", [
    ("def broken(:\n", ["syntax error"]),
    ("import no_such_dependency_xyz\n", ["importing it failed",
                                         "No module named 'no_such_dependency_xyz'"]),
    ("raise RuntimeError('plugin refuses to load')\n", ["RuntimeError: plugin refuses to load"]),
    ("X = 1\n", ["defines no pynbd.backends.Backend subclass"]),
])
def test_plugin_module_errors(tmp_path: Path, body: str, expected: list[str]) -> None:
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(body)
    p = serve_fails(f"python:{plugin}")
    startup_error(p.stderr, p.returncode, *expected)


def test_params_for_a_backend_that_takes_none() -> None:
    p = serve_fails("memory:1M", "size=2M")
    startup_error(p.stderr, p.returncode, "memory backend: unknown parameter 'size'")


# --- while serving ------------------------------------------------------------------------


def connect(srv: PynbdServer) -> Raw:
    return Raw(("127.0.0.1", srv.port)).connect(meta=True)


def error_lines(srv: PynbdServer, word: str) -> list[str]:
    return [line for line in srv.stderr.splitlines() if " ERROR " in line and word in line]


REQUESTS = {  # method -> the request that makes it fail (at offset BAD)
    "pread_into": (CMD_READ, 4096),
    "pwrite": (CMD_WRITE, 4096),
    "trim": (CMD_TRIM, 4096),
    "zero": (CMD_ZERO, 4096),
    "cache": (CMD_CACHE, 4096),
    "extents": (CMD_BS, 4096),
    "flush": (CMD_FLUSH, 0),
}


def request(c: Raw, cmd: int, offset: int, length: int, cookie: int = 7) -> tuple[int, bytes]:
    payload = bytes([cookie % 256]) * length if cmd == CMD_WRITE else b""
    return c.call(cmd, offset if cmd != CMD_FLUSH else 0, length, payload=payload,
                  cookie=cookie)


@pytest.mark.parametrize("blocking", ["true", "false"])
@pytest.mark.parametrize("method", list(REQUESTS))
def test_method_raising_a_bug_is_eio_and_the_server_goes_on(
        serve: ServerFactory, method: str, blocking: str) -> None:
    srv = serve("--workers", "1", f"{BROKEN}:Raises", f"method={method}", "exc=ValueError",
                f"blocking={blocking}")
    c = connect(srv)
    cmd, length = REQUESTS[method]
    for i in range(3):  # the same bug three times
        err, _ = request(c, cmd, BAD, length, cookie=10 + i)
        assert err == NBD_EIO
        # the connection still works: the next request succeeds
        assert c.call(CMD_WRITE, 8192, 4096, payload=b"k" * 4096)[0] == 0
        assert c.call(CMD_READ, 8192, 4096) == (0, b"k" * 4096)
    # other connections too
    healthy(("127.0.0.1", srv.port), offset=4 * 4096)
    c.sock.close()
    assert srv.alive()
    srv.stop()  # all of its log read
    # one line in the log says what happened, however often it happened
    lines = error_lines(srv, "ValueError")
    assert len(lines) == 1, srv.stderr
    assert re.search(r"the backend raised ValueError in \w+: bug in " + method, lines[0]), lines


@pytest.mark.parametrize("exc", ["SystemExit", "KeyboardInterrupt", "RecursionError"])
@pytest.mark.parametrize("blocking", ["true", "false"])
def test_even_system_exit_from_a_plugin_is_only_eio(serve: ServerFactory, exc: str,
                                                     blocking: str) -> None:
    srv = serve("--workers", "1", f"{BROKEN}:Raises", "method=pread_into", f"exc={exc}",
                f"blocking={blocking}")
    c = connect(srv)
    assert c.call(CMD_READ, BAD, 4096)[0] == NBD_EIO
    assert c.call(CMD_READ, 0, 4096) == (0, bytes(4096))
    healthy(("127.0.0.1", srv.port))
    c.disc()
    assert srv.alive()


@pytest.mark.parametrize("code", ["ENOSPC", "EPERM", "EIO", "EINVAL", "ENOTSUP"])
def test_oserror_errno_reaches_the_client(serve: ServerFactory, code: str) -> None:
    srv = serve("--workers", "1", f"{BROKEN}:Raises", "method=pwrite", f"exc={code}")
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.connect_uri(srv.uri)
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x" * 4096, BAD)
    want = {"ENOTSUP": errno.EOPNOTSUPP}.get(code, getattr(errno, code))
    assert ei.value.errnum == want
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    srv.stop()
    # an errno is the plugin telling the client: a warning, not a bug report
    assert not error_lines(srv, "pwrite"), srv.stderr


@pytest.mark.parametrize("blocking", ["true", "false"])
@pytest.mark.parametrize("kind", ["none", "garbage", "empty", "zero", "negative", "tuples",
                                  "float", "flags", "generator"])
def test_extents_returning_garbage(serve: ServerFactory, kind: str, blocking: str) -> None:
    srv = serve("--workers", "1", f"{BROKEN}:BadExtents", f"kind={kind}",
                f"blocking={blocking}")
    c = connect(srv)
    assert c.call(CMD_WRITE, 0, 4096, payload=b"d" * 4096)[0] == 0
    err, _ = c.call(CMD_BS, 0, 65536)
    if kind != "generator":  # an iterable of good extents is fine
        assert err == NBD_EIO
    # reads, which consult extents to find holes, still return the data
    assert c.call(CMD_READ, 0, 4096) == (0, b"d" * 4096)
    big = c.call(CMD_READ, 0, 1 << 20)
    assert big == (0, b"d" * 4096 + bytes((1 << 20) - 4096))
    assert c.call(CMD_BS, 0, 65536)[0] == err  # and the connection still works
    c.disc()
    healthy(("127.0.0.1", srv.port))


def test_big_reads_raising_do_not_leak_or_break(serve: ServerFactory) -> None:
    """The large-read path (pooled buffers, inline) with a plugin bug."""
    srv = serve("--workers", "1", f"{BROKEN}:Raises", "method=pread_into", "blocking=false")
    c = connect(srv)
    for i in range(50):
        assert c.call(CMD_READ, BAD, 1 << 20, cookie=i)[0] == NBD_EIO
        assert c.call(CMD_READ, BAD + (1 << 20), 1 << 20, cookie=i)[0] == 0
    c.disc()
    srv.stop()
    assert len(error_lines(srv, "ValueError")) == 1


def test_open_connection_raising_drops_only_that_client(serve: ServerFactory) -> None:
    srv = serve("--workers", "1", f"{BROKEN}:OpenConnectionRaises")
    for _ in range(3):
        c = Raw(("127.0.0.1", srv.port))
        c.greeting()
        try:
            c.go()
            # the plugin refused after the handshake: the server hangs up
            c.sock.settimeout(10)
            assert c.sock.recv(1) == b""
        except (TimeoutError, ConnectionError, AssertionError) as exc:
            raise AssertionError(f"not a clean hang-up: {exc!r}") from exc
        c.close()
    assert srv.alive()
    srv.stop()
    lines = error_lines(srv, "open_connection")
    assert lines and "RuntimeError: no more connections today" in lines[0]


def test_close_connection_raising_is_logged(serve: ServerFactory) -> None:
    srv = serve("--workers", "1", f"{BROKEN}:CloseConnectionRaises")
    for i in range(3):
        healthy(("127.0.0.1", srv.port), offset=i * 4096)
    assert wait_until(lambda: len(error_lines(srv, "close_connection")) == 3, timeout=10)
    assert "RuntimeError: cannot close" in error_lines(srv, "close_connection")[0]
    assert srv.alive()


@pytest.mark.parametrize("args,expected", [
    (["--filter", "nosuchfilter"], ["unknown filter 'nosuchfilter' (known: "]),
    (["--filter", "bad filter spec"], ["expected NAME[:KEY=VALUE,...]"]),
])
def test_unknown_filter_is_a_startup_error(args: list[str], expected: list[str]) -> None:
    p = serve_fails(f"python:{EXAMPLES / 'ramdisk.py'}",
                    "size=1M", *args)
    startup_error(p.stderr, p.returncode, *expected)
