"""``pynbd info`` (nbdinfo conventions) against real servers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from pynbd.cli import info
from tests.client.conftest import IMAGE_DATA, IMAGE_SIZE, Servers

pytestmark = pytest.mark.interop


def pynbd_info(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pynbd.cli.info", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_register_adds_parser() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    info.register(sub)
    args = p.parse_args(["info", "--json", "nbd://localhost/x"])
    assert args.func is info.handler and args.json


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "nbd-server", "pynbd"])
def test_info_human_and_json(servers: Servers, kind: str) -> None:
    srv = servers.start(kind, "unix")
    r = pynbd_info(srv.uri())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("protocol: newstyle-fixed without TLS")
    kv = dict(line.strip().split(": ", 1) for line in lines[1:] if ": " in line)
    assert kv["size"] == str(IMAGE_SIZE)
    assert kv["is_read_only"] == "false"
    r = pynbd_info("--json", srv.uri())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["size"] == IMAGE_SIZE
    assert doc["exports"][0]["size"] == IMAGE_SIZE
    assert doc["exports"][0]["export-name"] == srv.export
    r = pynbd_info("--size", srv.uri())
    assert r.stdout.strip() == str(IMAGE_SIZE)


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "pynbd"])
def test_info_map(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    r = pynbd_info("--map", "--json", srv.uri())
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["offset"] == 0
    assert sum(x["length"] for x in rows) == IMAGE_SIZE
    for off, _blob in IMAGE_DATA:
        covering = [x for x in rows if x["offset"] <= off < x["offset"] + x["length"]]
        assert covering and covering[0]["description"] == "data"
    r = pynbd_info("--map", srv.uri())
    assert r.returncode == 0 and "data" in r.stdout
    r = pynbd_info("--map=qemu:nonexistent", srv.uri())
    assert r.returncode == 1


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "nbd-server", "pynbd"])
def test_info_can_is_exit_codes(servers: Servers, kind: str) -> None:
    srv = servers.start(kind, read_only=True)
    assert pynbd_info("--is", "read-only", srv.uri()).returncode == 0
    assert pynbd_info("--can", "write", srv.uri()).returncode == 2
    assert pynbd_info("--is", "tls", srv.uri()).returncode == 2
    assert pynbd_info("--can", "connect", srv.uri()).returncode == 0
    expect_sc = 0 if kind == "pynbd" else 2
    assert pynbd_info("--can", "safe-close", srv.uri()).returncode == expect_sc
    expect_bs = 2 if kind == "nbd-server" else 0
    assert pynbd_info("--can", "block-status", srv.uri()).returncode == expect_bs
    assert pynbd_info("--can", "bogus-feature", srv.uri()).returncode == 1


def test_info_list(servers: Servers) -> None:
    srv = servers.start("qemu-nbd", export="disk0")
    r = pynbd_info("--list", "--json", srv.uri())
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [e["export-name"] for e in doc["exports"]] == ["disk0"]
    assert doc["exports"][0]["size"] == IMAGE_SIZE
    r = pynbd_info("--list", srv.uri())
    assert 'export: "disk0"' in r.stdout


def test_info_tls(servers: Servers, pki) -> None:  # type: ignore[no-untyped-def]
    srv = servers.start("nbdkit", tls_dir=pki)
    r = pynbd_info("--json", srv.uri())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["TLS"] is True
    assert pynbd_info("--is", "tls", srv.uri()).returncode == 0


def test_info_errors() -> None:
    r = pynbd_info("nbd://127.0.0.1:1/")
    assert r.returncode == 1 and "pynbd info" in r.stderr
    r = pynbd_info("ftp://x/")
    assert r.returncode == 1 and "scheme" in r.stderr
