"""Ceph as an application of msgr2: configuration files and keyrings, the monitor
messages pynbd needs, a minimal monitor client and the cluster status.

The protocol itself (frames, the connection state machine, auth) is :mod:`pynbd.msgr2`
and its asyncio driver :mod:`pynbd.msgr2.aio`; this package is what ``pynbd ceph``
builds on them.

- ``conf``: ``ceph.conf`` reading, ``mon_host`` parsing, keyring search paths;
- ``keyring``: an entity's key from a keyring file;
- ``messages``: MMonCommand / MMonCommandAck / MMonSubscribe / MMonMap (fsid);
- ``monclient``: :class:`MonClient` and :func:`target_from_conf`;
- ``status``: :func:`cluster_status`.
"""

from pynbd.ceph.conf import CephConf, parse_mon_host, read_ceph_conf
from pynbd.ceph.keyring import read_keyring
from pynbd.ceph.monclient import MonClient, MonTarget, target_from_conf
from pynbd.ceph.status import CommandRefused, cluster_status

__all__ = ["CephConf", "CommandRefused", "MonClient", "MonTarget", "cluster_status",
           "parse_mon_host", "read_ceph_conf", "read_keyring", "target_from_conf"]
