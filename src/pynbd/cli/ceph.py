"""``pynbd ceph status``: ask a Ceph cluster's monitor for its status over msgr2."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from pynbd.ceph.monclient import target_from_conf
from pynbd.ceph.status import cluster_status
from pynbd.msgr2.errors import Msgr2Error, UsageError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ceph", help="talk to a Ceph cluster over msgr2",
                              description="Talk to a Ceph cluster's monitors over msgr2.")
    sub = p.add_subparsers(dest="ceph_command", metavar="COMMAND")
    sub.required = True
    st = sub.add_parser("status", help="print the cluster status (JSON) from a monitor",
                        description="Open a msgr2 session to a monitor, run 'status' and "
                                    "print the JSON it returns.")
    st.add_argument("-c", "--conf", required=True, metavar="CEPH_CONF",
                    help="Ceph config file (mon_host, fsid, keyring, auth_client_required)")
    st.add_argument("--name", "-n", default="client.admin", help="entity name (default "
                    "client.admin)")
    st.add_argument("--keyring", "-k", help="keyring file (default: from the config, then "
                    "/etc/ceph/$cluster.$name.keyring, ...)")
    st.add_argument("--mode", choices=["crc", "secure"], default="crc",
                    help="msgr2 connection mode (default crc)")
    st.add_argument("--cluster", default="ceph", help="cluster name for $cluster (default ceph)")
    st.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="per-monitor connect + handshake timeout (default 10)")
    st.set_defaults(func=status_main)


async def _status(args: argparse.Namespace) -> bytes:
    target = target_from_conf(args.conf, args.name, args.keyring, args.cluster)
    return await cluster_status(target, args.mode, args.connect_timeout)


def status_main(args: argparse.Namespace) -> int:
    try:
        out = asyncio.run(_status(args))
    except UsageError as exc:
        print(f"pynbd ceph status: {exc}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, Msgr2Error, RuntimeError) as exc:
        msg = str(exc) or type(exc).__name__
        print(f"pynbd ceph status: {msg}", file=sys.stderr)
        return 1
    try:
        json.loads(out)
    except ValueError:
        print("pynbd ceph status: the monitor's reply is not JSON", file=sys.stderr)
        return 1
    sys.stdout.write(out.decode() + ("\n" if not out.endswith(b"\n") else ""))
    return 0
