"""A second, minimal implementation decrypts a whole dataset from docs/vault-format.md alone.

It derives the KEK with the stdlib's scrypt (not the appliance's code path), unwraps the data key with AES Key
Wrap written out from RFC 3394 over a raw AES block cipher, and decrypts the split with the decryptor printed in
the document, using the context string the document gives. Only `cryptography` primitives and hashlib.
"""

import base64
import hashlib
import json

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from appliance.trust import keyring, store
from conftest import documented_decryptor

def _aes_kw_unwrap(kek: bytes, wrapped: bytes) -> bytes:
    """RFC 3394 section 2.2.2, index-based."""
    aes = Cipher(algorithms.AES(kek), modes.ECB())
    n = len(wrapped) // 8 - 1
    a, r = wrapped[:8], [wrapped[8 * (i + 1):8 * (i + 2)] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n, 0, -1):
            t = (n * j + i).to_bytes(8, "big")
            d = aes.decryptor()
            b = d.update(bytes(x ^ y for x, y in zip(a, t)) + r[i - 1]) + d.finalize()
            a, r[i - 1] = b[:8], b[8:]
    assert a == bytes.fromhex("A6A6A6A6A6A6A6A6"), "integrity check failed: wrong passphrase"
    return b"".join(r)


def test_an_independent_implementation_decrypts_a_dataset_from_the_document(home):
    records = {"train": [{"messages": [{"role": "user", "content": f"question {i} \u00e9\u4e2d"},
                                       {"role": "assistant", "content": "answer " * 500}]} for i in range(50)]}
    vault = keyring.init("the auditor's passphrase", kdf="scrypt")
    store.write(vault, "audit-me", records, hardware={})

    ring = json.loads((home / "keyring.json").read_text())
    kdf = ring["kdf"]
    assert kdf["name"] == "scrypt"
    kek = hashlib.scrypt("the auditor's passphrase".encode(), salt=base64.b64decode(kdf["salt"]), n=kdf["n"],
                         r=kdf["r"], p=kdf["p"], maxmem=256 * 2**20, dklen=32)
    data_key = _aes_kw_unwrap(kek, base64.b64decode(ring["keys"]["audit-me"]["wrapped"]))
    context = b"appliance-dataset/1" + b"\x00" + b"audit-me" + b"\x00" + b"train"
    blob = (home / "datasets" / "audit-me" / "train.c2sp").read_bytes()
    plaintext = documented_decryptor()(data_key, blob, context)
    assert [json.loads(line) for line in plaintext.decode("utf-8").splitlines()] == records["train"]
    assert plaintext.endswith(b"\n")
