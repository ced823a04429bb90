"""C2SP chunked encryption, Cobblestone-256 (https://c2sp.org/chunked-encryption).

One message = ``salt (24) || commitment (32) || AEAD chunks``. Per message,
``key (32) || base nonce (12) || commitment (32)`` is HKDF-Expand-SHA-512 of the
input key with ``info = "c2sp.org/chunked-encryption@v1+AEAD_AES_256_GCM" ||
0x00 || salt || context``. The plaintext is cut into 16 KiB chunks, the last
one always shorter (possibly empty); chunk ``i`` is AES-256-GCM with nonce
``base nonce XOR i`` (big-endian) and empty AAD. A short final chunk marks the
end, so truncation and extension are detected; the per-chunk nonce makes
reordering fail; the commitment rejects a wrong key or context before any
chunk is decrypted.

Both directions stream: memory stays at one chunk whatever the size. A
decrypting reader hands out plaintext only after its chunk authenticated, and
once it has failed it keeps failing.
"""

from __future__ import annotations

import hmac
import os
from typing import BinaryIO, Iterator

AEAD_NAME = b"AEAD_AES_256_GCM"
KEY_SIZE, NONCE_SIZE, TAG_SIZE = 32, 12, 16
SALT_SIZE, COMMITMENT_SIZE = 24, 32
HEADER_SIZE = SALT_SIZE + COMMITMENT_SIZE
CHUNK_SIZE = 16 * 1024
MAX_CHUNKS = 1 << 38


class DecryptionError(Exception):
    """The message is not authentic under this key and context (or was truncated or extended)."""


