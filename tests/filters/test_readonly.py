"""The ``readonly`` filter: the export is read-only whatever the plugin says.

Clients learn it from the handshake (libnbd, nbdinfo, qemu-io refuse to open it for
writing); a client that writes anyway (a raw socket) gets EPERM for WRITE, TRIM and
WRITE_ZEROES; reads, block status, CACHE and FLUSH work; the file never changes.
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import nbd
import pytest

from pynbd.backends import BackendError, open_backend, parse_filter
from tests.filters.helpers import (
    block_status,
    make_base,
    nbdcopy_to,
    read_all,
    serve_fails,
    sha256,
    strict,
)
from tests.server.rawnbd import (
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZERO,
    EPERM,
    F_FUA,
    Raw,
)
from tests.support.pynbd_server import ServerFactory

MiB = 1024 * 1024


@pytest.mark.parametrize("workers", [1, 2])
def test_advertised_read_only(serve: ServerFactory, tmp_path: Path, workers: int) -> None:
    base = tmp_path / "base.img"
    data = make_base(base, 2 * MiB)
    before = sha256(base)
    srv = serve(str(base), "--workers", str(workers), "--filter", "readonly")
    info = json.loads(subprocess.run(["nbdinfo", "--json", srv.uri], capture_output=True,
                                     text=True, check=True, timeout=60).stdout)
    exp = info["exports"][0]
    assert exp["is_read_only"] is True
    assert exp["can_trim"] is False and exp["can_zero"] is False and exp["can_fua"] is False
    assert exp["can_flush"] is True and exp["can_cache"] is True

    h = strict(srv.uri)
    assert h.is_read_only()
    assert read_all(h, len(data)) == data
    assert block_status(h, 0, len(data)) == [(len(data), 0)]
    h.cache(MiB, 0)
    h.flush()
    # libnbd refuses to send a write to a read-only export (strict mode)
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x", 0)
    assert ei.value.errno == "EPERM"
    h.shutdown()

    # qemu-io will not open it for writing, and reads it read-only
    p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", srv.uri],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Permission denied" in p.stderr + p.stdout
    p = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", srv.uri],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert nbdcopy_to(srv.uri, tmp_path / "copy.img") == data
    srv.stop()
    assert sha256(base) == before


@pytest.mark.parametrize("workers", [1, 2])
def test_raw_writes_get_eperm(serve: ServerFactory, tmp_path: Path, workers: int) -> None:
    """A client that writes anyway: EPERM for each kind of change, the connection and
    the server carry on, nothing changes."""
    base = tmp_path / "base.img"
    data = make_base(base, MiB)
    before = sha256(base)
    srv = serve(str(base), "--workers", str(workers), "--filter", "readonly")
    for structured in (True, False):
        c = Raw(("127.0.0.1", srv.port)).connect(structured=structured)
        assert c.tflags & 2  # NBD_FLAG_READ_ONLY
        assert c.call(CMD_WRITE, 0, 4, payload=b"evil")[0] == EPERM
        assert c.call(CMD_WRITE, 4096, 4, flags=F_FUA, payload=b"evil")[0] == EPERM
        assert c.call(CMD_TRIM, 0, 4096)[0] == EPERM
        assert c.call(CMD_ZERO, 0, 4096)[0] == EPERM
        err, got = c.call(CMD_READ, 0, 4096)
        assert err == 0 and got == data[:4096]
        assert c.call(CMD_FLUSH)[0] == 0
        assert c.call(CMD_CACHE, 0, 4096)[0] == 0
        c.disc()
    srv.stop()
    assert sha256(base) == before


def test_the_layer_itself_refuses(tmp_path: Path) -> None:
    """The filter's own methods refuse too (for layers above it that call them)."""
    base = tmp_path / "base.img"
    data = make_base(base, 64 * 1024)
    stack = open_backend(str(base), filters=[parse_filter("readonly")])
    try:
        assert stack.read_only
        for call in (lambda: stack.pwrite(b"x", 0), lambda: stack.trim(0, 512),
                     lambda: stack.zero(0, 512)):
            with pytest.raises(BackendError) as ei:
                call()
            assert ei.value.errno == errno.EPERM
        buf = bytearray(100)
        stack.pread_into(memoryview(buf), 10)
        assert bytes(buf) == data[10:110]
    finally:
        stack.close()
    assert base.read_bytes() == data


def test_bad_parameters(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    make_base(base, MiB)
    p = serve_fails(str(base), "--filter", "readonly:really=yes")
    assert "filter readonly: unknown parameter 'really' (known: none)" in p.stderr
