"""How plugins are found: ``python:PATH.py[:CLASS]``, ``python:package.module[:CLASS]``,
a TARGET scheme that an installed package registers in the ``pynbd.backends`` entry-point
group (installed here with ``pip install --target``, and as a bare dist-info directory),
and exports with parameters in the TOML config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbd
import pytest

from tests.plugins.conftest import EXAMPLES, TESTPLUGINS, run, serve_fails
from tests.support.pynbd_server import ServerFactory

MiB = 1024 * 1024

PLUGIN_SOURCE = '''
from pynbd.backends import Backend, BackendError, Param, parse_bool, parse_size


class PatternDisk(Backend):
    """Reads return ``byte`` everywhere until written; writes stay in memory."""

    params = {
        "size": Param("disk size", parse_size),
        "byte": Param("the byte every block starts as", lambda t: int(t, 0), 0),
        "ro": Param("refuse writes", parse_bool, False),
    }
    blocking = False
    multi_process = True  # (each worker its own copy: fine for these tests' one client)

    def __init__(self, size, byte, ro):
        self.size = size
        self.data = bytearray([byte]) * size
        self.read_only = ro
        self.name = f"pattern:{byte:#x}"

    def pread_into(self, buf, offset):
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    def pwrite(self, buf, offset, fua=False):
        self.data[offset:offset + len(buf)] = buf


def open_fill(target, params, read_only):
    """A factory entry point: ``fill:BYTE size=...``: the target text is the byte."""
    if not target:
        from pynbd.backends import ConfigError
        raise ConfigError("fill: needs a byte, e.g. fill:0x5a")
    return PatternDisk.open_target("", {**params, "byte": target}, read_only)
'''


def read_first(uri: str, n: int = 4096) -> bytes:
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.connect_uri(uri)
    try:
        return h.pread(n, 0)
    finally:
        h.shutdown()


def with_path(monkeypatch: pytest.MonkeyPatch, *dirs: Path) -> None:
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*map(str, dirs), *([old] if old else [])]))


# --- python:PATH.py[:CLASS] ------------------------------------------------------------


def test_python_path_relative_and_absolute(serve: ServerFactory, tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "ramdisk.py", tmp_path / "myram.py")
    # relative to the server's working directory (the fixture runs it in tmp_path)
    srv = serve("--workers", "1", "python:myram.py", "size=2M")
    assert read_first(srv.uri) == bytes(4096)
    j = json.loads(run("nbdinfo", "--json", srv.uri).stdout)
    assert j["exports"][0]["export-size"] == 2 * MiB
    srv2 = serve("--workers", "1", f"python:{tmp_path / 'myram.py'}:RamDisk", "size=3M")
    assert json.loads(run("nbdinfo", "--json", srv2.uri).stdout)["exports"][0][
        "export-size"] == 3 * MiB


def test_python_path_with_class_among_several(serve: ServerFactory, tmp_path: Path) -> None:
    srv = serve("--workers", "2", f"python:{TESTPLUGINS / 'recorder.py'}:SerializeRequests",
                f"record={tmp_path / 'rec'}", "size=1M")
    assert read_first(srv.uri) == bytes(4096)


# --- python:package.module[:CLASS] ----------------------------------------------------------


def test_python_module_from_pythonpath(serve: ServerFactory, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "pkgs" / "mydisks"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pattern.py").write_text(PLUGIN_SOURCE)
    with_path(monkeypatch, tmp_path / "pkgs")
    for workers in ("1", "2"):
        srv = serve("--workers", workers, "python:mydisks.pattern", "size=1M", "byte=0x41")
        assert read_first(srv.uri) == b"A" * 4096
        srv = serve("--workers", workers, "python:mydisks.pattern:PatternDisk", "size=1M",
                    "byte=66")
        assert read_first(srv.uri) == b"B" * 4096
        srv.stop()
    p = serve_fails("python:mydisks.pattern:Nope", "size=1M",
                    pythonpath=str(tmp_path / "pkgs"))
    assert p.returncode == 2 and "Nope is not a pynbd.backends.Backend subclass" in p.stderr
    p = serve_fails("python:mydisks.nothere", pythonpath=str(tmp_path / "pkgs"))
    assert p.returncode == 2 and "no module named 'mydisks.nothere'" in p.stderr


# --- entry points: a package adds a TARGET scheme -------------------------------------------


def dist_info_package(site: Path) -> None:
    """What ``pip install`` leaves behind: the package and its dist-info with
    ``entry_points.txt``."""
    (site / "pynbd_pattern").mkdir(parents=True)
    (site / "pynbd_pattern" / "__init__.py").write_text(PLUGIN_SOURCE)
    info = site / "pynbd_pattern-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pynbd-pattern\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[pynbd.backends]\npattern = pynbd_pattern:PatternDisk\n"
        "fill = pynbd_pattern:open_fill\n")


def pip_package(src: Path, site: Path) -> None:
    """Build and install a real package with pip (no network: the venv's setuptools)."""
    (src / "pynbd_pattern").mkdir(parents=True)
    (src / "pynbd_pattern" / "__init__.py").write_text(PLUGIN_SOURCE)
    (src / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "pynbd-pattern"
        version = "1.0"

        [project.entry-points."pynbd.backends"]
        pattern = "pynbd_pattern:PatternDisk"
        fill = "pynbd_pattern:open_fill"

        [tool.setuptools]
        packages = ["pynbd_pattern"]
        """))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index",
                        "--no-build-isolation", "--no-deps", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("how", ["pip", "dist-info"])
def test_entry_point_scheme(serve: ServerFactory, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    site = tmp_path / "site"
    if how == "pip":
        pip_package(tmp_path / "src", site)
    else:
        dist_info_package(site)
    assert list(site.glob("pynbd_pattern-1.0.dist-info/entry_points.txt"))
    with_path(monkeypatch, site)
    for workers in ("1", "2"):
        # a Backend subclass: SCHEME: with parameters
        srv = serve("--workers", workers, "pattern:", "size=2M", "byte=0x5a")
        assert read_first(srv.uri) == b"Z" * 4096
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k",
            srv.uri)
        # a factory: SCHEME:TARGET
        srv = serve("--workers", workers, "fill:0x33", "size=1M")
        assert read_first(srv.uri) == b"3" * 4096
        srv.stop()
    p = serve_fails("pattern:", "size=1M", "byte=zz", pythonpath=str(site))
    assert p.returncode == 2 and "byte='zz'" in p.stderr and "Traceback" not in p.stderr
    p = serve_fails("fill:", "size=1M", pythonpath=str(site))
    assert p.returncode == 2 and "fill: needs a byte" in p.stderr
    p = serve_fails("pattern:something", "size=1M", pythonpath=str(site))
    assert p.returncode == 2 and "takes no target text" in p.stderr


def test_broken_entry_point_is_a_clear_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist_info_package(site)
    (site / "pynbd_pattern-1.0.dist-info" / "entry_points.txt").write_text(
        "[pynbd.backends]\npattern = pynbd_pattern_missing:PatternDisk\n")
    p = serve_fails("pattern:", "size=1M", pythonpath=str(site))
    assert p.returncode == 2
    assert "pynbd.backends entry point 'pattern' (pynbd_pattern_missing:PatternDisk) " \
           "cannot be loaded" in p.stderr
    assert "Traceback" not in p.stderr


# --- the TOML config --------------------------------------------------------------------------


def test_toml_config_with_plugin_params(serve: ServerFactory, tmp_path: Path) -> None:
    chunks = tmp_path / "chunks"
    cfg = tmp_path / "exports.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [server]
        bind = "127.0.0.1"
        port = 0

        [[export]]
        name = "ram"
        target = "python:{EXAMPLES / 'ramdisk.py'}"
        params = {{ size = "8M" }}

        [[export]]
        name = "chunks"
        target = "python:{EXAMPLES / 'chunkdir.py'}"
        params = {{ dir = "{chunks}", size = "16M", chunk = 65536 }}
        description = "chunk files"
        """))
    srv = serve("--workers", "2", "--config", str(cfg), tcp=False)
    lst = json.loads(run("nbdinfo", "--list", "--json", srv.uri).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in lst["exports"]}
    assert sizes == {"ram": 8 * MiB, "chunks": 16 * MiB}
    base = srv.uri.rsplit("/", 1)[0]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x21 64k 64k", f"{base}/chunks")
    assert os.listdir(chunks) and (chunks / f"{1:016x}").read_bytes() == b"\x21" * 65536
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 4k", "-c", "read -P 0x22 0 4k",
        f"{base}/ram")


@pytest.mark.parametrize("params,message", [
    ('{ size = "8M", colour = "red" }', "unknown parameter 'colour'"),
    ("{ }", "parameter 'size' is required"),
    ('{ size = "eight" }', "size='eight': invalid size"),
    ('{ size = ["8M"] }', "size must be a string or a number"),
    ('"size=8M"', "must be a table of KEY = VALUE"),
])
def test_toml_config_bad_params(tmp_path: Path, params: str, message: str) -> None:
    cfg = tmp_path / "exports.toml"
    cfg.write_text(f'[[export]]\nname = "ram"\ntarget = "python:{EXAMPLES / "ramdisk.py"}"\n'
                   f"params = {params}\n")
    p = serve_fails("--config", str(cfg))
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
