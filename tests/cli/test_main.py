"""The ``pynbd`` command itself: its version, from the one place it is written."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pynbd
from tests.support.processes import run_pynbd

REPO = Path(__file__).resolve().parents[2]


def test_version_is_written_once() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pynbd.__version__"}
    assert pynbd.__version__.count(".") == 2 and "## " + pynbd.__version__ in \
        (REPO / "CHANGELOG.md").read_text()


def test_version_option() -> None:
    r = run_pynbd("--version", text=True, timeout=60, python=sys.executable)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pynbd {pynbd.__version__}"
