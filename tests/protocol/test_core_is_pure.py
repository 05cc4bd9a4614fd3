"""The NBD protocol cores are sans-I/O: no sockets, event loop, threads or clocks, and
they do not reach up into the drivers (client, server) that use them."""

from __future__ import annotations

import ast
from pathlib import Path

import pynbd.protocol

FORBIDDEN = {"asyncio", "socket", "selectors", "select", "threading", "time", "ssl",
             "subprocess", "pynbd.client", "pynbd.server", "pynbd.backends"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _core_modules() -> list[Path]:
    return sorted(Path(pynbd.protocol.__file__).parent.rglob("*.py"))


def test_core_imports_no_io_and_no_clock() -> None:
    modules = _core_modules()
    assert {p.name for p in modules} >= {"client.py", "server.py", "stream.py",
                                          "server_options.py", "server_requests.py",
                                          "server_replies.py", "client_options.py",
                                          "client_replies.py", "transmission.py"}
    for path in modules:
        bad = {n for n in _imports(path)
               if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}
        assert not bad, f"{path.relative_to(Path(pynbd.protocol.__file__).parent)} " \
                        f"imports {sorted(bad)}"


def test_the_scan_sees_imports() -> None:
    """The check above would notice: the drivers do import these."""
    client = Path(pynbd.protocol.__file__).parent.parent / "client" / "blocking.py"
    assert {"socket", "time"} <= _imports(client)
