"""The vault's file encryption against all Wycheproof Cobblestone-256 vectors, plus streaming properties."""

import hashlib
import io
import json
import zlib
from pathlib import Path

import pytest

from appliance.trust import chunked
from conftest import documented_decryptor

VECTORS = json.loads((Path(__file__).parent / "vectors/wycheproof/c2sp_chunked_encryption_aes_256_gcm_test.json").read_text())
TESTS = [t for g in VECTORS["testGroups"] for t in g["tests"]]


def _case(t):
    return bytes.fromhex(t["key"]), bytes.fromhex(t["ctx"]), zlib.decompress(bytes.fromhex(t["ct"]))


def _digest_matches(data: bytes, t) -> bool:
    return len(data) == t["msgLength"] and hashlib.sha512(data).hexdigest() == t["msgSha512"]


def test_all_35_vectors_are_present():
    assert VECTORS["algorithm"] == "Cobblestone-256" and len(TESTS) == VECTORS["numberOfTests"] == 35


@pytest.mark.parametrize("t", TESTS, ids=lambda t: f"tc{t['tcId']}-{t['result']}-{'+'.join(t['flags']) or 'plain'}")
def test_vector(t):
    key, ctx, ct = _case(t)
    if t["result"] == "valid":
        message = chunked.decrypt(key, ct, ctx)
        assert _digest_matches(message, t)
        # Encryption is checked exactly by injecting the vector's salt (its first 24 bytes).
        assert chunked.encrypt(key, message, ctx, salt=ct[:chunked.SALT_SIZE]) == ct
    else:
        with pytest.raises((chunked.DecryptionError, ValueError)):
            chunked.decrypt(key, ct, ctx)


@pytest.mark.parametrize("t", [t for t in TESTS if "PartialPlaintext" in t["flags"]], ids=lambda t: f"tc{t['tcId']}")
def test_streaming_yields_at_most_the_valid_prefix_then_keeps_failing(t):
    key, ctx, ct = _case(t)
    reader = chunked.DecryptingReader(key, io.BytesIO(ct), ctx)
    produced = bytearray()
    with pytest.raises(chunked.DecryptionError):
        while True:
            block = reader.read(5000)
            if not block:
                pytest.fail("a clean end of message was reported for an invalid ciphertext")
            produced += block
    assert _digest_matches(bytes(produced), t)
    for _ in range(2):
        with pytest.raises(chunked.DecryptionError):
            reader.read(1)


@pytest.mark.parametrize("size", [0, 1, chunked.CHUNK_SIZE - 1, chunked.CHUNK_SIZE, chunked.CHUNK_SIZE + 1,
                                  3 * chunked.CHUNK_SIZE])
def test_round_trip_at_chunk_boundaries(size):
    key = bytes(range(32))
    msg = bytes((i * 7) % 256 for i in range(size))
    ct = chunked.encrypt(key, msg, b"ctx")
    # 56-byte header, then one 16-byte tag per chunk; a message of k full chunks has k+1 chunks.
    assert len(ct) == 56 + size + 16 * (size // chunked.CHUNK_SIZE + 1)
    assert chunked.decrypt(key, ct, b"ctx") == msg
    with pytest.raises(chunked.DecryptionError, match="commitment"):
        chunked.decrypt(key, ct, b"other ctx")


def test_streaming_encrypt_and_decrypt_use_bounded_memory(tmp_path):
    import tracemalloc

    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    class Sink(io.RawIOBase):
        def __init__(self):
            self.h, self.n = hashlib.sha256(), 0

        def writable(self):
            return True

        def write(self, b):
            self.h.update(b)
            self.n += len(b)
            return len(b)

    key = bytes(32)
    size = 48 * 2**20
    tracemalloc.start()
    sink = Sink()
    chunked.encrypt_stream(key, io.BufferedReader(Zeros(size)), sink)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sink.n == 56 + size + 16 * (size // chunked.CHUNK_SIZE + 1)
    assert peak < 8 * 2**20, f"encrypting 48 MiB peaked at {peak / 2**20:.1f} MiB of Python memory"

    # And back: decrypt the file in 1 MiB reads.
    path = tmp_path / "big.enc"
    with open(path, "wb") as f:
        chunked.encrypt_stream(key, io.BufferedReader(Zeros(size)), f)
    tracemalloc.start()
    h, total = hashlib.sha256(), 0
    with open(path, "rb") as f:
        reader = chunked.DecryptingReader(key, f)
        while block := reader.read(2**20):
            h.update(block)
            total += len(block)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == size and h.digest() == hashlib.sha256(bytes(size)).digest()
    assert peak < 8 * 2**20, f"decrypting 48 MiB peaked at {peak / 2**20:.1f} MiB of Python memory"


def test_the_documented_decryptor_agrees_with_the_vectors_and_ours():
    decrypt = documented_decryptor()
    for t in TESTS:
        key, ctx, ct = _case(t)
        if t["result"] == "valid":
            assert _digest_matches(decrypt(key, ct, ctx), t)
        elif "InvalidKeySize" not in t["flags"]:
            with pytest.raises(Exception):
                decrypt(key, ct, ctx)
    key = bytes(range(32))
    msg = b"record one\nrecord two\n" * 2000
    assert decrypt(key, chunked.encrypt(key, msg, b"appliance context"), b"appliance context") == msg
