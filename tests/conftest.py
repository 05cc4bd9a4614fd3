"""Shared fixtures: real single-node Ceph clusters (see tests/support/ceph_cluster.py);
and the test lanes (which tests need programs from Debian packages, which a Ceph cluster).

Other fixtures live in their own modules; keep this file small.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ceph_cluster import INSTALL_HINT, CephCluster, missing_binaries


def _ceph_cluster(tmp_path_factory: pytest.TempPathFactory, auth: str) -> Iterator[CephCluster]:
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Ceph programs missing: {', '.join(missing)}. Install: {INSTALL_HINT}",
                    pytrace=False)
    cluster = CephCluster(tmp_path_factory.mktemp(f"ceph-{auth}"), auth=auth, osd=True)
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.fail(f"could not start the test Ceph cluster (auth {auth}): {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ceph_none(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A running mon + memstore OSD with pool ``rbd``, auth none."""
    yield from _ceph_cluster(tmp_path_factory, "none")


@pytest.fixture(scope="session")
def ceph_cephx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A running mon + memstore OSD with pool ``rbd``, auth cephx (client.admin keyring)."""
    yield from _ceph_cluster(tmp_path_factory, "cephx")


# --- test lanes ------------------------------------------------------------------------
# The fast lane, `pytest -m "not interop and not ceph"`, needs no programs or Python
# modules from Debian packages and no Ceph cluster (see CONTRIBUTING.md). Tests are put
# in the other lanes here, in one place, by where they are and what they use; a module
# whose every test is in a lane the -m expression leaves out is not even imported (it
# may import libnbd's `nbd` or Ceph's `rados` at the top).

TESTS = Path(__file__).resolve().parent

#: (path under tests/, optionally ::test_name, markers); a directory ends in "/". Modules
#: that mark themselves (pytestmark) need no entry unless they import a Debian-packaged
#: module at the top (then they must not even be imported in the fast lane).
LANES: list[tuple[str, tuple[str, ...]]] = [
    ("interop/", ("interop",)),  # real programs from Debian packages; some import nbd
    ("interop/test_ceph_msgr2.py", ("ceph",)),
    ("interop/test_rbd_interop.py", ("ceph",)),  # imports rados and rbd
    ("backends/test_rbd_backend.py", ("ceph",)),  # imports rados and rbd
    ("support/test_ceph_cluster.py", ("ceph",)),  # imports rados
    ("security/", ("interop",)),  # libnbd's Python bindings (import nbd)
    ("server/test_workers.py", ("interop",)),  # import nbd
    ("server/test_aio_dispatch.py", ("interop",)),  # import nbd
    # every filter and plugin test drives pynbd serve with libnbd, nbdcopy, qemu-io, fio
    ("filters/", ("interop",)),
    ("plugins/", ("interop",)),
    ("service/", ("interop",)),  # systemd-socket-activate, nbdinfo, qemu-io
    ("cli/test_copy_extended.py", ("interop",)),  # import nbd
    ("fuse/", ("interop",)),  # /dev/fuse, fusermount3, nbdkit, qemu-nbd, e2fsprogs
    ("migration/test_nbd_targets.py", ("interop",)),  # qemu-nbd and nbdkit as targets
    ("backup/test_bitmaps.py", ("interop",)),  # libnbd (import nbd), qemu, Debian 13 peers
    ("backup/test_views.py", ("interop",)),  # libnbd, qemu-io, a tmpfs mount
    ("backup/test_backup.py", ("interop",)),  # qemu-nbd -B (Debian 12 and 13), libnbd
    ("migration/test_msgr2.py::test_msgr2_migration_with_qemu_io_writer", ("interop",)),
    ("proxy/test_proxy.py::test_flush_reaches_every_upstream_connection_without_multi_conn",
     ("interop",)),
]
#: fixtures that start programs: a test using one is in that lane wherever it is.
#: ``procs`` runs pynbd's own daemons (serve, listen, mirror, proxy) end to end, with
#: timed faults and kills: minutes, not seconds, so it is the full lane's job too.
LANE_FIXTURES = {"servers": "interop", "procs": "interop", "ceph_none": "ceph",
                 "ceph_cephx": "ceph"}


def _lane_entry_exists(entry: str) -> bool:
    path, _, test = entry.partition("::")
    p = TESTS / path
    if not p.exists():
        return False
    return not test or f"def {test}(" in p.read_text()


def pytest_configure(config: pytest.Config) -> None:
    stale = [entry for entry, _ in LANES if not _lane_entry_exists(entry)]
    if stale:  # a moved test lands in the fast lane and fails there without its peers
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            f"tests/conftest.py LANES names tests that do not exist: {stale}"), stacklevel=2)


def _lanes_of(rel: str, test: str | None = None) -> set[str]:
    """Markers for the module ``rel`` (relative to tests/) or one of its tests."""
    out: set[str] = set()
    for entry, markers in LANES:
        path, _, name = entry.partition("::")
        if not (rel == path or (path.endswith("/") and rel.startswith(path))):
            continue
        if not name or name == test:
            out.update(markers)
    return out


def _deselected_by(config: pytest.Config, markers: set[str]) -> bool:
    """Would the -m expression leave out a test carrying ``markers``?"""
    expr = config.getoption("markexpr")
    if not expr or not markers:
        return False
    from _pytest.mark.expression import Expression

    return not Expression.compile(expr).evaluate(lambda name, **_: name in markers)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    try:
        rel = collection_path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return None
    if collection_path.is_dir():
        rel += "/"
    elif not collection_path.name.startswith("test_"):
        return None
    if _deselected_by(config, _lanes_of(rel)):
        return True
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            rel = item.path.resolve().relative_to(TESTS).as_posix()
        except ValueError:
            continue
        name = getattr(item, "originalname", item.name)
        lanes = _lanes_of(rel, name)
        lanes.update(m for f, m in LANE_FIXTURES.items()
                     if f in getattr(item, "fixturenames", ()))
        for marker in sorted(lanes):
            item.add_marker(marker)
