"""The msgr2 core is sans-I/O: no sockets, event loop, threads or clocks (the driver in
pynbd.msgr2.aio passes ``now`` in), and it does not reach up into its driver or into the
Ceph application code."""

from __future__ import annotations

import ast
from pathlib import Path

import pynbd.msgr2

FORBIDDEN = {"asyncio", "socket", "selectors", "select", "threading", "time", "ssl",
             "subprocess", "pynbd.msgr2.aio", "pynbd.ceph"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _core_modules() -> list[Path]:
    return sorted(Path(pynbd.msgr2.__file__).parent.glob("*.py"))


def test_core_imports_no_io_and_no_clock() -> None:
    modules = _core_modules()
    assert {p.name for p in modules} >= {"connection.py", "frames.py", "auth.py",
                                          "session.py", "payloads.py", "encoding.py"}
    for path in modules:
        bad = {n for n in _imports(path)
               if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_scan_sees_imports() -> None:
    """The check above would notice: the driver does import these."""
    link = Path(pynbd.msgr2.__file__).parent / "aio" / "link.py"
    assert {"asyncio", "socket", "time"} <= _imports(link)
