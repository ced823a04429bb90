"""Dataset packages: an encrypted dataset carried to another machine, opened there with a passphrase of its own.

``appliance data package NAME OUT`` writes a folder::

    OUT/package.json          what is needed to open it, signed
    OUT/dataset/manifest.json the dataset's own signed manifest (sha256 of each ciphertext, record counts)
    OUT/dataset/*.c2sp        the dataset's ciphertext, byte for byte as in the vault

``package.json`` (format ``appliance-dataset-package/1``) holds the dataset's data key wrapped (AES Key Wrap) under
a key derived from the *package passphrase* by the keyring's KDF with a fresh salt, the sha256 of the manifest,
and the maker's Ed25519 public key; it is signed by that key, as the manifest is. The vault's own passphrase and
keyring never leave the machine, and nothing is decrypted to make a package: the same ciphertext travels, bound by
its context to the dataset's id, so the other machine keeps the id.

``appliance data import OUT`` on the other machine checks both signatures and every sha256, asks the package
passphrase, unwraps the data key, authenticates every file by decrypting it in memory (counting records against
the manifest; no plaintext is written), then stores the key under its own vault's passphrase and the ciphertext
under ``datasets/<id>/`` with a manifest of its own that names the maker's key fingerprint. Training on both
machines then reads the same records, which the nodes of a run check before they start (the data digest).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

from ..errors import CheckFailed, InvalidInput, NotFound
from ..workspace import read_json, staging, write_json
from . import audit, keyring, manifest, signing, store

FORMAT = "appliance-dataset-package/1"
DOMAIN = "appliance-dataset-package/1"
INDEX = "package.json"
PASSPHRASE_ENV = "APPLIANCE_PACKAGE_PASSPHRASE_FILE"


def is_package(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def make(vault: keyring.Unlocked, dataset_id: str, out: Path, passphrase: str, kdf: str = keyring.DEFAULT_KDF) -> dict:
    """Write the package of ``dataset_id`` to the new folder ``out`` (all or nothing)."""
    root = store.dataset_dir(dataset_id)
    if not store.is_encrypted(root):
        raise NotFound(f"no encrypted dataset named {dataset_id!r}; `appliance data list` shows them.")
    out = Path(out).expanduser()
    if out.exists():
        raise InvalidInput(f"{out} already exists; name a new folder for the package.")
    keyring._check_passphrase(passphrase)
    source = manifest.verify(root)  # the vault's copy is sound and signed by this appliance before it travels
    params = keyring._new_kdf(kdf)
    wrapped = keyring._wrap(keyring.derive_kek(passphrase, params), vault.data_key(dataset_id))
    public = signing.workspace_public()
    with staging(out) as tmp:
        (tmp / "dataset").mkdir()
        for rel in [manifest.NAME, *source["files"]]:
            (tmp / "dataset" / rel).write_bytes((root / rel).read_bytes())
        body = {"format": FORMAT, "dataset": dataset_id, "kdf": params, "wrapped_key": keyring._b64e(wrapped),
                "manifest_sha256": manifest.sha256_file(root / manifest.NAME),
                "signer": keyring._b64e(public), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(tmp / INDEX, {**body, "signature": signing.sign(DOMAIN, body)})
    fingerprint = signing.fingerprint(public)
    records = source["details"].get("records", {})
    audit.record("dataset.package", {"dataset": dataset_id},
                 {"out": str(out.resolve()), "kdf": params["name"], "records": records, "signer": fingerprint})
    return {"dataset": dataset_id, "out": str(out), "records": records, "kdf": params["name"], "signer": fingerprint}


def open_package(vault: keyring.Unlocked, pkg: Path, passphrase, *, hardware: dict, signer: str | None = None,
                 name: str | None = None) -> dict:
    """Import the package at ``pkg`` into this machine's vault. ``passphrase``: a function asked for the package
    passphrase once the package has checked out. ``signer``: the maker's key fingerprint (or public key file) the
    operator expects; without it the fingerprint is shown and recorded for them to compare."""
    pkg = Path(pkg).expanduser()
    index = _index(pkg)
    public = _b64d(index["signer"], pkg / INDEX)
    body = {k: v for k, v in index.items() if k != "signature"}
    signing.check(DOMAIN, body, index["signature"], public, str(pkg / INDEX))
    fingerprint = signing.fingerprint(public)
    if signer is not None:
        expected = signing.as_fingerprint(signer) or signing.fingerprint(signing.load_public(Path(signer)))
        if expected != fingerprint:
            raise CheckFailed(f"{pkg / INDEX} is signed by the key {fingerprint[:16]}..., not by the one you named "
                              f"({expected[:16]}...); get the package from that appliance again.")
    root = pkg / "dataset"
    if manifest.sha256_file(root / manifest.NAME) != index.get("manifest_sha256"):
        raise CheckFailed(f"{root / manifest.NAME} is not the manifest {pkg / INDEX} was made with; the package was "
                          "changed or damaged.")
    source = manifest.verify(root, public_raw=public)  # its signature, and the sha256 of every ciphertext
    dataset_id = index["dataset"]
    if name and name != dataset_id:
        raise InvalidInput(f"{pkg} holds dataset {dataset_id!r}, and a package keeps its dataset's name (the ciphertext "
                           "is bound to it); drop --name.")
    if source.get("id") != dataset_id or source["details"].get("format") != store.FORMAT:
        raise CheckFailed(f"{root / manifest.NAME} is not the manifest of dataset {dataset_id!r}; the package was "
                          "assembled from other parts.")
    if store.dataset_dir(dataset_id).exists():
        raise InvalidInput(f"a dataset named {dataset_id!r} already exists here; a package keeps its dataset's name "
                           f"(the ciphertext is bound to it): remove the other (`appliance data rm {dataset_id}`) first.")
    try:
        key = keyring._unwrap(keyring.derive_kek(passphrase(), index["kdf"]), _b64d(index["wrapped_key"], pkg / INDEX),
                              "")
    except InvalidInput:
        raise InvalidInput(f"the package passphrase does not open {pkg / INDEX}; ask whoever made the package for "
                           "it.") from None
    counts = source["details"].get("records", {})
    names = [rel[: -len(store.SUFFIX)] for rel in source["files"] if rel.endswith(store.SUFFIX)]
    for name in names:  # every chunk authenticated before anything is stored; plaintext only in memory
        n = sum(1 for _ in store.records(key, dataset_id, name, root / f"{name}{store.SUFFIX}"))
        if n != counts.get(name):
            raise CheckFailed(f"{root / (name + store.SUFFIX)} holds {n} records, its manifest says {counts.get(name)}.")
    details = {k: v for k, v in source["details"].items() if k not in ("format", "records")}
    details["packaged"] = {"signer": fingerprint, "manifest_sha256": index["manifest_sha256"],
                           "created": index.get("created")}
    with store.create(vault, dataset_id, hardware=hardware, key=key) as ds:
        for name in names:
            ds.adopt(name, root / f"{name}{store.SUFFIX}", counts[name])
        ds.details.update(details)
    audit.record("dataset.import", {"dataset": dataset_id},
                 {"source": "package", "package": str(pkg.resolve()), "signer": fingerprint, "imported": counts})
    return {"dataset": dataset_id, "records": counts, "signer": fingerprint, "package": str(pkg)}


def _index(pkg: Path) -> dict:
    if not is_package(pkg):
        raise NotFound(f"{pkg} is not a dataset package (no {INDEX}); make one with `appliance data package`.")
    try:
        index = read_json(pkg / INDEX)
    except ValueError:
        raise CheckFailed(f"{pkg / INDEX} is not valid JSON; the package was damaged.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InvalidInput(f"{pkg / INDEX} is not a dataset package of this appliance (format {FORMAT}).")
    missing = [k for k in ("dataset", "kdf", "wrapped_key", "manifest_sha256", "signer", "signature") if k not in index]
    if missing:
        raise CheckFailed(f"{pkg / INDEX} lacks {', '.join(missing)}; the package was damaged or edited.")
    return index


def _b64d(text: str, where: Path) -> bytes:
    try:
        return base64.b64decode(str(text).encode("ascii"), validate=True)
    except ValueError:
        raise CheckFailed(f"{where} holds a value that is not base64; the package was damaged.") from None