def derive(key: bytes, salt: bytes, context: bytes) -> tuple[bytes, bytes, bytes]:
    """(AEAD key, base nonce, commitment) for one message."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    if len(key) != KEY_SIZE:
        raise ValueError(f"the input key must be {KEY_SIZE} bytes, not {len(key)}")
    if len(salt) != SALT_SIZE:
        raise ValueError(f"the salt must be {SALT_SIZE} bytes, not {len(salt)}")
    info = b"c2sp.org/chunked-encryption@v1+" + AEAD_NAME + b"\x00" + salt + context
    out = HKDFExpand(hashes.SHA512(), KEY_SIZE + NONCE_SIZE + COMMITMENT_SIZE, info).derive(key)
    return out[:KEY_SIZE], out[KEY_SIZE:KEY_SIZE + NONCE_SIZE], out[KEY_SIZE + NONCE_SIZE:]


def _nonce(base: bytes, counter: int) -> bytes:
    if counter >= MAX_CHUNKS:
        raise DecryptionError("the message exceeds 2^38 chunks")
    return (int.from_bytes(base, "big") ^ counter).to_bytes(NONCE_SIZE, "big")


class Encryptor:
    """Push plaintext with ``update``; ``finalize`` emits the short final chunk. Yields ciphertext bytes."""

    def __init__(self, key: bytes, context: bytes = b"", salt: bytes | None = None):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        salt = os.urandom(SALT_SIZE) if salt is None else salt
        aead_key, self._base, commitment = derive(key, salt, context)
        self._aead = AESGCM(aead_key)
        self._buffer = bytearray()
        self._counter = 0
        self._done = False
        self.header = salt + commitment

    def update(self, data: bytes) -> bytes:
        return b"".join(self._update_parts(data))

    def _update_parts(self, data: bytes) -> list[bytes]:
        """Seal every full chunk that is certainly not the last; keep the rest (at least one byte) buffered.

        A buffer of exactly 16 KiB is kept back until more data arrives: if nothing does, it is followed by
        the empty final chunk. Full chunks are sealed straight from the caller's buffer, without copies.
        """
        if self._done:
            raise ValueError("update() after finalize()")
        sealed: list[bytes] = []
        view = memoryview(data).cast("B")
        if self._buffer:
            take = min(CHUNK_SIZE - len(self._buffer), len(view))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < CHUNK_SIZE or not len(view):
                return sealed
            sealed.append(self._seal(bytes(self._buffer)))
            self._buffer.clear()
        full = (len(view) - 1) // CHUNK_SIZE if len(view) else 0
        sealed.extend(self._seal(view[k * CHUNK_SIZE:(k + 1) * CHUNK_SIZE]) for k in range(full))
        self._buffer += view[full * CHUNK_SIZE:]
        return sealed

    def finalize(self) -> bytes:
        out = bytearray()
        if len(self._buffer) == CHUNK_SIZE:
            out += self._seal(bytes(self._buffer))
            self._buffer.clear()
        out += self._seal(bytes(self._buffer))
        self._buffer.clear()
        self._done = True
        return bytes(out)

    def _seal(self, chunk: bytes) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._base, self._counter), chunk, None)
        self._counter += 1
        return sealed


def encrypt(key: bytes, plaintext: bytes, context: bytes = b"", salt: bytes | None = None) -> bytes:
    enc = Encryptor(key, context, salt)
    return b"".join([enc.header, *enc._update_parts(plaintext), enc.finalize()])


def encrypt_stream(key: bytes, src: BinaryIO, dst: BinaryIO, context: bytes = b"") -> None:
    enc = Encryptor(key, context)
    dst.write(enc.header)
    while block := src.read(1 << 20):
        dst.write(enc.update(block))
    dst.write(enc.finalize())


def iter_decrypt(key: bytes, src: BinaryIO, context: bytes = b"") -> Iterator[bytes]:
    """Yield each chunk's plaintext once it has authenticated; raise DecryptionError at the first problem."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = _read_exactly(src, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise DecryptionError("the message is shorter than its header; it is truncated")
    aead_key, base, commitment = derive(key, header[:SALT_SIZE], context)
    if not hmac.compare_digest(commitment, header[SALT_SIZE:]):
        raise DecryptionError("the key commitment does not match: wrong key or context, or a damaged header")
    aead = AESGCM(aead_key)
    counter = 0
    while True:
        block = _read_exactly(src, CHUNK_SIZE + TAG_SIZE)
        final = len(block) < CHUNK_SIZE + TAG_SIZE
        if final and len(block) < TAG_SIZE:
            raise DecryptionError("the message is truncated (its short final chunk is missing)")
        try:
            plain = aead.decrypt(_nonce(base, counter), block, None)
        except InvalidTag:
            raise DecryptionError(f"chunk {counter} does not authenticate: the message was modified, "
                                  "reordered or truncated") from None
        if final:
            if src.read(1):
                raise DecryptionError("data follows the final chunk: the message was extended")
            yield plain
            return
        yield plain
        counter += 1


class DecryptingReader:
    """A read-only binary stream over a chunked-encryption message; errors are sticky."""

    def __init__(self, key: bytes, src: BinaryIO, context: bytes = b""):
        self._chunks = iter_decrypt(key, src, context)
        self._pending = b""
        self._error: DecryptionError | None = None
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self._pending:
                if self._error is not None:
                    raise self._error
                if self._eof:
                    break
                try:
                    self._pending = next(self._chunks)
                except StopIteration:
                    self._eof = True
                    continue
                except DecryptionError as e:
                    self._error = e
                    if out:
                        return bytes(out)  # hand out what authenticated; the error comes with the next read
                    raise
            take = len(self._pending) if size < 0 else min(size - len(out), len(self._pending))
            out += self._pending[:take]
            self._pending = self._pending[take:]
        return bytes(out)


def decrypt(key: bytes, ciphertext: bytes, context: bytes = b"") -> bytes:
    import io

    return b"".join(iter_decrypt(key, io.BytesIO(ciphertext), context))


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    first = src.read(n)
    if len(first) == n or not first:
        return first  # the usual case: one read, no copy
    buf = bytearray(first)
    while len(buf) < n:
        piece = src.read(n - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)
