"""Shared fixtures: real single-node Ceph clusters (see tests/support/ceph_cluster.py).

Other fixtures live in their own modules; keep this file small.
"""

from __future__ import annotations

from collections.abc import Iterator

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
