"""AES-128-GCM streams for msgr2.1 secure mode: a fixed le32 + le64 counter nonce, the
counter advanced after every GCM operation (never reused within a connection)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.constants import GCM_TAG_LEN
from pynbd.msgr2.errors import ProtocolError, UsageError

_M64 = (1 << 64) - 1


class BufferPoolLike(Protocol):
    def get(self, n: int) -> bytearray: ...
#: at least this many plaintext bytes spread over several buffers: stream them through one
#: GCM context instead of joining them into one buffer first
STREAM_THRESHOLD = 256 * 1024


class GcmStream:
    """One direction of a secure connection."""

    __slots__ = ("_aead", "_counter", "_fixed", "_initial", "_key", "on_nonce", "operations")

    def __init__(self, key: bytes, nonce: bytes) -> None:
        if len(key) != 16 or len(nonce) != 12:
            raise UsageError("secure mode needs a 16-byte key and a 12-byte nonce")
        self._key = bytes(key)
        self._aead = AESGCM(self._key)
        self._fixed = bytes(nonce[:4])
        self._counter = int.from_bytes(nonce[4:12], "little")
        self._initial = self._counter
        self.operations = 0
        #: test hook: called with every nonce used
        self.on_nonce: Callable[[bytes], None] | None = None

    def next_nonce(self) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "little")
        self._counter = (self._counter + 1) & _M64
        if self._counter == self._initial:  # 2**64 operations: cannot happen, but never reuse
            raise ProtocolError("GCM nonce counter wrapped: connection must be re-established")
        self.operations += 1
        if self.on_nonce is not None:
            self.on_nonce(nonce)
        return nonce

    def encrypt(self, plain: Buffer) -> bytes:
        return self._aead.encrypt(self.next_nonce(), plain, None)

    def encrypt_parts(self, parts: Sequence[Buffer], total: int,
                      pool: BufferPoolLike | None = None) -> Buffer:
        """Encrypt the concatenation of ``parts`` (``total`` bytes) as one GCM operation,
        without joining them; returns ciphertext + tag (from ``pool`` when given)."""
        nonce = self.next_nonce()
        n = total + GCM_TAG_LEN
        if total < STREAM_THRESHOLD or pool is None:
            if len(parts) == 1 and total >= STREAM_THRESHOLD:
                out = bytearray(n)
                self._aead.encrypt_into(nonce, parts[0], None, out)
                return out
            if total < STREAM_THRESHOLD or len(parts) == 1:
                plain: Buffer = parts[0] if len(parts) == 1 else b"".join(parts)
                out = bytearray(n)
                self._aead.encrypt_into(nonce, plain, None, out)
                return out
        store = pool.get(n + 15) if pool is not None else bytearray(n + 15)
        mv = memoryview(store)
        if len(parts) == 1:
            self._aead.encrypt_into(nonce, parts[0], None, mv[:n])
            return mv[:n]
        enc = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        pos = 0
        for p in parts:
            if len(p):
                pos += enc.update_into(p, mv[pos:])
        enc.finalize()
        mv[pos : pos + GCM_TAG_LEN] = enc.tag
        return mv[:n]

    def decrypt_into(self, cipher: Buffer, out: Buffer) -> None:
        """Decrypt ``cipher`` (ciphertext + tag) into ``out`` (len(cipher) - 16 bytes)."""
        nonce = self.next_nonce()
        try:
            self._aead.decrypt_into(nonce, cipher, None, out)
        except InvalidTag as exc:
            raise ProtocolError(
                "secure frame failed GCM authentication (corrupted, replayed or reordered)"
            ) from exc


def split_connection_secret(secret: bytes, is_client: bool) -> tuple[GcmStream, GcmStream]:
    """(rx, tx) streams from a connection secret: key = [0:16]; the client receives with
    nonce [16:28] and sends with [28:40]; the server the other way round."""
    if len(secret) < 40:
        raise ProtocolError(
            f"connection secret of {len(secret)} bytes is too short for secure mode")
    key = secret[:16]
    a, b = secret[16:28], secret[28:40]
    if is_client:
        return GcmStream(key, a), GcmStream(key, b)
    return GcmStream(key, b), GcmStream(key, a)
