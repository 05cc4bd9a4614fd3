"""Protocol constants, named as in Ceph (``frames_v2.h``, ``msgr.h``, ``ceph_features.h``)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

BANNER_PREFIX = b"ceph v2\n"
#: le16 payload length that follows the 8-byte banner prefix
BANNER_PAYLOAD_LEN = 16


class Msgr2Feature(IntFlag):
    """The msgr2 banner feature namespace (CEPH_MSGR2_FEATURE_*)."""

    REVISION_1 = 1 << 0
    COMPRESSION = 1 << 1


#: what we put in our banner: msgr2.1 supported, nothing required (as Ceph pacific does)
MSGR2_SUPPORTED = int(Msgr2Feature.REVISION_1)
MSGR2_REQUIRED = 0


class Tag(IntEnum):
    """Frame tags (ceph::msgr::v2::Tag)."""

    HELLO = 1
    AUTH_REQUEST = 2
    AUTH_BAD_METHOD = 3
    AUTH_REPLY_MORE = 4
    AUTH_REQUEST_MORE = 5
    AUTH_DONE = 6
    AUTH_SIGNATURE = 7
    CLIENT_IDENT = 8
    SERVER_IDENT = 9
    IDENT_MISSING_FEATURES = 10
    SESSION_RECONNECT = 11
    SESSION_RESET = 12
    SESSION_RETRY = 13
    SESSION_RETRY_GLOBAL = 14
    SESSION_RECONNECT_OK = 15
    WAIT = 16
    MESSAGE = 17
    KEEPALIVE2 = 18
    KEEPALIVE2_ACK = 19
    ACK = 20


class EntityType(IntEnum):
    """CEPH_ENTITY_TYPE_*."""

    MON = 0x01
    MDS = 0x02
    OSD = 0x04
    CLIENT = 0x08
    MGR = 0x10
    AUTH = 0x20
    ANY = 0xFF


class AuthMethod(IntEnum):
    """CEPH_AUTH_* plus pynbd's pre-shared-key method (see docs/msgr2-psk-auth.md)."""

    UNKNOWN = 0
    NONE = 1
    CEPHX = 2
    GSS = 4
    #: pynbd's PSK method: ASCII "PSK1" as a le32; far outside Ceph's small numbers
    PYNBD_PSK = 0x314B5350


class ConMode(IntEnum):
    """CEPH_CON_MODE_*."""

    UNKNOWN = 0
    CRC = 1
    SECURE = 2


class AddrType(IntEnum):
    """entity_addr_t::TYPE_*."""

    NONE = 0
    LEGACY = 1
    MSGR2 = 2
    ANY = 3
    CIDR = 4


class MsgType(IntEnum):
    """The few Ceph message types pynbd uses (CEPH_MSG_* / MSG_*)."""

    MON_MAP = 4
    MON_SUBSCRIBE = 15
    MON_SUBSCRIBE_ACK = 16
    AUTH = 17
    AUTH_REPLY = 18
    MON_COMMAND = 50
    MON_COMMAND_ACK = 51
    CONFIG = 0x11C
    #: first message type available to pynbd applications (outside Ceph's range)
    PYNBD_BASE = 0x7000


#: CEPH_MSG_CONNECT_LOSSY in CLIENT_IDENT/SERVER_IDENT flags
MSG_CONNECT_LOSSY = 1

#: late_status nibbles (FRAME_LATE_STATUS_*)
FRAME_LATE_STATUS_ABORTED = 0x1
FRAME_LATE_STATUS_COMPLETE = 0xE
FRAME_LATE_STATUS_ABORTED_MASK = 0xF

#: Ceph pacific's full feature set; a mon accepts it in CLIENT_IDENT
CEPH_FEATURES_ALL = 0x3F01CFBDFFFDFFFF
#: CEPH_FEATURE_MSG_ADDR2 | CEPH_FEATURE_SERVER_NAUTILUS: needed to encode addrvecs
CEPH_FEATUREMASK_MSG_ADDR2 = (1 << 59) | (1 << 0)

#: AUTH_MODE_MON: first byte of the auth payload sent to a monitor
AUTH_MODE_MON = 10

PREAMBLE_LEN = 32
SECURE_INLINE_LEN = 48
GCM_TAG_LEN = 16
CRYPTO_BLOCK = 16
CRC_LEN = 4
EPILOGUE_CRC_LEN = 13
EPILOGUE_SECURE_LEN = 16
MAX_NUM_SEGMENTS = 4
#: segment alignment Ceph puts in the preamble: sizeof(void*) and page size (message data)
SEGMENT_ALIGN_DEFAULT = 8
SEGMENT_ALIGN_PAGE = 4096
MSG_HEADER2_LEN = 41
SIGNATURE_LEN = 32
