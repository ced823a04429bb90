"""Dataset packages: an encrypted dataset carried to another machine, opened there with a passphrase of its own.

``appliance data package NAME OUT`` writes a folder::

    OUT/package.json      what is needed to open it, signed; nothing about the dataset in clear
    OUT/part-<n>.c2sp     the dataset's ciphertext files, byte for byte as in the vault, under opaque names

``package.json`` (format ``appliance-dataset-package/2``) holds: the KDF's parameters; the dataset's data key
wrapped (AES Key Wrap) under a key derived from the *package passphrase* with a fresh salt; ``sealed``, the
dataset's id, its signed manifest (names, source file, record counts, hardware, dates, the plaintext's sha256)
and the parts' real names, encrypted with the data key (AES-256-GCM); the sha256 of each part (of ciphertext:
they confirm nothing about the plaintext); and the maker's Ed25519 public key, which signs all of it. So without
the passphrase a package says only how large it is and who signed it: not the dataset's name, not its source,
not a digest anyone holding a candidate file could compare (format 1 carried all of these in clear).

Nothing is decrypted to make a package: the same ciphertext travels, bound by its context to the dataset's id,
so the other machine keeps the id. The vault's own passphrase and keyring never leave the machine.

``appliance data import OUT`` on the other machine, in this order: bounds the KDF's parameters (a package
cannot make it spend unbounded memory or time), checks the signature, then needs the operator to name the
signer (``--signer`` with the fingerprint the maker printed, or a yes at the prompt after seeing it), checks
every part's sha256, asks the package passphrase, unwraps the key, opens the sealed part and checks the inner
manifest's own signature and digests, authenticates every file by decrypting it in memory (counting records
against the manifest; no plaintext is written), and only then stores the key under its own vault's passphrase
and the ciphertext under ``datasets/<id>/``.

Crypto-shredding (``data rm`` destroys the data key) cannot reach a package already made: its key is wrapped
under the package passphrase. Whoever holds a package and its passphrase can still open it.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

from ..errors import CheckFailed, InvalidInput, NotFound
from ..workspace import read_json, staging, write_json
from . import audit, keyring, manifest, signing, store

FORMAT = "appliance-dataset-package/2"
DOMAIN = "appliance-dataset-package/2"
SEAL_AAD = b"appliance-dataset-package/2 sealed"
INDEX = "package.json"
PASSPHRASE_ENV = "APPLIANCE_PACKAGE_PASSPHRASE_FILE"
PART = "part-{}.c2sp"
MIN_SCORE = 3  # zxcvbn's 0-4 scale: 3 is "safely unguessable" (10^8 guesses and more), the least a package gets


def is_package(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def check_passphrase(passphrase: str) -> None:
    """A package passphrase stands alone against offline guessing (the package may be copied anywhere): refuse
    what zxcvbn estimates a determined guesser finds, and say how to do better."""
    from zxcvbn import zxcvbn

    keyring._check_passphrase(passphrase)
    verdict = zxcvbn(passphrase[:100])  # zxcvbn's cost grows with length; 100 characters decide any verdict
    if verdict["score"] < MIN_SCORE:
        hint = verdict["feedback"].get("warning") or "it is too easy to guess"
        raise InvalidInput(f"that package passphrase is too weak ({hint.rstrip('.')}); use four or more unrelated "
                           f"words, or the one `appliance data package --generate-passphrase` prints.")


def generate_passphrase() -> str:
    """Six groups of four characters from an alphabet without look-alikes: 124 bits, easy to read aloud."""
    import secrets

    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(6))


def make(vault: keyring.Unlocked, dataset_id: str, out: Path, passphrase: str, kdf: str = keyring.DEFAULT_KDF) -> dict:
    """Write the package of ``dataset_id`` to the new folder ``out`` (all or nothing)."""
    import json
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    root = store.dataset_dir(dataset_id)
    if not store.is_encrypted(root):
        raise NotFound(f"no encrypted dataset named {dataset_id!r}; `appliance data list` shows them.")
    out = Path(out).expanduser()
    if out.exists():
        raise InvalidInput(f"{out} already exists; name a new folder for the package.")
    check_passphrase(passphrase)
    source = manifest.verify(root)  # the vault's copy is sound and signed by this appliance before it travels
    params = keyring._new_kdf(kdf)
    key = vault.data_key(dataset_id)
    wrapped = keyring._wrap(keyring.derive_kek(passphrase, params), key)
    public = signing.workspace_public()
    parts = {PART.format(i): rel for i, rel in enumerate(sorted(source["files"]), 1)}
    inner = {"dataset": dataset_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "manifest": (root / manifest.NAME).read_text(encoding="utf-8"), "parts": parts}
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, json.dumps(inner).encode("utf-8"), SEAL_AAD)
    with staging(out) as tmp:
        for part, rel in parts.items():
            (tmp / part).write_bytes((root / rel).read_bytes())
        body = {"format": FORMAT, "kdf": params, "wrapped_key": keyring._b64e(wrapped),
                "sealed": keyring._b64e(sealed), "parts": {p: manifest.sha256_file(tmp / p) for p in parts},
                "signer": keyring._b64e(public)}
        write_json(tmp / INDEX, {**body, "signature": signing.sign(DOMAIN, body)})
    fingerprint = signing.fingerprint(public)
    records = source["details"].get("records", {})
    audit.record("dataset.package", {"dataset": dataset_id},
                 {"out": str(out.resolve()), "kdf": params["name"], "records": records, "signer": fingerprint})
    return {"dataset": dataset_id, "out": str(out), "records": records, "kdf": params["name"], "signer": fingerprint}


def inspect(pkg: Path) -> dict:
    """What can be checked without the passphrase: the format, the KDF's bounds, the signature. Returns the
    signer's fingerprint (for the operator to compare) and the parts' count."""
    pkg = Path(pkg).expanduser()
    index = _index(pkg)
    keyring.check_kdf(index["kdf"], pkg / INDEX)
    public = _b64d(index["signer"], pkg / INDEX)
    body = {k: v for k, v in index.items() if k != "signature"}
    signing.check(DOMAIN, body, index["signature"], public, str(pkg / INDEX))
    return {"package": str(pkg), "signer": signing.fingerprint(public), "parts": len(index["parts"])}


def open_package(vault: keyring.Unlocked, pkg: Path, passphrase, *, hardware: dict, signer: str,
                 name: str | None = None) -> dict:
    """Import the package at ``pkg`` into this machine's vault. ``signer``: the maker's key fingerprint (or public
    key file) the operator expects, required: nothing is unwrapped for a key nobody vouched for. ``passphrase``: a
    function asked for the package passphrase once the package has checked out."""
    import json
    import shutil
    import tempfile

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    pkg = Path(pkg).expanduser()
    seen = inspect(pkg)
    index = read_json(pkg / INDEX)
    public = _b64d(index["signer"], pkg / INDEX)
    if not signer:
        raise InvalidInput(f"{pkg} is signed by the key {seen['signer']}; name the key you expect with --signer (the "
                           "fingerprint `appliance data package` printed on the maker's machine) before it is opened.")
    expected = signing.as_fingerprint(signer) or signing.fingerprint(signing.load_public(Path(signer)))
    if expected != seen["signer"]:
        raise CheckFailed(f"{pkg / INDEX} is signed by the key {seen['signer'][:16]}..., not by the one you named "
                          f"({expected[:16]}...); get the package from that appliance again.")
    for part, digest in index["parts"].items():
        if not _safe_part(part):
            raise CheckFailed(f"{pkg / INDEX} names a part {part!r} that is not a part's name; the package was edited.")
        if not (pkg / part).is_file() or manifest.sha256_file(pkg / part) != digest:
            raise CheckFailed(f"{pkg / part} does not match its sha256 in {pkg / INDEX}; the package was changed or "
                              "damaged in transit.")
    try:
        key = keyring._unwrap(keyring.derive_kek(passphrase(), index["kdf"]), _b64d(index["wrapped_key"], pkg / INDEX),
                              "")
    except InvalidInput:
        raise InvalidInput(f"the package passphrase does not open {pkg / INDEX}; ask whoever made the package for "
                           "it.") from None
    sealed = _b64d(index["sealed"], pkg / INDEX)
    try:
        inner = json.loads(AESGCM(key).decrypt(sealed[:12], sealed[12:], SEAL_AAD))
    except (InvalidTag, ValueError):
        raise CheckFailed(f"the sealed part of {pkg / INDEX} does not open with its own key; the package was "
                          "assembled from other parts.") from None
    dataset_id = inner["dataset"]
    if name and name != dataset_id:
        raise InvalidInput(f"{pkg} holds dataset {dataset_id!r}, and a package keeps its dataset's name (the ciphertext "
                           "is bound to it); drop --name.")
    if store.dataset_dir(dataset_id).exists():
        raise InvalidInput(f"a dataset named {dataset_id!r} already exists here; a package keeps its dataset's name "
                           f"(the ciphertext is bound to it): remove the other (`appliance data rm {dataset_id}`) first.")
    if sorted(inner["parts"]) != sorted(index["parts"]) or not all(
            _safe_name(rel) for rel in inner["parts"].values()):
        raise CheckFailed(f"the sealed part of {pkg / INDEX} names other parts than the package holds.")
    # The dataset's folder as the maker's vault had it, rebuilt beside where it will live: its manifest's
    # signature and digests are checked there by the one verifier every artifact goes through.
    folder = store.dataset_dir(dataset_id).parent
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=".package-", dir=folder))
    try:
        (root / manifest.NAME).write_text(inner["manifest"], encoding="utf-8")
        for part, rel in inner["parts"].items():
            shutil.copyfile(pkg / part, root / rel)
        source = manifest.verify(root, public_raw=public)  # its signature, and the sha256 of every ciphertext
        if source.get("id") != dataset_id or source["details"].get("format") != store.FORMAT:
            raise CheckFailed(f"the manifest sealed in {pkg / INDEX} is not dataset {dataset_id!r}'s; the package was "
                              "assembled from other parts.")
        counts = source["details"].get("records", {})
        names = [rel[: -len(store.SUFFIX)] for rel in source["files"] if rel.endswith(store.SUFFIX)]
        for split in names:  # every chunk authenticated before anything is stored; plaintext only in memory
            n = sum(1 for _ in store.records(key, dataset_id, split, root / f"{split}{store.SUFFIX}"))
            if n != counts.get(split):
                raise CheckFailed(f"a part of {pkg} holds {n} records of {split}, its manifest says {counts.get(split)}.")
        details = {k: v for k, v in source["details"].items() if k not in ("format", "records")}
        details["packaged"] = {"signer": seen["signer"], "created": inner.get("created")}
        with store.create(vault, dataset_id, hardware=hardware, key=key) as ds:
            for split in names:
                ds.adopt(split, root / f"{split}{store.SUFFIX}", counts[split])
            ds.details.update(details)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    audit.record("dataset.import", {"dataset": dataset_id},
                 {"source": "package", "package": str(pkg.resolve()), "signer": seen["signer"], "imported": counts})
    return {"dataset": dataset_id, "records": counts, "signer": seen["signer"], "package": str(pkg)}


def _safe_part(name: str) -> bool:
    import re

    return re.fullmatch(r"part-[0-9]{1,4}\.c2sp", name) is not None


def _safe_name(name: str) -> bool:
    return isinstance(name, str) and "/" not in name and name not in ("", ".", "..") and not name.startswith(".")


def _index(pkg: Path) -> dict:
    if not is_package(pkg):
        raise NotFound(f"{pkg} is not a dataset package (no {INDEX}); make one with `appliance data package`.")
    try:
        index = read_json(pkg / INDEX)
    except ValueError:
        raise CheckFailed(f"{pkg / INDEX} is not valid JSON; the package was damaged.") from None
    if isinstance(index, dict) and index.get("format") == "appliance-dataset-package/1":
        raise InvalidInput(f"{pkg} is a package of format 1, which carried the dataset's name and digests in clear; "
                           "ask its maker to package the dataset again.")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InvalidInput(f"{pkg / INDEX} is not a dataset package of this appliance (format {FORMAT}).")
    missing = [k for k in ("kdf", "wrapped_key", "sealed", "parts", "signer", "signature") if k not in index]
    if missing:
        raise CheckFailed(f"{pkg / INDEX} lacks {', '.join(missing)}; the package was damaged or edited.")
    if not isinstance(index["parts"], dict) or not isinstance(index["kdf"], dict):
        raise CheckFailed(f"{pkg / INDEX} is malformed (parts, kdf); the package was damaged or edited.")
    return index


def _b64d(text: str, where: Path) -> bytes:
    try:
        return base64.b64decode(str(text).encode("ascii"), validate=True)
    except ValueError:
        raise CheckFailed(f"{where} holds a value that is not base64; the package was damaged.") from None
