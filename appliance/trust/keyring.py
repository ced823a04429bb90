"""The keyring: one random data key per dataset, wrapped by a key derived from the passphrase.

``keyring.json`` (format in docs/vault-format.md)::

    {"format": "appliance-keyring/1",
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<base64>"},
     "verifier": "<base64 AES-KW of a random 32-byte key>",
     "keys": {"<dataset id>": {"wrapped": "<base64 AES-KW>", "created": "..."}},
     "signing": {"public": "<base64 Ed25519 public key>", "wrapped": "<base64 AES-KW of the private key>"},
     "created": "...", "rekeyed": "..."}

The key-encryption key (KEK, 32 bytes) is the KDF of the passphrase; data keys
are wrapped with AES Key Wrap (RFC 3394, NIST SP 800-38F), whose integrity
check tells a wrong passphrase apart from a damaged keyring through the
verifier. Rekeying derives a new KEK with a fresh salt, rewraps every key and
replaces the file atomically: a crash at any point leaves a keyring that opens
with the old passphrase or with the new one, and no dataset is re-encrypted.
Deleting a dataset's wrapped key is what makes its ciphertext unreadable.
The appliance's Ed25519 signing key (``trust.signing``) is wrapped the
same way; unlocking installs it in the process.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ApplianceError, InvalidInput, NotFound
from ..workspace import keyring_file, read_json, write_json
from . import audit, signing

FORMAT = "appliance-keyring/1"
KDFS = ("scrypt", "pbkdf2-sha256", "argon2id")
DEFAULT_KDF = "scrypt"
# Costs: scrypt as the issue asks (N=2^17, r=8, p=1: 128 MiB); PBKDF2 at OWASP's 600,000 iterations
# for FIPS-minded sites; Argon2id at OWASP's minimum (19 MiB, 2 passes, 1 lane).
KDF_DEFAULTS = {
    "scrypt": {"n": 2**17, "r": 8, "p": 1},
    "pbkdf2-sha256": {"iterations": 600_000},
    "argon2id": {"memory_kib": 19456, "iterations": 2, "lanes": 1},
}


class WrongPassphrase(ApplianceError):
    """The passphrase does not open the keyring."""


@dataclass
class Unlocked:
    """An opened keyring: the KEK stays in memory only."""

    path: Path
    data: dict
    kek: bytes

    def data_key(self, dataset_id: str) -> bytes:
        entry = self.data["keys"].get(dataset_id)
        if entry is None:
            raise NotFound(f"the keyring holds no key for dataset {dataset_id!r}; it was deleted or never imported.")
        return _unwrap(self.kek, _b64d(entry["wrapped"]), f"the key of dataset {dataset_id!r}")

    def add_key(self, dataset_id: str, key: bytes | None = None) -> bytes:
        """Wrap and store a data key (a new random one, or one a dataset package brought); return it."""
        if dataset_id in self.data["keys"]:
            raise InvalidInput(f"the keyring already holds a key for dataset {dataset_id!r}.")
        key = key or os.urandom(32)
        self.data["keys"][dataset_id] = {"wrapped": _b64e(_wrap(self.kek, key)), "created": _now()}
        write_json(self.path, self.data)
        return key

    def signing_private(self) -> bytes:
        return _unwrap(self.kek, _b64d(self.data["signing"]["wrapped"]), "the signing key")

    def secret(self, name: str) -> bytes | None:
        """A named secret kept in the vault (the cluster's shared secret), or None."""
        entry = self.data.get("secrets", {}).get(name)
        return None if entry is None else _unwrap(self.kek, _b64d(entry["wrapped"]), f"the secret {name!r}")

    def set_secret(self, name: str, value: bytes) -> None:
        self.data.setdefault("secrets", {})[name] = {"wrapped": _b64e(_wrap(self.kek, value)), "created": _now()}
        write_json(self.path, self.data)

    def destroy_key(self, dataset_id: str) -> bool:
        """Crypto-shred: forget the dataset's wrapped key. Returns whether there was one."""
        if self.data["keys"].pop(dataset_id, None) is None:
            return False
        write_json(self.path, self.data)
        return True


def path() -> Path:
    return keyring_file()


def exists() -> bool:
    return path().is_file()


def init(passphrase: str, kdf: str = DEFAULT_KDF) -> Unlocked:
    if exists():
        raise InvalidInput(f"a vault already exists at {path()}; use `appliance vault rekey` to change its passphrase.")
    _check_passphrase(passphrase)
    params = _new_kdf(kdf)
    kek = derive_kek(passphrase, params)
    data = {"format": FORMAT, "kdf": params, "verifier": _b64e(_wrap(kek, os.urandom(32))), "keys": {},
            "created": _now()}
    _add_signing_key(data, kek)
    write_json(path(), data)
    unlocked = Unlocked(path(), data, kek)
    _install_signer(unlocked)
    audit.record("vault.init", details={"kdf": params["name"]})
    return unlocked


def load() -> dict:
    if not exists():
        raise NotFound(f"no vault at {path()}; create one with `appliance vault init`.")
    try:
        data = read_json(path())
    except ValueError:
        raise InvalidInput(f"{path()} is not valid JSON; the keyring is damaged, restore it from a backup.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInput(f"{path()} is not an appliance keyring (format {FORMAT}); restore it from a backup.")
    return data


def unlock(passphrase: str) -> Unlocked:
    data = load()
    kek = derive_kek(passphrase, data["kdf"])
    try:
        _unwrap(kek, _b64d(data["verifier"]), "the verifier")
    except InvalidInput:
        audit.record("vault.unlock_failed", details={"reason": "wrong passphrase"})
        raise WrongPassphrase(f"the passphrase does not open the vault at {path()}; check it and try again.") from None
    unlocked = Unlocked(path(), data, kek)
    if "signing" not in data:  # a keyring from before signing keys: give it one now
        _add_signing_key(data, kek)
        write_json(path(), data)
    _install_signer(unlocked)
    audit.record("vault.unlock")
    return unlocked


def rekey(old: str, new: str, kdf: str | None = None) -> Unlocked:
    """Rewrap every data key under a KEK derived from ``new`` (fresh salt); one atomic file replace."""
    current = unlock(old)
    _check_passphrase(new)
    params = _new_kdf(kdf or current.data["kdf"]["name"])
    kek = derive_kek(new, params)
    data = dict(current.data)
    data["kdf"] = params
    data["verifier"] = _b64e(_wrap(kek, os.urandom(32)))
    data["keys"] = {ds: {**entry, "wrapped": _b64e(_wrap(kek, current.data_key(ds)))}
                    for ds, entry in current.data["keys"].items()}
    data["signing"] = {**data["signing"], "wrapped": _b64e(_wrap(kek, current.signing_private()))}
    data["secrets"] = {name: {**entry, "wrapped": _b64e(_wrap(kek, current.secret(name)))}
                       for name, entry in current.data.get("secrets", {}).items()}
    data["rekeyed"] = _now()
    write_json(path(), data)  # temp file + fsync + rename: old or new, never half
    audit.record("vault.rekey", details={"kdf": params["name"], "keys_rewrapped": len(data["keys"])})
    return Unlocked(path(), data, kek)


def status() -> dict:
    data = load()
    kdf = {k: v for k, v in data["kdf"].items() if k != "salt"}
    signing_key = data.get("signing")
    return {"path": str(path()), "format": data["format"], "kdf": kdf, "datasets": sorted(data["keys"]),
            "created": data.get("created"), "rekeyed": data.get("rekeyed"),
            "signing_key": signing.fingerprint(_b64d(signing_key["public"])) if signing_key else None}


def _add_signing_key(data: dict, kek: bytes) -> None:
    private, public = signing.new_private()
    data["signing"] = {"algorithm": "ed25519", "public": _b64e(public), "wrapped": _b64e(_wrap(kek, private)),
                       "created": _now()}


def _install_signer(unlocked: Unlocked) -> None:
    signing.use(unlocked.signing_private())
    signing.export_public(_b64d(unlocked.data["signing"]["public"]))


def derive_kek(passphrase: str, params: dict) -> bytes:
    secret = passphrase.encode("utf-8")
    salt = _b64d(params["salt"])
    name = params["name"]
    if name == "scrypt":
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"]).derive(secret)
    if name == "pbkdf2-sha256":
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

        return PBKDF2HMAC(hashes.SHA256(), 32, salt, params["iterations"]).derive(secret)
    if name == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(salt=salt, length=32, iterations=params["iterations"], lanes=params["lanes"],
                        memory_cost=params["memory_kib"]).derive(secret)
    raise InvalidInput(f"{path()} names an unknown KDF {name!r}; this appliance knows {', '.join(KDFS)}.")


# What a package (or keyring) from elsewhere may ask the KDF for: no less than this appliance's own minimums
# (a weaker setting would make the passphrase cheaper to guess) and no more than a workstation can afford (a
# hostile package must not make import allocate gigabytes or run for hours).
KDF_BOUNDS = {
    "scrypt": {"n": (2**14, 2**20), "r": (1, 16), "p": (1, 4)},
    "pbkdf2-sha256": {"iterations": (100_000, 10_000_000)},
    "argon2id": {"memory_kib": (19456, 1 << 20), "iterations": (1, 10), "lanes": (1, 8)},
}
MAX_KDF_MEMORY = 1 << 30


def check_kdf(params: dict, where) -> None:
    """Refuse KDF parameters outside KDF_BOUNDS before anything is derived with them."""
    name = params.get("name") if isinstance(params, dict) else None
    if name not in KDF_BOUNDS:
        raise InvalidInput(f"{where} names an unknown KDF {name!r}; this appliance knows {', '.join(KDFS)}.")
    for field, (low, high) in KDF_BOUNDS[name].items():
        value = params.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidInput(f"{where} asks {name} for {field} {value!r}, outside what this appliance accepts "
                               f"({low} to {high}); it was not made by this appliance's defaults.")
    if name == "scrypt" and (params["n"] & (params["n"] - 1) or 128 * params["n"] * params["r"] > MAX_KDF_MEMORY):
        raise InvalidInput(f"{where} asks scrypt for n {params['n']}, r {params['r']}: not a power of two or more "
                           "than 1 GiB of memory.")
    try:
        salt = base64.b64decode(str(params.get("salt", "")).encode("ascii"), validate=True)
    except ValueError:
        salt = b""
    if not 16 <= len(salt) <= 64:
        raise InvalidInput(f"{where} holds a KDF salt of {len(salt)} bytes; 16 to 64 are accepted.")


def _new_kdf(name: str) -> dict:
    if name not in KDFS:
        raise InvalidInput(f"unknown KDF {name!r}; choose one of {', '.join(KDFS)}.")
    return {"name": name, **KDF_DEFAULTS[name], "salt": _b64e(os.urandom(16))}


def _check_passphrase(passphrase: str) -> None:
    if len(passphrase) < 8:
        raise InvalidInput("the passphrase must be at least 8 characters long.")


def _wrap(kek: bytes, key: bytes) -> bytes:
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    return aes_key_wrap(kek, key)


def _unwrap(kek: bytes, wrapped: bytes, what: str) -> bytes:
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise InvalidInput(f"{what} in {path()} does not unwrap; the keyring is damaged or the passphrase is wrong.") from None


def _b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _b64d(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except ValueError:
        raise InvalidInput(f"{path()} holds a value that is not base64; the keyring is damaged, restore it from a backup.") from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
