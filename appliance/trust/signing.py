"""The appliance's Ed25519 identity: it signs audit checkpoints and artifact manifests.

The private key is created with the vault and kept wrapped in the keyring
(``keyring.json``, field ``signing``), so it exists in clear only in the memory
of a process that unlocked the vault, or of a training child its parent handed
it to. The public key is in the keyring in clear and exported as
``<workspace>/signing-key.pub`` (PEM) for verifiers; its fingerprint (sha256
of the 32 raw public-key bytes, hex) is what a person compares out of band.

Every signature covers a domain string and a canonical JSON payload (sorted
keys, no spaces, ASCII), so a signature made for one purpose (an audit
checkpoint) can never be replayed as another (a manifest).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from ..errors import CheckFailed, InvalidInput
from ..workspace import home, write_atomic

_signer = None  # the unlocked private key of this process, if any


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def new_private() -> tuple[bytes, bytes]:
    """A fresh key pair as (private raw 32 bytes, public raw 32 bytes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    return _raw_private(key), _raw_public(key.public_key())


def use(private_raw: bytes | None) -> None:
    """Install this process's signing key (None forgets it)."""
    global _signer
    if private_raw is None:
        _signer = None
        return
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    _signer = Ed25519PrivateKey.from_private_bytes(private_raw)


def available() -> bool:
    return _signer is not None


def private_raw() -> bytes | None:
    return None if _signer is None else _raw_private(_signer)


def sign(domain: str, payload) -> dict:
    """{"key": fingerprint, "signature": base64} over domain + "\\n" + canonical(payload)."""
    if _signer is None:
        raise InvalidInput("signing needs the vault's key; unlock the vault (APPLIANCE_PASSPHRASE_FILE or the prompt).")
    message = domain.encode("ascii") + b"\n" + canonical(payload)
    return {"key": fingerprint(_raw_public(_signer.public_key())),
            "signature": base64.b64encode(_signer.sign(message)).decode("ascii")}


def check(domain: str, payload, signed: dict, public_raw: bytes, what: str) -> None:
    """Raise CheckFailed naming ``what`` unless ``signed`` is a valid signature of payload by ``public_raw``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not isinstance(signed, dict) or not isinstance(signed.get("signature"), str):
        raise CheckFailed(f"{what} carries no signature.")
    if signed.get("key") != fingerprint(public_raw):
        raise CheckFailed(f"{what} is signed by key {str(signed.get('key'))[:16]}..., not by the trusted key "
                          f"{fingerprint(public_raw)[:16]}...")
    try:
        sig = base64.b64decode(signed["signature"], validate=True)
        Ed25519PublicKey.from_public_bytes(public_raw).verify(sig, domain.encode("ascii") + b"\n" + canonical(payload))
    except (InvalidSignature, ValueError):
        raise CheckFailed(f"{what} has a bad signature: it was changed after it was signed.") from None


def fingerprint(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def as_fingerprint(text: str) -> str | None:
    """``text`` as a fingerprint (64 hex digits, also typed as aa:bb:… pairs or in capitals), lower-case; None if
    it is not one (a path to a key file, say)."""
    hexed = text.strip().replace(":", "").lower()
    return hexed if re.fullmatch(r"[0-9a-f]{64}", hexed) else None


def public_path() -> Path:
    return home() / "signing-key.pub"


def export_public(public_raw: bytes, path: Path | None = None) -> Path:
    """Write the public key as PEM (SubjectPublicKeyInfo), atomically."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = Ed25519PublicKey.from_public_bytes(public_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = path or public_path()
    if not path.is_file() or path.read_bytes() != pem:
        write_atomic(path, pem)
    return path


def load_public(path: Path) -> bytes:
    """The raw public key from a PEM file (as exported) or a file holding 64 hex digits."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read public key {path}: {e.strerror}.") from None
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise InvalidInput(f"{path} is not an Ed25519 public key (PEM, or 64 hex digits).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput(f"{path} holds a public key that is not Ed25519.")
    return _raw_public(key)


def workspace_public() -> bytes | None:
    """The workspace's public key, read from the keyring file's clear ``signing.public`` field (no passphrase, and
    without the keyring module, which records its events in the audit log that this key verifies), or None."""
    import json

    from ..workspace import keyring_file

    path = keyring_file()
    if not path.is_file():
        return None
    try:
        signing = json.loads(path.read_text()).get("signing")
    except ValueError:
        raise InvalidInput(f"{path} is not valid JSON; the keyring is damaged, restore it from a backup.") from None
    return base64.b64decode(signing["public"]) if signing else None


def _raw_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _raw_public(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
