"""Reaching an RBD image: the ``rbd:`` target syntax, connecting to the Ceph cluster with
bounded timeouts, opening the pool and image, and what librbd's cache settings allow.

Every failure while connecting or opening becomes a BackendError that names what to fix
(the config file, the keyring, the client's caps, the pool, image or snapshot name, or a
cluster that cannot be reached in time). The I/O on the opened image is
:mod:`pynbd.backends.rbd`'s job.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from pynbd.backends import rbd_capi
from pynbd.backends.base import BackendError
from pynbd.backends.rbd_capi import CephCallError

#: why librbd cannot be used here, or None
IMPORT_ERROR: str | None = rbd_capi.LOAD_ERROR

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_CONF",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_OSD_OP_TIMEOUT",
    "IMPORT_ERROR",
    "INSTALL_HINT",
    "RbdHandle",
    "RbdTarget",
    "errno_of",
    "full_client_name",
    "parse_rbd_target",
]

# the messages belong to the RBD backend, whichever of its modules writes them
log = logging.getLogger("pynbd.backends.rbd")

DEFAULT_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CLIENT = "client.admin"
#: seconds to reach the monitors and authenticate (client_mount_timeout, rados_mon_op_timeout)
DEFAULT_CONNECT_TIMEOUT = 10.0
#: seconds an OSD operation may take before it fails with ETIMEDOUT (rados_osd_op_timeout)
DEFAULT_OSD_OP_TIMEOUT = 60.0

INSTALL_HINT = (
    "librbd is missing: apt-get install librbd1 (or ceph-common, which brings it and "
    "the rbd tool); see docs/rbd.md"
)


@dataclass(frozen=True)
class RbdTarget:
    pool: str
    image: str
    snapshot: str | None = None
    namespace: str = ""

    @property
    def spec(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot is not None else ""
        return f"{self.pool}/{ns}{self.image}{snap}"


def parse_rbd_target(target: str) -> RbdTarget:
    """``rbd:POOL/IMAGE[@SNAP]`` or ``rbd:POOL/NAMESPACE/IMAGE[@SNAP]`` -> RbdTarget.

    Raises ValueError for anything else.
    """
    if not target.startswith("rbd:"):
        raise ValueError(f"not an RBD target (expected rbd:POOL/IMAGE[@SNAP]): {target!r}")
    spec = target[len("rbd:"):]
    snap: str | None = None
    if "@" in spec:
        spec, snap = spec.split("@", 1)
        if not snap or "@" in snap or "/" in snap:
            raise ValueError(f"invalid snapshot name in {target!r}")
    parts = spec.split("/")
    if len(parts) == 2:
        pool, image = parts
        namespace = ""
    elif len(parts) == 3:
        pool, namespace, image = parts
        if not namespace:
            raise ValueError(f"empty namespace in {target!r}")
    else:
        raise ValueError(f"invalid RBD target {target!r} (expected rbd:POOL/IMAGE[@SNAP])")
    if not pool or not image:
        raise ValueError(f"invalid RBD target {target!r}: empty pool or image name")
    return RbdTarget(pool, image, snap, namespace)


def errno_of(exc: BaseException, default: int = errno.EIO) -> int:
    """The errno a librados/librbd exception carries, or ``default``."""
    err = getattr(exc, "errno", None)
    if isinstance(err, int) and err > 0:
        return err
    return default


def full_client_name(name: str | None) -> str:
    """A Ceph client name in full (``admin`` -> ``client.admin``)."""
    name = name or DEFAULT_CLIENT
    return name if "." in name else f"client.{name}"


class RbdHandle:
    """The cluster connection, pool I/O context and open image behind one RBD backend.

    ``open`` either leaves all three open or releases what it opened and raises a
    BackendError; ``release`` closes them (once; later calls do nothing).
    """

    def __init__(self, target: RbdTarget, conf_path: str, client: str, keyring: str | None,
                 read_only: bool) -> None:
        self.target = target
        self.name = f"rbd:{target.spec}"
        self.conf_path = conf_path
        self.client_name = client
        self.keyring = keyring
        self.read_only = read_only
        self.cluster: rbd_capi.Cluster | None = None
        self.ioctx: rbd_capi.IoCtx | None = None
        self.image: rbd_capi.Image | None = None

    def where(self) -> str:
        kr = f", keyring {self.keyring}" if self.keyring else ""
        return f"(client {self.client_name}, conf {self.conf_path}{kr})"

    def open(self, connect_timeout: float, osd_op_timeout: float) -> rbd_capi.Image:
        """Connect, open the pool and the image."""
        try:
            self._connect(connect_timeout, osd_op_timeout)
            image = self._open_image()
        except BaseException:
            self.release()
            raise
        return image

    def _connect(self, connect_timeout: float, osd_op_timeout: float) -> None:
        if not os.path.exists(self.conf_path):
            raise BackendError(errno.ENOENT, f"{self.name}: Ceph config {self.conf_path} not "
                                             "found (use --ceph-conf or CEPH_CONF)")
        if self.keyring and not os.path.exists(self.keyring):
            raise BackendError(errno.ENOENT, f"{self.name}: keyring {self.keyring} not found")
        secs = str(max(1, round(connect_timeout)))
        overrides = {
            "client_mount_timeout": secs,
            "rados_mon_op_timeout": secs,
            "rados_osd_op_timeout": str(max(0, round(osd_op_timeout))),
        }
        if self.keyring:
            overrides["keyring"] = self.keyring
        try:
            self.cluster = cluster = rbd_capi.Cluster(self.client_name)
            cluster.read_conf(self.conf_path)
            for key, value in overrides.items():
                cluster.conf_set(key, value)
        except CephCallError as exc:
            raise BackendError(errno_of(exc, errno.EINVAL),
                               f"{self.name}: cannot use Ceph config {self.conf_path} "
                               f"as {self.client_name}: {exc}") from None
        start = time.monotonic()
        try:
            cluster.connect()
        except CephCallError as exc:
            raise self._connect_error(exc, time.monotonic() - start) from None

    def _connect_error(self, exc: BaseException, waited: float) -> BackendError:
        err = errno_of(exc)
        if err == errno.ETIMEDOUT:
            mon = self.conf_get("mon_host")
            return BackendError(errno.ETIMEDOUT,
                                f"{self.name}: cannot reach the Ceph cluster (mon_host "
                                f"{mon}) within {waited:.0f} s {self.where()}")
        if err in (errno.EACCES, errno.EPERM):
            return BackendError(errno.EACCES,
                                f"{self.name}: permission denied connecting to Ceph: "
                                f"wrong or missing key {self.where()}")
        return BackendError(err, f"{self.name}: cannot connect to Ceph {self.where()}: {exc}")

    def _open_image(self) -> rbd_capi.Image:
        t = self.target
        assert self.cluster is not None
        try:
            self.ioctx = ioctx = self.cluster.open_ioctx(t.pool)
        except CephCallError as exc:
            if exc.errno == errno.ENOENT:
                raise BackendError(errno.ENOENT, f"{self.name}: pool {t.pool!r} does not "
                                                 f"exist {self.where()}") from None
            raise self._open_error(exc, f"cannot open pool {t.pool!r}") from None
        if t.namespace:
            ioctx.set_namespace(t.namespace)
        try:
            self.image = ioctx.open_image(t.image, t.snapshot, self.read_only)
        except CephCallError as exc:
            if exc.errno == errno.ENOENT:
                raise self._not_found() from None
            raise self._open_error(exc, "cannot open image") from None
        return self.image

    def _open_error(self, exc: BaseException, what: str) -> BackendError:
        err = errno_of(exc)
        if err in (errno.EPERM, errno.EACCES):
            return BackendError(errno.EACCES, f"{self.name}: {what}: permission denied "
                                              f"(check the caps of {self.client_name}) "
                                              f"{self.where()}")
        if err == errno.ETIMEDOUT:
            return BackendError(err, f"{self.name}: {what}: timed out (are the OSDs up?) "
                                     f"{self.where()}")
        return BackendError(err, f"{self.name}: {what}: {exc} {self.where()}")

    def _not_found(self) -> BackendError:
        t = self.target
        where = f"pool {t.pool!r}" + (f" namespace {t.namespace!r}" if t.namespace else "")
        if t.snapshot is not None and self.ioctx is not None:
            try:
                probe = self.ioctx.open_image(t.image, None, True)
            except CephCallError:
                pass
            else:
                probe.close()
                return BackendError(errno.ENOENT, f"{self.name}: snapshot {t.snapshot!r} of "
                                                  f"image {t.image!r} does not exist in "
                                                  f"{where} {self.where()}")
        return BackendError(errno.ENOENT, f"{self.name}: image {t.image!r} does not exist in "
                                          f"{where} {self.where()}")

    def conf_get(self, key: str) -> str:
        try:
            assert self.cluster is not None
            return self.cluster.conf_get(key)
        except Exception:
            return "?"

    def effective_config(self, key: str) -> str:
        """A librbd option as this image sees it (image and pool overrides included)."""
        try:
            assert self.image is not None
            value = self.image.config().get(key)
            if value is not None:
                return value
        except Exception:
            pass
        return self.conf_get(key)

    def multi_conn_safe(self) -> bool:
        """NBD_FLAG_CAN_MULTI_CONN: a flush on one connection makes every completed write
        visible on every connection, including connections to another pynbd on the same image.

        Inside one pynbd all connections share this one librbd handle, so that is true.
        Between two librbd clients it holds when neither serves reads from a client-side
        cache: exclusive-lock hands writes over (the releasing client flushes first) and a
        flush waits for the writes still in flight to the OSDs. librbd's default cache
        (``rbd_cache_policy = writearound``) and ``rbd_cache = false`` never serve reads from
        memory; ``writeback``/``writethrough`` keep an ObjectCacher that can return stale
        data written through another client, so we do not advertise multi-conn then.
        """
        if self.read_only and self.target.snapshot is not None:
            return True  # a snapshot never changes
        if self.effective_config("rbd_cache").lower() in ("false", "0", "no", "off"):
            return True
        return self.effective_config("rbd_cache_policy").lower() == "writearound"

    def release(self) -> None:
        """Close the image and the pool context, shut the cluster connection down."""
        for attr, method in (("image", "close"), ("ioctx", "close"),
                             ("cluster", "shutdown")):
            obj = getattr(self, attr)
            setattr(self, attr, None)
            if obj is not None:
                try:
                    getattr(obj, method)()
                except Exception as exc:
                    log.warning("%s: _%s.%s() failed: %s", self.name, attr, method, exc)
